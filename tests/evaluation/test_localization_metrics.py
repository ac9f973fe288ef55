"""Sound-prompted segmentation metrics (DenseAV protocol) on hand-made maps and masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from avsync.evaluation.localization import (
    LocalizationScores,
    best_iou,
    iou_at_thresholds,
    iou_thresholds,
    localization_metrics,
    normalize_maps,
    pixel_average_precision,
)


def square_masks(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """`count` masks, each with one random axis-aligned square of object pixels."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for mask in masks:
        side = int(torch.randint(3, size // 2, (), generator=generator))
        y, x = torch.randint(0, size - side, (2,), generator=generator).tolist()
        mask[y : y + side, x : x + side] = True
    return masks


def reference_best_iou(scores: np.ndarray, targets: np.ndarray, k: int = 20) -> float:
    """DenseAV's definition written out plainly: k thresholds from min to max, `scores > t`."""
    best = 0.0
    for threshold in np.linspace(scores.min(), scores.max(), k):
        predicted = scores > threshold
        union = np.logical_or(predicted, targets).sum()
        best = max(best, np.logical_and(predicted, targets).sum() / union if union else 0.0)
    return best


def test_maps_are_normalized_one_by_one_and_constant_maps_become_zero():
    maps = torch.stack(
        [torch.linspace(-2, 6, 16).reshape(4, 4), torch.full((4, 4), 3.0), torch.rand(4, 4) * 0.01]
    )
    normalized = normalize_maps(maps)
    assert normalized[0].min() == 0 and normalized[0].max() == 1
    assert torch.allclose(normalized[0], (maps[0] + 2) / 8)
    assert torch.equal(normalized[1], torch.zeros(4, 4))
    assert normalized[2].min() == 0 and normalized[2].max() == pytest.approx(1)


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


def test_best_iou_searches_twenty_thresholds_between_min_and_max():
    # 4 object pixels at 0.9, 2 distractors at 0.6, 10 background pixels at 0.
    scores = torch.tensor([0.9] * 4 + [0.6] * 2 + [0.0] * 10)
    targets = torch.tensor([True] * 4 + [False] * 12)
    thresholds = iou_thresholds(scores)
    assert len(thresholds) == 20 and thresholds[0] == 0.0 and thresholds[-1] == pytest.approx(0.9)
    ious = iou_at_thresholds(scores, targets, thresholds)
    below, between = thresholds < 0.6, (thresholds >= 0.6) & (thresholds < thresholds[-1])
    assert torch.allclose(ious[below], torch.tensor(4 / 6, dtype=torch.float64))
    assert torch.all(ious[between] == 1.0) and ious[-1] == 0.0  # nothing is above the max
    iou, threshold = best_iou(scores, targets)
    assert iou == 1.0
    assert threshold == pytest.approx(13 * 0.9 / 19)  # the first grid threshold at or above 0.6


def test_best_iou_matches_the_plain_definition_on_random_maps():
    generator = torch.Generator().manual_seed(1)
    masks = square_masks(5, seed=2)
    for noise in (0.3, 1.0, 3.0):
        scores = masks.float() + noise * torch.rand(masks.shape, generator=generator) + 0.2
        iou, _ = best_iou(scores, masks)
        assert iou == pytest.approx(reference_best_iou(scores.numpy(), masks.numpy()), abs=1e-12)


def test_average_precision_agrees_with_scikit_learn():
    generator = torch.Generator().manual_seed(3)
    masks = square_masks(4, seed=4)
    scores = masks.float() * 0.5 + torch.rand(masks.shape, generator=generator)
    expected = average_precision_score(masks.flatten().numpy(), scores.flatten().numpy())
    assert pixel_average_precision(scores, masks) == pytest.approx(expected, abs=1e-6)
    assert math.isnan(pixel_average_precision(scores, torch.zeros_like(masks)))


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
    pooled = average_precision_score(masks[1:].flatten().numpy(), normalize_maps(maps[1:]).flatten().numpy())
    assert result.per_class["bell"].ap == pytest.approx(pooled, abs=1e-6)
    per_image = [
        average_precision_score(masks[i].flatten().numpy(), maps[i].flatten().numpy()) for i in (1, 2)
    ]
    assert abs(pooled - np.mean(per_image)) > 1e-3  # pooling is not averaging per image
    assert result.per_class["bell"].iou == pytest.approx(
        reference_best_iou(normalize_maps(maps[1:]).numpy(), masks[1:].numpy())
    )
    assert result.mean_ap == pytest.approx((1.0 + pooled) / 2)
    assert result.mean_iou == pytest.approx((result.per_class["dog"].iou + result.per_class["bell"].iou) / 2)


def test_a_map_favouring_the_object_beats_one_that_does_not():
    generator = torch.Generator().manual_seed(5)
    masks = square_masks(6, seed=6)
    noise = torch.rand(masks.shape, generator=generator)
    favouring = localization_metrics(masks.float() + noise, masks, [0, 1, 0, 1, 0, 1])
    ignoring = localization_metrics(noise, masks, [0, 1, 0, 1, 0, 1])
    assert favouring.mean_ap > ignoring.mean_ap + 0.3
    assert favouring.mean_iou > ignoring.mean_iou + 0.3


def test_accumulated_batches_give_the_one_shot_result():
    generator = torch.Generator().manual_seed(7)
    masks = square_masks(7, seed=8)
    maps = masks.float() * 0.3 + torch.rand(masks.shape, generator=generator) * 5 - 2  # not normalized
    classes = torch.tensor([0, 2, 0, 2, 2, 0, 2])
    scores = LocalizationScores(["a", "b", "c"])
    for part in (slice(0, 2), slice(2, 3), slice(3, 7)):
        scores.update(maps[part], masks[part], classes[part])
    accumulated, one_shot = scores.compute(), localization_metrics(maps, masks, classes, ["a", "b", "c"])
    assert list(accumulated.per_class) == ["a", "c"]  # classes never prompted are absent
    for name in ("a", "c"):
        assert accumulated.per_class[name].ap == pytest.approx(one_shot.per_class[name].ap)
        assert accumulated.per_class[name].iou == pytest.approx(one_shot.per_class[name].iou)
    with pytest.raises(ValueError, match="outside"):
        scores.update(maps[:1], masks[:1], torch.tensor([3]))


def test_a_class_without_object_pixels_is_undefined_and_left_out_of_the_means():
    masks = square_masks(2)
    masks[1] = False
    result = localization_metrics(masks.float(), masks, [0, 1], ["seen", "empty"])
    assert result.undefined == ["empty"]
    assert math.isnan(result.per_class["empty"].ap)
    assert result.mean_ap == pytest.approx(1.0) and result.mean_iou == pytest.approx(1.0)
    written = json.loads(json.dumps(result.to_json()))  # NaN is not JSON: written as null
    assert written["per_class"]["empty"]["ap"] is None and written["classes"] == 1 and written["images"] == 2


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must both be"):
        localization_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool), [0, 0])
    with pytest.raises(ValueError, match="class indices"):
        localization_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool), [0])
