"""Sound-prompted segmentation metrics: DenseAV's protocol (`denseav/eval_utils.py`, `train.py`), one
test per point with values worked out by hand, then DenseAV's whole computation on random maps."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torchmetrics.functional.classification import binary_average_precision

from avsync.evaluation.localization import (
    LocalizationScores,
    best_iou,
    iou_at_thresholds,
    iou_thresholds,
    localization_metrics,
    normalize_maps,
    pixel_average_precision,
    upsample_maps,
)


def row(*values) -> torch.Tensor:
    """One 1 x n map."""
    return torch.tensor([values], dtype=torch.float32)


def square_masks(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """`count` masks, each with one random axis-aligned square of object pixels."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for mask in masks:
        side = int(torch.randint(3, size // 2, (), generator=generator))
        y, x = torch.randint(0, size - side, (2,), generator=generator).tolist()
        mask[y : y + side, x : x + side] = True
    return masks


# ------------------------------------------------------------------------------------------ 1. normalization
def test_dataset_normalization_takes_one_min_and_one_max_over_all_maps():
    maps = torch.stack([row(1.0, 2.0), row(3.0, 5.0)])
    # min over both maps 1, max after the shift 5 - 1 = 4: (x - 1) / 4
    assert torch.equal(normalize_maps(maps), torch.stack([row(0.0, 0.25), row(0.5, 1.0)]))
    # per image: (1, 2) -> (0, 1) and (3, 5) -> (0, 1)
    assert torch.equal(normalize_maps(maps, "per_image"), torch.stack([row(0.0, 1.0), row(0.0, 1.0)]))
    # given limits (a whole set's) instead of these maps' own: (x - 0) / 10
    assert torch.equal(normalize_maps(maps, limits=(0.0, 10.0)), maps / 10)
    # no spread: zeros (DenseAV would divide by zero)
    assert torch.equal(normalize_maps(torch.full((2, 1, 2), 3.0)), torch.zeros(2, 1, 2))
    assert torch.equal(normalize_maps(torch.full((2, 1, 2), 3.0), "per_image"), torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="unknown normalization 'global'"):
        normalize_maps(maps, "global")


def test_dataset_normalization_keeps_the_order_of_pixels_across_images_and_per_image_does_not():
    """One class, two images. Raw maps A = (1, 2) with the object at A[1], B = (3, 4) with it at B[0].

    dataset: (x - 1) / 3 -> A = (0, 1/3), B = (2/3, 1). Descending: 1 (bg), 2/3 (obj), 1/3 (obj), 0 (bg):
      AP = (1/2 + 2/3) / 2 = 7/12 (precision at each object pixel).
      IoU at t = 0 (the first of linspace(0, 1, 20)): predicted {1/3, 2/3, 1}: 2 / 3 -- the best.
    per_image: A = (0, 1), B = (0, 1): at 1, {A1 obj, B1 bg}: P = 1/2, R = 1/2; at 0, all: P = 1/2, R = 1:
      AP = 1/2 * 1/2 + 1/2 * 1/2 = 1/2.
      IoU for t in [0, 1): predicted {A1, B1}: 1 / |{A1, B1, B0}| = 1/3; at t = 1 nothing: 0.
    """
    maps = torch.stack([row(1.0, 2.0), row(3.0, 4.0)])
    masks = torch.stack([row(0, 1), row(1, 0)]).bool()
    dataset = localization_metrics(maps, masks, [0, 0])
    assert dataset.mean_ap == pytest.approx(7 / 12, abs=1e-6)
    assert dataset.mean_iou == pytest.approx(2 / 3, abs=1e-12)
    per_image = localization_metrics(maps, masks, [0, 0], normalization="per_image")
    assert per_image.mean_ap == pytest.approx(1 / 2, abs=1e-6)
    assert per_image.mean_iou == pytest.approx(1 / 3, abs=1e-12)
    # dataset normalization is a positive affine map: it scores exactly what the raw maps score
    raw = localization_metrics(maps, masks, [0, 0], normalization="none")
    assert (raw.mean_ap, raw.mean_iou) == pytest.approx((dataset.mean_ap, dataset.mean_iou), abs=1e-6)


# ---------------------------------------------------------------------------------------------- 2. order
def test_upsampling_is_bilinear_without_aligned_corners():
    # 1x3 -> 1x6: output x samples the grid at (x + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75,
    # 1.25, 1.75, 2.25 (clamped to 2): (0, 0.25, 0.75, 0.75, 0.25, 0) for the grid (0, 1, 0)
    assert torch.allclose(upsample_maps(row(0.0, 1.0, 0.0)[None], (1, 6)), row(0, 0.25, 0.75, 0.75, 0.25, 0))


def test_maps_are_normalized_on_the_grid_before_they_are_upsampled():
    """Grids A = (0, 1, 0), background only, and B = (0, 0, 2), its object at the last of 6 pixels.

    per_image, grid first (DenseAV's order): A -> (0, 1, 0) -> (0, .25, .75, .75, .25, 0);
      B -> (0, 0, 1) -> (0, 0, 0, .25, .75, 1). B's object pixel, 1, is alone on top: AP 1, and
      `> 15/19` keeps only it: IoU 1.
    per_image, upsampled first (avsync before): A -> (0, .25, .75, .75, .25, 0) -> (0, 1/3, 1, 1, 1/3, 0),
      whose peak now ties B's object pixel: AP 1/3 (1 object in 3 at the top), best IoU 1/3.
    dataset: the order does not matter (one affine map for all): A -> (0, .125, .375, .375, .125, 0),
      B -> (0, 0, 0, .25, .75, 1) either way: AP 1, IoU 1.
    """
    grids = torch.stack([row(0.0, 1.0, 0.0), row(0.0, 0.0, 2.0)])
    masks = torch.zeros(2, 1, 6, dtype=torch.bool)
    masks[1, 0, 5] = True
    grid_first = localization_metrics(grids, masks, [0, 0], normalization="per_image")
    assert (grid_first.mean_ap, grid_first.mean_iou) == pytest.approx((1.0, 1.0))
    upsampled_first = normalize_maps(upsample_maps(grids, (1, 6)), "per_image")
    assert torch.allclose(upsampled_first[0], row(0, 1 / 3, 1, 1, 1 / 3, 0))
    old = localization_metrics(upsampled_first, masks, [0, 0], normalization="none")
    assert (old.mean_ap, old.mean_iou) == pytest.approx((1 / 3, 1 / 3))
    dataset = localization_metrics(grids, masks, [0, 0])
    assert (dataset.mean_ap, dataset.mean_iou) == pytest.approx((1.0, 1.0))
    upsampled = localization_metrics(upsample_maps(grids, (1, 6)), masks, [0, 0])
    assert (upsampled.mean_ap, upsampled.mean_iou) == (dataset.mean_ap, dataset.mean_iou)


# ------------------------------------------------------------------------------------------ 3. empty classes
def test_a_class_without_object_pixels_scores_zero_and_stays_in_the_means():
    """Class "seen": a perfect map (AP 1, IoU 1); class "empty": no object pixel (AP 0, IoU 0).
    Means over both classes: (1 + 0) / 2."""
    masks = square_masks(2)
    masks[1] = False
    maps = torch.stack([masks[0].float(), torch.zeros(16, 16)])  # min 0, max 1: normalization is the identity
    result = localization_metrics(maps, masks, [0, 1], ["seen", "empty"])
    assert result.empty == ["empty"]
    assert (result.per_class["empty"].ap, result.per_class["empty"].iou) == (0.0, 0.0)
    assert (result.per_class["seen"].ap, result.per_class["seen"].iou) == pytest.approx((1.0, 1.0))
    assert (result.mean_ap, result.mean_iou) == pytest.approx((0.5, 0.5))
    with warnings.catch_warnings():  # torchmetrics says so too (DenseAV's AP is torchmetrics')
        warnings.simplefilter("ignore")
        assert float(binary_average_precision(maps[1].flatten(), masks[1].flatten().long())) == 0.0
    written = json.loads(json.dumps(result.to_json()))
    assert written["empty_classes"] == ["empty"] and written["classes"] == 2 and written["images"] == 2
    assert written["per_class"]["empty"]["ap"] == 0.0 and written["mAP"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- 4. thresholds
def test_thresholds_are_a_float32_linspace_and_a_pixel_counts_when_strictly_above():
    """Scores (0, .76, .76, x, 1), objects at x and 1, where x = float32(15/19) = 0.78947371.

    float32 `torch.linspace(0, 1, 20)` puts threshold 15 at 0.78947365, one float32 step below x: at it
    {x, 1} are predicted, IoU 1. Thresholds computed in float64 and cast down put it at x itself, where
    `x > x` is false: {1} alone, IoU 1/2; threshold 14 (0.7368) adds the two .76: 2/4.
    """
    x = torch.tensor(15 / 19, dtype=torch.float32)
    scores = row(0.0, 0.76, 0.76, float(x), 1.0)
    targets = row(0, 0, 0, 1, 1).bool()
    thresholds = iou_thresholds(scores)
    assert thresholds.dtype == torch.float32 and len(thresholds) == 20
    assert torch.equal(thresholds, torch.linspace(torch.tensor(0.0), torch.tensor(1.0), 20))
    assert thresholds[15] < x and thresholds[15] == torch.tensor(0.78947365, dtype=torch.float32)
    assert best_iou(scores, targets) == (1.0, float(thresholds[15]))
    float64_cast = torch.linspace(0.0, 1.0, 20, dtype=torch.float64).float()
    assert float64_cast[15] == x and iou_at_thresholds(scores, targets, float64_cast).max() == 0.5
    result = localization_metrics(scores[None], targets[None], [0])  # min 0, max 1: scores unchanged
    assert result.mean_iou == 1.0


def test_thresholds_span_each_class_s_scored_maps_not_zero_to_one():
    """Raw maps: class a (0, 4), class b (2, 4), object at b's second pixel. Dataset-normalized: a (0, 1),
    b (.5, 1). Class b's thresholds run from .5 to 1, and the first, .5, already isolates its object."""
    maps = torch.stack([row(0.0, 4.0), row(2.0, 4.0)])
    masks = torch.stack([row(0, 1), row(0, 1)]).bool()
    result = localization_metrics(maps, masks, [0, 1], ["a", "b"])
    assert result.per_class["b"].threshold == 0.5 and result.per_class["b"].iou == 1.0
    assert result.per_class["a"].threshold == 0.0


def test_best_iou_counts_an_empty_union_as_zero_and_the_maximum_predicts_nothing():
    # 4 object pixels at 0.9, 2 distractors at 0.6, 10 background pixels at 0.
    scores = torch.tensor([0.9] * 4 + [0.6] * 2 + [0.0] * 10)
    targets = torch.tensor([True] * 4 + [False] * 12)
    thresholds = iou_thresholds(scores)
    assert thresholds[0] == 0.0 and thresholds[-1] == torch.tensor(0.9)
    ious = iou_at_thresholds(scores, targets, thresholds)
    below, between = thresholds < 0.6, (thresholds >= 0.6) & (thresholds < thresholds[-1])
    assert torch.allclose(ious[below], torch.tensor(4 / 6, dtype=torch.float64))  # 4 / (4 + 2)
    assert torch.all(ious[between] == 1.0) and ious[-1] == 0.0  # nothing is above the max
    nothing = torch.zeros(3, dtype=torch.bool)
    assert iou_at_thresholds(torch.zeros(3), nothing, torch.tensor([0.0])).tolist() == [0.0]  # 0 / 0 -> 0


# ---------------------------------------------------------------------------------------------- AP, pooling
def test_average_precision_is_torchmetrics_exact_ap_which_scikit_learn_agrees_with():
    generator = torch.Generator().manual_seed(3)
    masks = square_masks(4, seed=4)
    scores = masks.float() * 0.5 + torch.rand(masks.shape, generator=generator)
    scores[0, :4, :4] = 0.5  # ties
    expected = float(binary_average_precision(scores.flatten(), masks.flatten().long()))
    assert pixel_average_precision(scores, masks) == expected
    sklearn = average_precision_score(masks.flatten().numpy(), scores.flatten().numpy())
    assert expected == pytest.approx(sklearn, abs=1e-6)


def test_a_perfect_map_scores_one_and_an_inverted_map_scores_low():
    masks = square_masks(3)
    fraction = masks.float().mean().item()
    perfect = localization_metrics(masks.float(), masks, [0, 0, 0])
    assert perfect.mean_ap == pytest.approx(1.0) and perfect.mean_iou == pytest.approx(1.0)
    inverted = localization_metrics((~masks).float(), masks, [0, 0, 0])
    # every object pixel ties at the bottom: precision never exceeds the object fraction
    assert inverted.mean_ap == pytest.approx(fraction, abs=1e-6)
    # `scores > t` never selects the tied bottom, so no threshold finds an object pixel
    assert inverted.mean_iou == 0.0


def test_classes_pool_their_images_and_the_means_are_over_classes():
    size = 8
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    maps = torch.zeros(3, size, size)
    maps[0][masks[0]] = 1.0  # class 0: perfect
    maps[0, 0, 0] = 0.6
    maps[1][masks[1]] = 0.5  # class 1, image 1: the object below one bright background pixel
    maps[1, 7, 7] = 1.0
    maps[2][masks[2]] = 1.0  # class 1, image 2: perfect
    result = localization_metrics(maps, masks, [0, 1, 1], ["dog", "bell"])
    assert list(result.per_class) == ["dog", "bell"]
    assert result.per_class["dog"].ap == pytest.approx(1.0) and result.per_class["dog"].images == 1
    pooled = average_precision_score(masks[1:].flatten().numpy(), maps[1:].flatten().numpy())
    assert result.per_class["bell"].ap == pytest.approx(pooled, abs=1e-6)
    per_image = [
        average_precision_score(masks[i].flatten().numpy(), maps[i].flatten().numpy()) for i in (1, 2)
    ]
    assert abs(pooled - np.mean(per_image)) > 1e-3  # pooling is not averaging per image
    assert result.mean_ap == pytest.approx((1.0 + pooled) / 2)
    assert result.mean_iou == pytest.approx((result.per_class["dog"].iou + result.per_class["bell"].iou) / 2)


# ---------------------------------------------------------------------------------------------- accumulation
def test_accumulated_grid_maps_give_the_one_shot_result_with_the_whole_set_s_range():
    generator = torch.Generator().manual_seed(7)
    masks = square_masks(7, seed=8)
    grids = torch.rand(7, 4, 4, generator=generator) * 5 - 2
    grids[3:] += 10  # later batches have another range: one min and max over all batches is needed
    classes = torch.tensor([0, 2, 0, 2, 2, 0, 2])
    scores = LocalizationScores(["a", "b", "c"])
    for part in (slice(0, 2), slice(2, 3), slice(3, 7)):
        scores.update(grids[part], masks[part], classes[part])
    assert scores.maps[0].shape == (2, 4, 4)  # the grids are kept, not 16x16 upsampled maps
    assert scores.limits() == (float(grids.min()), float(grids.max()))
    accumulated, one_shot = scores.compute(), localization_metrics(grids, masks, classes, ["a", "b", "c"])
    assert list(accumulated.per_class) == ["a", "c"]  # classes never prompted are absent
    for name in ("a", "c"):
        assert accumulated.per_class[name].ap == one_shot.per_class[name].ap
        assert accumulated.per_class[name].iou == one_shot.per_class[name].iou
    per_batch = [localization_metrics(grids[p], masks[p], classes[p]) for p in (slice(0, 3), slice(3, 7))]
    assert all(abs(r.mean_ap - one_shot.mean_ap) > 1e-4 for r in per_batch)
    with pytest.raises(ValueError, match="outside"):
        scores.update(grids[:1], masks[:1], torch.tensor([3]))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must be"):
        localization_metrics(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4, dtype=torch.bool), [0, 0])
    with pytest.raises(ValueError, match="class indices"):
        localization_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool), [0])
    with pytest.raises(ValueError, match="must agree"):
        LocalizationScores().update(torch.zeros(2, 4, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- all together
def denseav_scores(grids: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor) -> tuple[float, float]:
    """DenseAV's computation restated: one min and max over the whole set on the grid, bilinear to the
    masks, per class torchmetrics AP and the best IoU of `> t` over a float32 linspace of 20, union 0 ->
    IoU 0; torch means over all classes."""
    maps = grids - grids.min()
    maps = maps / maps.max()
    maps = F.interpolate(maps[:, None], size=tuple(masks.shape[-2:]), mode="bilinear")[:, 0]
    aps, ious = [], []
    for prompt in torch.unique(classes):
        scores, truth = maps[classes == prompt].flatten(), masks[classes == prompt].flatten()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aps.append(binary_average_precision(scores, truth.long()))
        thresholds = torch.linspace(scores.min(), scores.max(), 20)
        predicted = scores[None] > thresholds[:, None]
        union = (predicted | truth).sum(1).float()
        ious.append(((predicted & truth).sum(1).float() / torch.where(union == 0, 1.0, union)).max())
    return float(torch.stack(aps).mean()), float(torch.stack(ious).mean())


def test_the_whole_protocol_matches_denseav_s_computation_on_random_maps():
    generator = torch.Generator().manual_seed(11)
    for trial in range(2):
        masks = square_masks(12, size=32, seed=trial)
        masks[5] = False  # with class 3 alone in image 5, class 3 has no object pixel
        classes = torch.tensor([0, 1, 2, 0, 1, 3, 2, 0, 1, 2, 0, 1])
        grids = (
            torch.randn(12, 2, 2, generator=generator) + 0.5 * F.avg_pool2d(masks[:, None].float(), 16)[:, 0]
        )
        result = localization_metrics(grids, masks, classes)
        assert result.empty == ["3"]
        expected_ap, expected_iou = denseav_scores(grids, masks, classes)
        assert result.mean_ap == pytest.approx(expected_ap, abs=1e-6)
        assert result.mean_iou == pytest.approx(expected_iou, abs=1e-6)
        assert not math.isnan(result.mean_ap)
