"""Per-patch visual features to compare with an audio global token: the paper's, and two that follow it.

Sound-prompted segmentation scores every visual patch by its cosine with the audio global token `g_a`.
The paper (SPEC §4) takes the patch tokens of the video pass of the joint layer, after `norm_video`.
But the contrastive objective only ever compares `g_a` with the *video global token*, and a patch token
is not a global token: its residual stream carries its own position and pixels, and nothing asks its
coordinates to speak the global tokens' class code. Global-token contrastive models are known to give
maps that are inverted or that do not depend on the prompt at all (CLIP Surgery, ClearCLIP, SCLIP,
MaskCLIP); avsync's demo model does both. The literature's remedy is to read the patches out through
the very path the global token is made by. Readouts (`PatchReadout`):

- `patch_tokens` (the paper's, default): the patch tokens of the video pass, normalized.
- `global_readout`: what the video global token would be if, in the last joint block, it attended to
  that one patch only: `norm_video(h + MLP(h))` with `h = x_global + W_o v_patch` (MaskCLIP's value
  readout, with the global token's own residual and MLP kept). Each patch is then a point of the very
  space `g_v` lives in, and `g_a` was trained against that space.
- `self_attention`: ClearCLIP's last block: query-query attention among the patches, no residual and
  no MLP, through the output projection and `norm_video`.

Only the last joint block changes; everything before it runs as in `encode`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from avsync.model.backbone import CAVMAESync

PatchReadout = Literal["patch_tokens", "global_readout", "self_attention"]
PATCH_READOUTS: tuple[str, ...] = ("patch_tokens", "global_readout", "self_attention")


def check_patch_readout(readout: str) -> str:
    if readout not in PATCH_READOUTS:
        raise ValueError(f"unknown patch readout {readout!r}; use one of {', '.join(PATCH_READOUTS)}")
    return readout


@torch.no_grad()
def video_patch_features(
    backbone: CAVMAESync, video: torch.Tensor, readout: PatchReadout = "patch_tokens"
) -> torch.Tensor:
    """Per-patch features `(B, N, D)` of frames `(B, 3, S, S)` (row-major patches), unnormalized."""
    check_patch_readout(readout)
    if readout == "patch_tokens":
        return backbone.encode(video=video).patches_video
    if not backbone.global_tokens.enabled and readout == "global_readout":
        raise ValueError("the global_readout needs a model with global tokens (global_token: true)")
    backbone._check_inputs(None, video)
    sequence, _ = backbone._encode_modality(backbone.video_tokenizer(video), "video")
    joint = backbone.joint
    *earlier, last = joint.blocks
    for block in earlier:
        sequence = block(sequence, "video")
    attention = last.attn
    qkv = attention.qkv(last.norm1["video"](sequence))
    query, _, value = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=attention.num_heads)
    first = backbone.global_tokens.count  # the first patch's position in the sequence
    if readout == "global_readout":
        values = attention.proj(rearrange(value, "b h n d -> b n (h d)"))
        tokens = sequence[:, :1] + values[:, first:]
        tokens = tokens + last.mlp(last.norm2["video"](tokens))
    else:
        query, value = query[:, :, first:], value[:, :, first:]
        mixed = F.scaled_dot_product_attention(query, query, value)
        tokens = attention.proj(rearrange(mixed, "b h n d -> b n (h d)"))
    for block in joint.contrastive_heads["video"]:
        tokens = block(tokens)
    return joint.norm_video(tokens)
