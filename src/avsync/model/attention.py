"""Multi-head self-attention with the fastest kernel for the device and precision.

timm's `Attention` (the authors' layer, same parameters) always calls `scaled_dot_product_attention`.
On CPU its reduced-precision kernels are slow: in a bf16-autocast ViT-B pretraining step the explicit
`softmax(q k^T / sqrt(d)) v` (three oneDNN bf16 products and a softmax) made the whole step about 20 %
faster than SDPA's flash kernel, and bf16 feature extraction about 10 % (`BENCHMARKS.md`), while in
float32 SDPA stays the faster one (the explicit products would run on MKL's slower float32 batched
GEMM: the whole step about 20 % slower). GPUs always use SDPA, through timm's own class:
`avsync.onednn.use_device_kernels` switches between the two as the model moves between devices.

The forward below reads timm's `Attention` internals (`TIMM_INTERNALS`); pyproject bounds timm below
its next major version, and `tests/model/test_kernels.py` fails by name if one of them disappears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention as TimmAttention

#: Attributes of timm's `Attention` that `Attention.forward` uses (besides the `nn.Module` basics).
TIMM_INTERNALS = ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "attn_drop", "num_heads")


def explicit_attention_is_faster(query: torch.Tensor) -> bool:
    """Whether the explicit product-softmax-product beats SDPA for these (already cast) queries."""
    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T / sqrt(head_dim)) v` for `(B, heads, N, head_dim)` tensors, by the faster kernel."""
    if explicit_attention_is_faster(query):
        weights = ((query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)).softmax(dim=-1)
        return weights @ value
    return F.scaled_dot_product_attention(query, key, value)


class Attention(TimmAttention):
    """timm's `Attention` (same parameters and state dict) computed by :func:`attend`, without dropout
    inside the attention (none of avsync's blocks uses it; the constructor refuses it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        missing = [name for name in TIMM_INTERNALS if not hasattr(self, name)]
        if missing:
            raise TypeError(f"timm's Attention lacks {missing}, which avsync's Attention reads: use timm<2")
        if not self.supports(self):
            raise ValueError("avsync's Attention supports neither attention dropout nor gating")

    @staticmethod
    def supports(layer: TimmAttention) -> bool:
        """Whether `layer` computes what this class computes: timm's internals present, no attention
        dropout, no gate."""
        return (
            all(hasattr(layer, name) for name in TIMM_INTERNALS)
            and not layer.attn_drop.p
            and getattr(layer, "gate", None) is None
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("avsync's Attention attends to every token: no mask, not causal")
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        query, key, value = qkv.unbind(0)
        out = attend(self.q_norm(query), self.k_norm(key), value)
        out = self.norm(rearrange(out, "b h n d -> b n (h d)"))
        return self.proj_drop(self.proj(out))
