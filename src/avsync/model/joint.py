"""The joint layer (paper §3.2-3.4): transformer blocks whose weights serve three passes.

Each block owns one attention and one MLP but three LayerNorm sets, one per pass:

1. `joint`: audio and video patch tokens together (no global tokens) -> `norm` -> the decoder;
2. `audio`: `[global_a, audio patches]` -> (contrastive head) -> `norm_audio`;
3. `video`: `[global_v, video patches]` -> (contrastive head) -> `norm_video`.

Passes 2 and 3 give the global tokens for the contrastive objective and every downstream task.

With more than one block, every pass chains them (block i reads block i-1's output). The authors'
code chains only pass 1; in passes 2 and 3 it applies each block to the encoder output and keeps the
last (`ca = blk(a, 'a')` in a loop), in training and, in the CAV-MAE Sync code, in `forward_feat` too.
Their released model has one block, where both readings agree; see `CAVMAESync`'s `joint_depth`.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import Attention, Mlp
from torch import nn

from avsync.model.transformer import encoder_block

Stream = Literal["joint", "audio", "video"]
STREAMS: tuple[Stream, ...] = ("joint", "audio", "video")


class SharedBlock(nn.Module):
    """A pre-norm ViT block whose LayerNorms are chosen per stream; attention and MLP are shared."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm1 = nn.ModuleDict({stream: nn.LayerNorm(dim) for stream in STREAMS})
        self.norm2 = nn.ModuleDict({stream: nn.LayerNorm(dim) for stream in STREAMS})

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        x = x + self.attn(self.norm1[stream](x))
        return x + self.mlp(self.norm2[stream](x))


class JointLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        contrastive_head_depth: int = 0,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(SharedBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.norm_audio = nn.LayerNorm(dim)
        self.norm_video = nn.LayerNorm(dim)
        # Optional per-modality blocks between the joint layer and the output norm (off in the release).
        self.contrastive_heads = nn.ModuleDict(
            {
                modality: nn.ModuleList(
                    encoder_block(dim, num_heads, mlp_ratio) for _ in range(contrastive_head_depth)
                )
                for modality in ("audio", "video")
            }
        )

    def fuse(self, audio_patches: torch.Tensor, video_patches: torch.Tensor) -> torch.Tensor:
        """Pass 1: both modalities' patches in one sequence, for the decoder."""
        x = torch.cat([audio_patches, video_patches], dim=1)
        for block in self.blocks:
            x = block(x, "joint")
        return self.norm(x)

    def modality(self, tokens: torch.Tensor, modality: Literal["audio", "video"]) -> torch.Tensor:
        """Passes 2 and 3: one modality's `[global, patches]` through the shared weights, normalized."""
        for block in self.blocks:
            tokens = block(tokens, modality)
        for block in self.contrastive_heads[modality]:
            tokens = block(tokens)
        return (self.norm_audio if modality == "audio" else self.norm_video)(tokens)
