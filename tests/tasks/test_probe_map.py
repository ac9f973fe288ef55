"""The probe's mAP is CAV-MAE's: `calculate_stats` (src/utilities/stats.py) takes sklearn's
`average_precision_score` of each class's raw scores and the mean over all classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchmetrics.classification import MultilabelAveragePrecision

from avsync.tasks.probe.objective import MeanAveragePrecision, average_precisions, probe_metrics


def cavmae_map(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """CAV-MAE's evaluation: per class sklearn AP of the raw outputs, then `np.mean`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes without positives
        per_class = [
            average_precision_score(targets[:, k].numpy(), scores[:, k].double().numpy())
            for k in range(targets.shape[1])
        ]
    return float(np.mean(per_class))


def multilabel_data(clips: int = 300, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(clips, classes, generator=generator) < 0.3).long()
    # logits as a well-trained probe with scaled-up outputs gives them: up to |40|
    logits = 12 * (targets * 1.2 + torch.randn(clips, classes, generator=generator))
    return logits.float(), targets


def test_large_logits_are_ranked_as_they_are():
    logits, targets = multilabel_data()
    saturated = logits.sigmoid()
    assert (saturated == 1.0).sum() > 50  # the float32 sigmoid ties these logits
    expected = cavmae_map(logits, targets)
    metric = MeanAveragePrecision(num_classes=7)
    metric.update(logits, targets)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    # the sigmoid-first torchmetrics metric does not match on the same data
    reference = MultilabelAveragePrecision(num_labels=7, average="macro")(logits, targets).item()
    assert abs(reference - expected) > 1e-3


def test_a_batch_whose_logits_lie_in_0_1_is_not_treated_differently():
    logits, targets = multilabel_data(clips=200, seed=1)
    logits[:40] = torch.rand(40, 7, generator=torch.Generator().manual_seed(2))  # a batch inside [0, 1]
    metric = probe_metrics("multilabel", 7, prefix="val/")
    for start in range(0, 200, 40):
        metric.update(logits[start : start + 40], targets[start : start + 40])
    assert metric.compute()["val/mAP"].item() == pytest.approx(cavmae_map(logits, targets), abs=1e-6)


def test_a_class_without_positives_counts_as_zero_in_the_mean():
    logits, targets = multilabel_data(clips=120, classes=5, seed=3)
    targets[:, 2] = 0
    per_class = average_precisions(logits, targets)
    assert per_class[2].item() == 0.0
    assert per_class.mean().item() == pytest.approx(cavmae_map(logits, targets), abs=1e-9)
    assert per_class.mean().item() == pytest.approx(per_class[[0, 1, 3, 4]].sum().item() / 5, abs=1e-12)


def test_tied_scores_enter_together_as_in_sklearn():
    scores = torch.tensor([[3.0], [3.0], [2.0], [2.0], [2.0], [1.0]])
    targets = torch.tensor([[0], [1], [1], [0], [1], [0]])
    # thresholds 3, 2, 1: (R, P) = (1/3, 1/2), (1, 3/5), (1, 1/2) -> AP = 1/3 * 1/2 + 2/3 * 3/5
    assert average_precisions(scores, targets).item() == pytest.approx(1 / 6 + 2 / 5, abs=1e-12)
    assert average_precisions(scores, targets).item() == pytest.approx(cavmae_map(scores, targets), abs=1e-12)


def test_class_chunks_do_not_change_the_result():
    logits, targets = multilabel_data(clips=90, classes=11, seed=4)
    assert torch.equal(average_precisions(logits, targets, chunk=3), average_precisions(logits, targets))


def test_wrong_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        MeanAveragePrecision(num_classes=4).update(torch.zeros(2, 3), torch.zeros(2, 3))
