"""MAE masking decided by per-token noise: sort the noise, keep the lowest `int(N * (1 - ratio))` tokens.

Passing the noise in (instead of drawing it inside the model) makes a masked forward pass exactly
reproducible, which the conformance tests and resumable training rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange, repeat

AudioMaskMode = Literal["unstructured", "time", "freq", "time_freq"]

#: Noise value that forces a token to be masked (uniform noise is below 1).
_FORCE_MASK = 1.1


@dataclass
class Masking:
    """Which tokens survive: `keep` (B, K) indices in noise order, `restore` (B, N) the inverse
    permutation, `mask` (B, N) with 1 where a token was removed (the reconstruction targets)."""

    keep: torch.Tensor
    restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    def select(self, tokens: torch.Tensor) -> torch.Tensor:
        """The kept tokens of `(B, N, D)`, in noise order."""
        return torch.gather(tokens, 1, repeat(self.keep, "b k -> b k d", d=tokens.shape[-1]))

    def fill(self, kept: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`select`: kept tokens back at their positions, `mask_token` everywhere else."""
        batch, _, dim = kept.shape
        removed = mask_token.expand(batch, self.restore.shape[1] - self.num_kept, dim).to(kept.dtype)
        shuffled = torch.cat([kept, removed], dim=1)
        return torch.gather(shuffled, 1, repeat(self.restore, "b n -> b n d", d=dim))


def kept_count(num_tokens: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
    return int(num_tokens * (1 - ratio))


def mask_from_noise(noise: torch.Tensor, ratio: float) -> Masking:
    """Unstructured per-sample masking: tokens with the smallest noise are kept."""
    keep_count = kept_count(noise.shape[1], ratio)
    order = torch.argsort(noise, dim=1)
    restore = torch.argsort(order, dim=1)
    mask = (restore >= keep_count).to(noise.dtype)
    return Masking(keep=order[:, :keep_count], restore=restore, mask=mask)


def structure_audio_noise(
    noise: torch.Tensor, mode: AudioMaskMode, freq_patches: int, time_patches: int, ratio: float
) -> torch.Tensor:
    """Turn token noise into structured noise by forcing whole time columns and/or frequency rows out.

    The columns (rows) removed are those whose mean noise is largest, so the noise alone still decides
    the mask. `time` and `freq` remove `int(n * ratio)` columns/rows; `time_freq` removes
    `int(n * ratio * 0.7)` of each (the authors' ablation settings); leftover masking is unstructured.
    """
    if mode == "unstructured":
        return noise
    if mode not in ("time", "freq", "time_freq"):
        raise ValueError(f"unknown audio masking mode {mode!r}; use unstructured, time, freq or time_freq")
    grid = rearrange(noise, "b (f t) -> b f t", f=freq_patches, t=time_patches).clone()
    share = 0.7 if mode == "time_freq" else 1.0
    if mode in ("time", "time_freq"):
        count = int(time_patches * ratio * share)
        columns = grid.mean(dim=1).topk(count, dim=1).indices  # (B, count)
        grid.scatter_(2, repeat(columns, "b k -> b f k", f=freq_patches), _FORCE_MASK)
    if mode in ("freq", "time_freq"):
        count = int(freq_patches * ratio * share)
        rows = grid.mean(dim=2).topk(count, dim=1).indices
        grid.scatter_(1, repeat(rows, "b k -> b k t", t=time_patches), _FORCE_MASK)
    return rearrange(grid, "b f t -> b (f t)")
