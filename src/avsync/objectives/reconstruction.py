"""Masked-patch reconstruction loss (paper Eq. 2-4)."""

from __future__ import annotations

import torch


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize_target: bool
) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    `prediction`, `target`: `(B, N, P)` patches; `mask`: `(B, N)`, 1 where a patch was removed. With
    `normalize_target` each target patch is standardized first (MAE's `norm_pix_loss`).
    """
    target = target.float()
    if normalize_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = (prediction.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
