"""Sound-prompted segmentation metrics (SPEC §4), as pure functions on tensors: DenseAV's protocol.

DenseAV's evaluation code (`denseav/eval_utils.py`: `prep_heatmap`, `multi_iou`, `get_paired_heatmaps`;
averaged in `train.py` `semseg_validation`) is the specification. A heat map scores every pixel for
"this pixel makes the prompt's sound"; a mask marks the pixels that do. The protocol:

1. normalization (`"dataset"`, the default): one minimum is subtracted from, and one maximum divides,
   all the maps of the evaluation set together, on the patch grid (a positive affine map of the raw
   similarities, so the pixels keep their order across images); `"per_image"` rescales every map to
   its own [0, 1] instead (not DenseAV's);
2. then the maps are upsampled bilinearly (`align_corners=False`) to the masks' size;
3. per prompt class, the pixels of all that class's images are pooled;
4. AP: torchmetrics' exact pixel-level `binary_average_precision` of the pooled scores (as DenseAV);
5. IoU: the best IoU over 20 thresholds, a float32 `torch.linspace` between the pooled scores' min and
   max; a pixel is predicted when its score is strictly above the threshold, and an empty union scores 0;
6. a class whose masks hold no object pixel scores AP 0 and IoU 0 and stays in the means;
7. mAP and mIoU are the means over the prompted classes.

The earlier avsync protocol and what changed: `docs/localization.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_average_precision
from torchmetrics.utilities import dim_zero_cat

#: DenseAV's number of IoU thresholds.
NUM_IOU_THRESHOLDS = 20

#: `dataset`: one min and one max over all maps (DenseAV); `per_image`: each map its own range;
#: `none`: the maps are scored as given.
Normalization = Literal["dataset", "per_image", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


def check_normalization(normalization: str) -> str:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    return normalization


def value_range(maps: torch.Tensor) -> tuple[float, float]:
    """The `(min, max)` over all of `maps`: the dataset-wide constants of `"dataset"` normalization."""
    return float(maps.min()), float(maps.max())


def normalize_maps(
    maps: torch.Tensor, normalization: Normalization = "dataset", limits: tuple[float, float] | None = None
) -> torch.Tensor:
    """Min-max normalize heat maps `(N, h, w)` (float32).

    `"dataset"`: subtract the minimum over all maps, then divide by the maximum of the result, as
    DenseAV's `prep_heatmap` does to the whole evaluation set (`limits` gives other dataset-wide
    `(min, max)`, e.g. those of a whole set for a few of its maps). `"per_image"`: every map to its own
    [0, 1]. A map (or set) without any spread becomes zeros, where DenseAV would divide by zero.
    """
    check_normalization(normalization)
    maps = maps.float()
    if normalization == "none":
        return maps
    if normalization == "dataset":
        low, high = limits if limits is not None else value_range(maps)
        shifted = maps - torch.tensor(low, dtype=maps.dtype)
        span = torch.tensor(high, dtype=maps.dtype) - torch.tensor(low, dtype=maps.dtype)
        return shifted / span if span > 0 else torch.zeros_like(maps)
    flat = maps.flatten(1)
    shifted = flat - flat.min(dim=1, keepdim=True).values
    span = shifted.max(dim=1, keepdim=True).values
    normalized = torch.where(span > 0, shifted / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return normalized.reshape(maps.shape)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grid maps `(N, h, w)` bilinearly to `size` `(H, W)` (`align_corners=False`, DenseAV's call): the
    one place where heat maps meet the masks' resolution."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def pixel_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Exact average precision of pixel `scores` against boolean `targets` (torchmetrics, as DenseAV).
    Without object pixels it is 0, which is also what torchmetrics returns (with a warning)."""
    targets = targets.flatten().bool()
    if not targets.any():
        return 0.0
    return float(binary_average_precision(scores.flatten().float(), targets.long(), validate_args=False))


def iou_thresholds(scores: torch.Tensor, num_thresholds: int = NUM_IOU_THRESHOLDS) -> torch.Tensor:
    """`num_thresholds` float32 values evenly spaced from the scores' min to their max (both included),
    computed by float32 `torch.linspace` as DenseAV's `multi_iou` does (not float64 cast down: the
    two differ by one float32 step at some thresholds)."""
    scores = scores.float()
    return torch.linspace(scores.min(), scores.max(), num_thresholds, dtype=torch.float32)


def iou_at_thresholds(scores: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """IoU of `scores > t` with `targets` for every `t` in `thresholds`, `(K,)`; an empty union scores 0.

    Counts come from sorted scores (`searchsorted`), so memory stays linear in the pixels however many
    thresholds there are; the comparison is in float32, as DenseAV's.
    """
    scores, targets = scores.flatten().float(), targets.flatten().bool()
    positives = torch.sort(scores[targets]).values
    negatives = torch.sort(scores[~targets]).values
    thresholds = thresholds.float()

    def above(sorted_scores: torch.Tensor) -> torch.Tensor:
        return len(sorted_scores) - torch.searchsorted(sorted_scores, thresholds, right=True)

    intersection = above(positives).double()
    union = len(positives) + above(negatives).double()
    return torch.where(union > 0, intersection / union.clamp_min(1), 0.0)


def best_iou(
    scores: torch.Tensor, targets: torch.Tensor, num_thresholds: int = NUM_IOU_THRESHOLDS
) -> tuple[float, float]:
    """The best IoU over :func:`iou_thresholds` and the threshold that reaches it (the lowest, on ties)."""
    thresholds = iou_thresholds(scores, num_thresholds)
    ious = iou_at_thresholds(scores, targets, thresholds)
    best = int(torch.argmax(ious))
    return float(ious[best]), float(thresholds[best])


@dataclass
class ClassScore:
    """One prompt class: `ap`, the best `iou` and its `threshold`, over `images` images;
    `positive_rate`: the share of object pixels, which is the AP of an uninformative map (chance)."""

    ap: float
    iou: float
    threshold: float
    images: int
    positive_rate: float = math.nan

    def to_json(self) -> dict:
        return {
            "ap": _json_float(self.ap),
            "iou": _json_float(self.iou),
            "threshold": _json_float(self.threshold),
            "images": self.images,
            "positive_rate": _json_float(self.positive_rate),
        }


@dataclass
class LocalizationResult:
    """`mean_ap` / `mean_iou` over all prompted classes in `per_class`; `empty`: the classes whose masks
    hold no object pixel (scored 0, and counted in the means, as DenseAV does)."""

    mean_ap: float
    mean_iou: float
    per_class: dict[str, ClassScore]
    empty: list[str] = field(default_factory=list)
    normalization: str = "dataset"

    @property
    def images(self) -> int:
        return sum(score.images for score in self.per_class.values())

    def to_json(self) -> dict:
        return {
            "mAP": _json_float(self.mean_ap),
            "mIoU": _json_float(self.mean_iou),
            "classes": len(self.per_class),
            "images": self.images,
            "per_class": {name: score.to_json() for name, score in self.per_class.items()},
            "empty_classes": self.empty,
        }


def localization_metrics(
    maps: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
    num_thresholds: int = NUM_IOU_THRESHOLDS,
    normalization: Normalization = "dataset",
) -> LocalizationResult:
    """mAP and mIoU of heat `maps` `(N, h, w)` against boolean `masks` `(N, H, W)`, image `n` prompted
    with class index `classes[n]`. The maps are normalized where they are given (the patch grid, for
    DenseAV's order), then upsampled to the masks' size one class at a time (memory: one class's pixels).
    Classes are reported by `class_names[index]` (default: the index), in index order."""
    check_normalization(normalization)
    if maps.ndim != 3 or masks.ndim != 3 or len(maps) != len(masks):
        raise ValueError(
            f"maps and masks must be (N, h, w) and (N, H, W); got {tuple(maps.shape)}, {tuple(masks.shape)}"
        )
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if len(classes) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(classes)} class indices")
    maps = normalize_maps(maps, normalization)
    size = tuple(masks.shape[-2:])
    per_class: dict[str, ClassScore] = {}
    empty: list[str] = []
    for index in torch.unique(classes).tolist():
        name = str(index) if class_names is None else class_names[index]
        chosen = classes == index
        scores, targets = upsample_maps(maps[chosen], size), masks[chosen].bool()
        if not targets.any():
            empty.append(name)
        iou, threshold = best_iou(scores, targets, num_thresholds)
        per_class[name] = ClassScore(
            pixel_average_precision(scores, targets),
            iou,
            threshold,
            int(chosen.sum()),
            float(targets.float().mean()),
        )
    return LocalizationResult(
        mean_ap=_mean([score.ap for score in per_class.values()]),
        mean_iou=_mean([score.iou for score in per_class.values()]),
        per_class=per_class,
        empty=empty,
        normalization=normalization,
    )


class LocalizationScores(Metric):
    """Accumulates heat maps as they come (the patch grid: a few hundred floats each), masks and prompt
    classes over batches (and ranks); `compute` normalizes with the whole set's min and max, upsamples
    and scores (:func:`localization_metrics`). The state is dominated by the masks, one bool per pixel
    (50 kB per 224x224 image)."""

    full_state_update = False

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        num_thresholds: int = NUM_IOU_THRESHOLDS,
        normalization: Normalization = "dataset",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = None if class_names is None else list(class_names)
        self.num_thresholds = num_thresholds
        self.normalization = check_normalization(normalization)
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")
        self.add_state("classes", default=[], dist_reduce_fx="cat")

    def update(self, maps: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor) -> None:
        if maps.ndim != 3 or masks.ndim != 3 or not len(maps) == len(masks) == len(classes):
            raise ValueError(
                f"maps (N, h, w), masks (N, H, W) and classes (N,) must agree; got {tuple(maps.shape)}, "
                f"{tuple(masks.shape)} and {tuple(classes.shape)}"
            )
        known = math.inf if self.class_names is None else len(self.class_names)
        if not torch.all((classes >= 0) & (classes < known)):
            raise ValueError(f"class indices {classes.tolist()} outside 0..{known - 1}")
        self.maps.append(maps.detach().float())
        self.masks.append(masks.detach().bool())
        self.classes.append(classes.detach().long())

    def limits(self) -> tuple[float, float] | None:
        """The `(min, max)` of all maps so far (this rank's), or None before the first update."""
        return value_range(dim_zero_cat(self.maps)) if self.maps else None

    def compute(self) -> LocalizationResult:
        if not self.maps:
            return LocalizationResult(math.nan, math.nan, {}, [], self.normalization)
        return localization_metrics(
            dim_zero_cat(self.maps).cpu(),
            dim_zero_cat(self.masks).cpu(),
            dim_zero_cat(self.classes).cpu(),
            self.class_names,
            self.num_thresholds,
            self.normalization,
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _json_float(value: float) -> float | None:
    """NaN is not JSON; undefined scores are written as null."""
    return None if math.isnan(value) else value
