"""What the probe is trained on and scored by, for the two tasks of the paper.

- `multilabel` (AudioSet): binary cross-entropy per class; macro mean average precision, computed as
  CAV-MAE's `calculate_stats` does (below).
- `multiclass` (VGGSound): cross-entropy; top-1 and top-5 accuracy over clips.

Labels arrive as the data module gives them: multi-hot float `(B, C)` or class indices int64 `(B,)`.
Training uses soft targets `(B, C)` so that label smoothing and mixup apply to both tasks alike.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat

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
    # A random cycle through the batch: every clip gets a partner other than itself (a plain permutation
    # leaves one clip per batch unmixed on average; CAV-MAE draws the partner from the whole set).
    order = torch.randperm(batch, device=device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)
    weight = lam.reshape(batch, *([1] * (features.ndim - 1))).to(features.dtype)
    mixed_features = weight * features + (1 - weight) * features[partner]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]
    return mixed_features, mixed_targets


def average_precisions(scores: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Per-class average precision `(C,)` (float64) of scores `(N, C)` against 0/1 targets `(N, C)`.

    sklearn's `average_precision_score` definition: `sum_k (R_k - R_{k-1}) P_k` over the distinct score
    values, highest first, so tied scores enter together. Only the order of the scores matters, so raw
    logits are ranked as they are (a float32 sigmoid would tie every logit above ~16.6). A class
    without positives scores 0, as current sklearn gives it (with a warning). Classes go `chunk` at a time.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"scores and targets must both be (N, C); got {tuple(scores.shape)}, {tuple(targets.shape)}"
        )
    num, classes = scores.shape
    result = torch.zeros(classes, dtype=torch.float64)
    if num == 0:
        return result
    position = torch.arange(num, device=scores.device)[:, None]
    for start in range(0, classes, chunk):
        s = scores[:, start : start + chunk].double()
        order = s.argsort(dim=0, descending=True, stable=True)
        s, t = s.gather(0, order), (targets[:, start : start + chunk] > 0.5).double().gather(0, order)
        precision = t.cumsum(0) / (position + 1)
        # each clip takes the precision at the last clip of its run of equal scores
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        end = torch.where(last, position, num).flip(0).cummin(0).values.flip(0)
        positives = t.sum(0)
        ap = (t * precision.gather(0, end)).sum(0) / positives.clamp_min(1)
        result[start : start + chunk] = ap.cpu()
    return result


class MeanAveragePrecision(Metric):
    """Macro mAP as CAV-MAE's `calculate_stats` reports it: the mean over all classes of sklearn's
    average precision of the raw scores (`average_precisions`), a class without positives counting 0.

    Unlike torchmetrics' `MultilabelAveragePrecision`, nothing is squashed by a sigmoid (which ties
    large logits in float32, and is applied or not per batch depending on whether its logits lie in
    [0, 1]). States are flat tensors gathered over ranks with tensor collectives.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        if scores.ndim != 2 or scores.shape[1] != self.num_classes or targets.shape != scores.shape:
            raise ValueError(
                f"mAP needs scores and targets of shape (B, {self.num_classes}); got "
                f"{tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        # flat float32 (the probe's logits are float32): a rank without batches then syncs an empty
        # float32 vector, which torchmetrics gathers with the others
        self.scores.append(scores.detach().float().flatten())
        self.targets.append(targets.detach().float().flatten())

    def compute(self) -> torch.Tensor:
        if isinstance(self.scores, list) and not self.scores:  # (a list before a sync, a tensor after)
            return torch.tensor(float("nan"))
        scores = dim_zero_cat(self.scores).reshape(-1, self.num_classes)
        targets = dim_zero_cat(self.targets).reshape(-1, self.num_classes)
        return average_precisions(scores, targets).mean().float()


def probe_metrics(task: ProbeTask, num_classes: int, prefix: str) -> MetricCollection:
    """`{prefix}mAP` (`MeanAveragePrecision`: CAV-MAE's definition, on the logits) or `{prefix}top1` /
    `{prefix}top5` (share of clips whose class is among the k best)."""
    if task == "multilabel":
        metrics = {"mAP": MeanAveragePrecision(num_classes)}
    else:
        metrics = {"top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)
