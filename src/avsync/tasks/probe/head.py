"""The probe's classifier (paper §3.5.2, supplementary §6.2): a learned CLS token prepended to the
sequence of T per-step features, two ViT blocks, LayerNorm, and a linear layer on the CLS output."""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from avsync.model.transformer import encoder_block, init_like_authors


class ProbeHead(nn.Module):
    """`(B, T, width)` features -> `(B, num_classes)` logits.

    The authors' `self_attention_cls` head (`CAVMAEFT` in their `src/models/cav_mae_sync.py`), and
    initialized like it: N(0, 0.02) CLS token (`cls_cls_token`, re-drawn in `initialize_weights`),
    xavier-uniform linears with zero biases, unit LayerNorms. No positional embedding: the steps are
    told apart only by their content, as in theirs.
    """

    def __init__(
        self, width: int, num_classes: int, depth: int = 2, num_heads: int = 12, mlp_ratio: float = 4.0
    ):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"probe head width {width} does not divide into {num_heads} attention heads")
        if num_classes < 1 or depth < 0:
            raise ValueError(f"need num_classes >= 1 and depth >= 0, got {num_classes} and {depth}")
        self.width = width
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(*(encoder_block(width, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)
        self.apply(init_like_authors)
        nn.init.normal_(self.cls, std=0.02)  # the authors' CAVMAEFT.initialize_weights

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.width:
            raise ValueError(f"probe head expects (B, T, {self.width}) features, got {tuple(features.shape)}")
        cls = repeat(self.cls, "1 1 w -> b 1 w", b=features.shape[0]).to(features.dtype)
        sequence = self.blocks(torch.cat([cls, features], dim=1))
        return self.classifier(self.norm(sequence[:, 0]))
