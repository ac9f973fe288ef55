"""Global tokens (paper §3.4): one learned token per modality, prepended to its patch tokens.

The contrastive objective reads only these tokens, so the patch tokens are free to serve the
reconstruction objective. With `enabled=False` the model falls back to CAV-MAE, whose "global"
representation is the mean of the normalized patch tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class GlobalTokens(nn.Module):
    def __init__(self, embed_dim: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        if enabled:
            # The authors draw these from N(0, 1) and never re-initialize them.
            self.audio = nn.Parameter(torch.randn(1, 1, embed_dim))
            self.video = nn.Parameter(torch.randn(1, 1, embed_dim))

    @property
    def count(self) -> int:
        """How many leading positions of a sequence the global token occupies (0 or 1)."""
        return int(self.enabled)

    def prepend(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        if not self.enabled:
            return tokens
        token = self.audio if modality == "audio" else self.video
        return torch.cat([token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sequence without its global token."""
        return tokens[:, self.count :]

    def split(self, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(global (B, D), patches (B, N, D))` from a normalized `[global, patches...]` sequence."""
        patches = self.patches(normalized)
        summary = normalized[:, 0] if self.enabled else patches.mean(dim=1)
        return summary, patches
