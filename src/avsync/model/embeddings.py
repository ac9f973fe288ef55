"""Patch tokenizers: a 16x16 convolution plus fixed 2-D sin-cos positions and a learned modality embedding."""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import PatchEmbed
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos code of `positions` in `dim` channels: `[sin(p*w), cos(p*w)]`."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D position code of a `rows x cols` token grid, row-major, shape `(rows*cols, dim)`.

    MAE's layout (which the released checkpoints use): the first half of the channels encodes the
    column index, the second half the row index.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1).float()


class ModalityTokenizer(nn.Module):
    """Image-like input `(B, C, H, W)` -> tokens `(B, H/p * W/p, D)` with positions and modality added.

    `learned_positions`: the sin-cos table is a parameter (trained, and stored in the state dict), as
    with the authors' `tr_pos=True`; otherwise a fixed buffer, rebuilt rather than stored.
    """

    def __init__(
        self,
        height: int,
        width: int,
        in_channels: int,
        patch_size: int,
        embed_dim: int,
        learned_positions: bool = False,
    ):
        super().__init__()
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"input {height}x{width} is not a whole number of {patch_size}x{patch_size} patches"
            )
        self.grid = (height // patch_size, width // patch_size)
        self.patch_embed = PatchEmbed(
            img_size=(height, width),
            patch_size=patch_size,
            in_chans=in_channels,
            embed_dim=embed_dim,
            strict_img_size=True,
        )
        self.modality = nn.Parameter(torch.zeros(1, 1, embed_dim))
        positions = sincos_2d(embed_dim, *self.grid)[None]
        if learned_positions:
            self.pos_embed = nn.Parameter(positions)
        else:
            self.register_buffer("pos_embed", positions, persistent=False)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed + self.modality


def spectrogram_as_image(audio: torch.Tensor) -> torch.Tensor:
    """`(B, time, mel)` -> `(B, 1, mel, time)`: audio patches come out frequency-major (authors' order)."""
    return rearrange(audio, "b t f -> b 1 f t")


def patchify_audio(audio: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, time, mel)` -> `(B, N, p*p)` in the token order of :func:`spectrogram_as_image`."""
    return rearrange(audio, "b (w q) (h p) -> b (h w) (p q)", p=patch_size, q=patch_size)


def unpatchify_audio(patches: torch.Tensor, patch_size: int, mel_bins: int) -> torch.Tensor:
    return rearrange(
        patches, "b (h w) (p q) -> b (w q) (h p)", p=patch_size, q=patch_size, h=mel_bins // patch_size
    )


def patchify_video(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, N, p*p*3)`, row-major patches, channel-last within a patch."""
    return rearrange(video, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify_video(patches: torch.Tensor, patch_size: int, image_size: int) -> torch.Tensor:
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", p=patch_size, q=patch_size, h=image_size // patch_size
    )
