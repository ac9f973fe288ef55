"""What the probe is trained on and scored by, for the two tasks of the paper.

- `multilabel` (AudioSet): binary cross-entropy per class; macro mean average precision.
- `multiclass` (VGGSound): cross-entropy; top-1 and top-5 accuracy over clips.

Labels arrive as the data module gives them: multi-hot float `(B, C)` or class indices int64 `(B,)`.
Training uses soft targets `(B, C)` so that label smoothing and mixup apply to both tasks alike.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

ProbeTask = Literal["multilabel", "multiclass"]


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.ndim == 1:
        if labels.dtype.is_floating_point:
            raise ValueError(f"class-index labels must be integers, got {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class index out of range [0, {num_classes}): {labels.min()}..{labels.max()}")
    elif labels.ndim != 2 or labels.shape[1] != num_classes:
        raise ValueError(
            f"labels must be (B,) class indices or (B, {num_classes}) multi-hot; got {tuple(labels.shape)}"
        )


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Float targets `(B, C)`: one-hot or multi-hot, smoothed as `y (1 - s) + s / C`."""
    check_labels(labels, num_classes)
    targets = F.one_hot(labels, num_classes).float() if labels.ndim == 1 else labels.float()
    return targets * (1 - smoothing) + smoothing / num_classes if smoothing else targets


def metric_targets(labels: torch.Tensor, task: ProbeTask, num_classes: int) -> torch.Tensor:
    """Targets in torchmetrics' form: multi-hot int `(B, C)` (multilabel) or indices `(B,)` (multiclass)."""
    check_labels(labels, num_classes)
    if task == "multilabel":
        return F.one_hot(labels, num_classes) if labels.ndim == 1 else (labels > 0.5).long()
    if labels.ndim == 1:
        return labels
    positives = (labels > 0.5).sum(dim=1)
    if (positives != 1).any():
        raise ValueError("multiclass probing needs exactly one positive class per clip; use task=multilabel")
    return labels.argmax(dim=1)


def probe_loss(logits: torch.Tensor, targets: torch.Tensor, task: ProbeTask) -> torch.Tensor:
    """BCE (multilabel) or cross-entropy against soft targets (multiclass), averaged over the batch."""
    logits = logits.float()
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


def mixup(
    features: torch.Tensor, targets: torch.Tensor, rate: float, alpha: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each clip, with probability `rate`, with a random partner from the batch:
    `x = lam x_i + (1 - lam) x_j`, targets alike, `lam ~ Beta(alpha, alpha)` per clip.

    CAV-MAE's recipe (which the paper's probing follows): `rate` 0.5, `alpha` 10, i.e. half the clips
    are blended with mostly-equal weights. Works on any `(B, ...)` features and `(B, C)` targets."""
    if not 0.0 <= rate <= 1.0 or alpha <= 0:
        raise ValueError(f"mixup needs 0 <= rate <= 1 and alpha > 0, got rate={rate}, alpha={alpha}")
    batch = features.shape[0]
    if rate == 0 or batch < 2:
        return features, targets
    device = features.device
    concentration = torch.tensor(float(alpha), device=device)
    lam = torch.distributions.Beta(concentration, concentration).sample((batch,))
    lam = torch.where(torch.rand(batch, device=device) < rate, lam, torch.ones_like(lam))
    partner = torch.randperm(batch, device=device)
    weight = lam.reshape(batch, *([1] * (features.ndim - 1))).to(features.dtype)
    mixed_features = weight * features + (1 - weight) * features[partner]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]
    return mixed_features, mixed_targets


def probe_metrics(task: ProbeTask, num_classes: int, prefix: str) -> MetricCollection:
    """`{prefix}mAP` (macro over classes; a class without positives counts as AP 0, as in the authors'
    evaluation) or `{prefix}top1` / `{prefix}top5` (share of clips whose class is among the k best)."""
    if task == "multilabel":
        metrics = {"mAP": MultilabelAveragePrecision(num_labels=num_classes, average="macro")}
    else:
        metrics = {"top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)
