"""Global tokens (paper §3.4): one learned token per modality, prepended to its patch tokens.

The contrastive objective reads only these tokens, so the patch tokens are free to serve the
reconstruction objective. With `enabled=False` the model falls back to CAV-MAE, whose "global"
representation is the mean of the normalized patch tokens.
"""

from __future__ import annotations

import torch
from torch import nn

#: Standard deviation of the initial global tokens. The authors create `cls_token_a` / `cls_token_v`
#: with `randn` and then re-draw them from N(0, 0.02) in `initialize_weights()`, which `__init__` calls
#: (edsonroteia/cav-mae-sync, `src/models/cav_mae_sync.py`, `CAVMAE` and `CAVMAEFT`); their register
#: tokens keep `randn`'s N(0, 1) (`registers.py`).
INIT_STD = 0.02


class GlobalTokens(nn.Module):
    def __init__(self, embed_dim: int, enabled: bool = True, init_std: float = INIT_STD):
        super().__init__()
        self.enabled = enabled
        if enabled:
            # A scaled `randn`: the authors' distribution with one draw instead of their two, so a
            # seeded model's other weights do not depend on `init_std`.
            self.audio = nn.Parameter(torch.randn(1, 1, embed_dim) * init_std)
            self.video = nn.Parameter(torch.randn(1, 1, embed_dim) * init_std)

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

    def split(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(global (B, D), patches (B, N, D))` from a `[global, patches...]` sequence (normalized after
        the joint layer, or as a modality encoder leaves it)."""
        patches = self.patches(sequence)
        summary = sequence[:, 0] if self.enabled else patches.mean(dim=1)
        return summary, patches
