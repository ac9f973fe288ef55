"""The plain ViT block used by the modality encoders, the decoder and the contrastive heads."""

from __future__ import annotations

from timm.models.vision_transformer import Block
from torch import nn


def encoder_block(dim: int, num_heads: int, mlp_ratio: float = 4.0) -> Block:
    """timm's pre-norm ViT block (timm's `Attention`, as the authors'), configured like the authors':
    qkv bias, exact GELU, `nn.LayerNorm` with eps 1e-5 (timm's default is 1e-6)."""
    return Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)


def stack(depth: int, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> nn.Sequential:
    return nn.Sequential(*(encoder_block(dim, num_heads, mlp_ratio) for _ in range(depth)))


def init_like_authors(module: nn.Module) -> None:
    """For `Module.apply`: xavier-uniform linears with zero biases, unit LayerNorms (as MAE and the
    authors' JAX-ViT-style initialization)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
