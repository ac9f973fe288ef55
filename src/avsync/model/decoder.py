"""The MAE decoder: re-inserts mask tokens into the joint sequence and predicts the removed patches."""

from __future__ import annotations

import torch
from torch import nn

from avsync.model.embeddings import sincos_2d
from avsync.model.masking import Masking
from avsync.model.transformer import stack


class Decoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int,
        depth: int,
        num_heads: int,
        audio_grid: tuple[int, int],
        video_grid: tuple[int, int],
        patch_size: int,
        video_channels: int = 3,
        mlp_ratio: float = 4.0,
        learned_positions: bool = False,
    ):
        super().__init__()
        self.num_audio_patches = audio_grid[0] * audio_grid[1]
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.modality_audio = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.modality_video = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        for name, grid in (("pos_audio", audio_grid), ("pos_video", video_grid)):
            positions = sincos_2d(decoder_dim, *grid)[None]
            if learned_positions:  # the authors' tr_pos=True (see ModalityTokenizer)
                self.register_parameter(name, nn.Parameter(positions))
            else:
                self.register_buffer(name, positions, persistent=False)
        self.blocks = stack(depth, decoder_dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(decoder_dim)
        self.predict_audio = nn.Linear(decoder_dim, patch_size**2)
        self.predict_video = nn.Linear(decoder_dim, patch_size**2 * video_channels)

    def forward(
        self, joint_tokens: torch.Tensor, audio_mask: Masking, video_mask: Masking
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`joint_tokens`: the kept audio then kept video tokens -> per-patch predictions of every patch."""
        x = self.embed(joint_tokens)
        kept_audio = audio_mask.num_kept
        audio = audio_mask.fill(x[:, :kept_audio], self.mask_token) + self.pos_audio + self.modality_audio
        video = video_mask.fill(x[:, kept_audio:], self.mask_token) + self.pos_video + self.modality_video
        x = self.norm(self.blocks(torch.cat([audio, video], dim=1)))
        return self.predict_audio(x[:, : self.num_audio_patches]), self.predict_video(
            x[:, self.num_audio_patches :]
        )
