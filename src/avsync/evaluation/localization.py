"""Sound-prompted segmentation metrics (SPEC §4, the DenseAV protocol), as pure functions on tensors.

A heat map scores every pixel of a model-input image for "this pixel makes the prompt's sound"; a mask
marks the pixels that do. The protocol:

1. each heat map is min-max normalized on its own (a constant map becomes all zeros);
2. per prompt class, the pixels of *all* that class's images are pooled;
3. AP: pixel-level average precision of the pooled scores (exact: every distinct score is a threshold);
4. IoU: the best IoU over 20 thresholds evenly spaced between the pooled scores' min and max; a pixel
   is predicted positive when its score is strictly above the threshold (as DenseAV's `multi_iou`), and
   a threshold with an empty union scores 0;
5. mAP and mIoU are the means over classes.

A class whose masks hold no object pixel at all has no AP (recall is undefined); it is reported with
NaN scores, listed in `undefined`, and left out of both means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_average_precision
from torchmetrics.utilities import dim_zero_cat

#: DenseAV's number of IoU thresholds.
NUM_IOU_THRESHOLDS = 20


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each map of `(N, H, W)` to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1).float()
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalized = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return normalized.reshape(maps.shape)


def pixel_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of pixel `scores` against boolean `targets` (equal shapes); NaN without positives."""
    targets = targets.flatten().bool()
    if not targets.any():
        return math.nan
    return float(binary_average_precision(scores.flatten().float(), targets.long(), validate_args=False))


def iou_at_thresholds(scores: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """IoU of `scores > t` with `targets` for every `t` in `thresholds`, `(K,)`.

    Counts come from sorted scores (`searchsorted`), so memory stays linear in the pixels however many
    thresholds there are.
    """
    scores, targets = scores.flatten().float(), targets.flatten().bool()
    positives = torch.sort(scores[targets]).values
    negatives = torch.sort(scores[~targets]).values
    thresholds = thresholds.to(scores)

    def above(sorted_scores: torch.Tensor) -> torch.Tensor:
        return len(sorted_scores) - torch.searchsorted(sorted_scores, thresholds, right=True)

    intersection = above(positives).double()
    union = len(positives) + above(negatives).double()
    return torch.where(union > 0, intersection / union.clamp_min(1), 0.0)


def iou_thresholds(scores: torch.Tensor, num_thresholds: int = NUM_IOU_THRESHOLDS) -> torch.Tensor:
    """`num_thresholds` values evenly spaced between the scores' min and max (both included)."""
    return torch.linspace(float(scores.min()), float(scores.max()), num_thresholds, dtype=torch.float64)


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
    """`mean_ap` / `mean_iou` over the classes in `per_class` that have object pixels; `undefined`: the
    others (NaN scores, left out of the means)."""

    mean_ap: float
    mean_iou: float
    per_class: dict[str, ClassScore]
    undefined: list[str]

    @property
    def images(self) -> int:
        return sum(score.images for score in self.per_class.values())

    def to_json(self) -> dict:
        return {
            "mAP": _json_float(self.mean_ap),
            "mIoU": _json_float(self.mean_iou),
            "classes": len(self.per_class) - len(self.undefined),
            "images": self.images,
            "per_class": {name: score.to_json() for name, score in self.per_class.items()},
            "undefined_classes": self.undefined,
        }


def localization_metrics(
    maps: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
    num_thresholds: int = NUM_IOU_THRESHOLDS,
    normalize: bool = True,
) -> LocalizationResult:
    """mAP and mIoU of heat `maps` `(N, H, W)` against boolean `masks` `(N, H, W)`, image `n` prompted
    with class index `classes[n]`. `normalize=False` when the maps are already min-max normalized.
    Classes are reported by `class_names[index]` (default: the index), in index order."""
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(
            f"maps and masks must both be (N, H, W); got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if len(classes) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(classes)} class indices")
    if normalize:
        maps = normalize_maps(maps)
    per_class: dict[str, ClassScore] = {}
    undefined: list[str] = []
    for index in torch.unique(classes).tolist():
        name = str(index) if class_names is None else class_names[index]
        chosen = classes == index
        scores, targets = maps[chosen], masks[chosen].bool()
        if not targets.any():
            per_class[name] = ClassScore(math.nan, math.nan, math.nan, int(chosen.sum()), 0.0)
            undefined.append(name)
            continue
        iou, threshold = best_iou(scores, targets, num_thresholds)
        per_class[name] = ClassScore(
            pixel_average_precision(scores, targets),
            iou,
            threshold,
            int(chosen.sum()),
            float(targets.float().mean()),
        )
    defined = [score for name, score in per_class.items() if name not in undefined]
    return LocalizationResult(
        mean_ap=_mean([score.ap for score in defined]),
        mean_iou=_mean([score.iou for score in defined]),
        per_class=per_class,
        undefined=undefined,
    )


class LocalizationScores(Metric):
    """Accumulates normalized maps, masks and prompt classes over batches (and ranks), then computes
    :func:`localization_metrics`. Exact AP needs every pixel, so the state grows with the images: one
    float and one bool per pixel (about 250 kB per 224x224 image)."""

    full_state_update = False

    def __init__(
        self, class_names: Sequence[str], num_thresholds: int = NUM_IOU_THRESHOLDS, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.num_thresholds = num_thresholds
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")
        self.add_state("classes", default=[], dist_reduce_fx="cat")

    def update(self, maps: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor) -> None:
        if not torch.all((classes >= 0) & (classes < len(self.class_names))):
            raise ValueError(f"class indices {classes.tolist()} outside 0..{len(self.class_names) - 1}")
        self.maps.append(normalize_maps(maps.detach()))
        self.masks.append(masks.detach().bool())
        self.classes.append(classes.detach().long())

    def compute(self) -> LocalizationResult:
        if not self.maps:
            return LocalizationResult(math.nan, math.nan, {}, [])
        return localization_metrics(
            dim_zero_cat(self.maps).cpu(),
            dim_zero_cat(self.masks).cpu(),
            dim_zero_cat(self.classes).cpu(),
            self.class_names,
            self.num_thresholds,
            normalize=False,
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _json_float(value: float) -> float | None:
    """NaN is not JSON; undefined scores are written as null."""
    return None if math.isnan(value) else value
