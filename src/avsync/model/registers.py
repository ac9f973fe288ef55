"""Register tokens (paper §3.4, after Darcet et al.): learned scratch tokens appended to each modality.

They give the modality encoders somewhere to store global computation other than the patch tokens.
No loss reads them, and the released model drops them after the modality encoders, before the joint
layer; their encoder outputs are still returned for probing (supplementary Table 12).
"""

from __future__ import annotations

import torch
from torch import nn


class Registers(nn.Module):
    def __init__(self, embed_dim: int, count: int = 8):
        super().__init__()
        if count < 0:
            raise ValueError(f"number of registers must be >= 0, got {count}")
        self.count = count
        # The authors draw these from N(0, 1) and never re-initialize them.
        self.audio = nn.Parameter(torch.randn(count, embed_dim))
        self.video = nn.Parameter(torch.randn(count, embed_dim))

    def append(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        if not self.count:
            return tokens
        registers = self.audio if modality == "audio" else self.video
        return torch.cat([tokens, registers.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)

    def drop(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sequence without registers, the registers (B, R, D))`."""
        if not self.count:
            return tokens, tokens[:, :0]
        return tokens[:, : -self.count], tokens[:, -self.count :]
