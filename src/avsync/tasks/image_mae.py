"""Stage 0 of the paper's recipe, in miniature: an image MAE (He et al., 2022) on the clips' frames.

The paper starts both encoders of CAV-MAE Sync from ImageNet-MAE ViT-B weights (SPEC §3). avsync
downloads nothing, so the miniature recipe makes its own: this module trains a plain MAE ViT on the
training shards' frames (the audio of each sample is ignored) and, at the end of the run, writes its
weights in the released MAE layout (`{"model": state_dict}` with MAE's key names: `patch_embed`,
`cls_token`, `pos_embed`, `blocks.i`, `norm`, `decoder_*`, `mask_token`). The audio-visual run then
reads that file through `PretrainModule(init_from=...)`, the same import path as the real
`mae_pretrain_vit_base.pth`, so the whole chain is exercised end to end.

    avsync fit --config configs/pretrain/tiny_cpu_mae.yaml        # writes runs/.../mae.pth
    avsync fit --config configs/pretrain/tiny_cpu.yaml --model.init_args.init_from runs/.../mae.pth

Depth is the backbone's encoder depth plus its joint depth: blocks `0..d-1` initialize both modality
encoders, the rest the joint layer (`avsync.checkpoints.init_from_mae`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from avsync.config_checks import ConfigError, check_count, check_number, check_optimizer
from avsync.model.embeddings import ModalityTokenizer, patchify_video, sincos_2d
from avsync.model.masking import mask_from_noise
from avsync.model.transformer import init_like_authors, stack
from avsync.objectives import masked_mse
from avsync.tasks.pretrain import adam_optimizer, warmup_cosine

log = logging.getLogger(__name__)


class ImageMAE(nn.Module):
    """A ViT MAE whose parameter names are the released MAE checkpoints' (so `state_dict()` is the
    export). Position codes are MAE's fixed 2-D sin-cos, with an all-zero slot for the class token."""

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ):
        super().__init__()
        self.patch_size, self.image_size = patch_size, image_size
        tokenizer = ModalityTokenizer(image_size, image_size, 3, patch_size, embed_dim)
        self.patch_embed = tokenizer.patch_embed  # MAE's name; the tokenizer's modality embedding is unused
        grid = tokenizer.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(_with_class_slot(sincos_2d(embed_dim, *grid)), requires_grad=False)
        self.blocks = stack(depth, embed_dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            _with_class_slot(sincos_2d(decoder_dim, *grid)), requires_grad=False
        )
        self.decoder_blocks = stack(decoder_depth, decoder_dim, decoder_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)
        # MAE's initialization: xavier linears, the patch convolution as a linear, N(0, 0.02) tokens.
        self.apply(init_like_authors)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.pos_embed.shape[1] - 1

    def forward(self, video: torch.Tensor, noise: torch.Tensor, mask_ratio: float, norm_pix_loss: bool):
        """Masked reconstruction loss of frames `(B, 3, S, S)`; `noise` `(B, N)` decides the mask."""
        masking = mask_from_noise(noise, mask_ratio)
        tokens = masking.select(self.patch_embed(video) + self.pos_embed[:, 1:])
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        encoded = self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))
        x = self.decoder_embed(encoded)
        patches = masking.fill(x[:, 1:], self.mask_token)
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        prediction = self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]
        target = patchify_video(video, self.patch_size)
        return masked_mse(prediction, target, masking.mask, norm_pix_loss)


def _with_class_slot(positions: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, positions.shape[1]), positions])[None]


class ImageMAEModule(L.LightningModule):
    """Trains an `ImageMAE` on the video frames of `AVShardDataModule` batches and exports it.

    Args:
        image_size, patch_size, embed_dim, num_heads, mlp_ratio: the ViT; match the backbone that will
            be initialized from it.
        depth: the backbone's `encoder_depth + joint_depth`.
        decoder_dim, decoder_depth, decoder_heads: MAE's decoder; match the backbone's decoder so that
            `init_from` also fills it.
        mask_ratio: share of patches removed (MAE: 0.75).
        norm_pix_loss: standardized target patches (MAE's recommended setting).
        lr, weight_decay, betas, warmup_epochs, min_lr: AdamW with warm-up and cosine decay (MAE's recipe).
        export_path: where the released-format checkpoint is written at the end of `fit` (default:
            `mae.pth` in the logger's folder, or the trainer's root directory).
        audio_length: the window the shard pipeline cuts from each clip's spectrogram; the MAE reads only
            the frames, but the data module serves pairs (`avsync fit` links both sizes to it).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 1.0,
        min_lr: float = 0.0,
        export_path: str | None = None,
        audio_length: int = 192,
    ):
        super().__init__()
        check_optimizer("ImageMAEModule", lr, weight_decay, betas, warmup_epochs, min_lr)  # ConfigError
        check_number("ImageMAEModule", "mask_ratio", mask_ratio, 0, 1, high_open=True)
        sizes = dict(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads)
        sizes |= dict(decoder_dim=decoder_dim, decoder_heads=decoder_heads, audio_length=audio_length)
        for name, value in sizes.items():
            check_count("ImageMAEModule", name, value, 1)
        if embed_dim % num_heads or decoder_dim % decoder_heads or image_size % patch_size:
            raise ConfigError(
                f"ImageMAEModule: embed_dim={embed_dim} and decoder_dim={decoder_dim} must divide into their "
                f"heads ({num_heads}, {decoder_heads}), image_size={image_size} into patch_size={patch_size}"
            )
        self.save_hyperparameters()
        self.image_size, self.audio_length = image_size, audio_length
        self.mae = ImageMAE(
            image_size,
            patch_size,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            decoder_dim,
            decoder_depth,
            decoder_heads,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video = batch["video"]
        noise = torch.rand(video.shape[0], self.mae.num_patches, device=video.device)
        loss = self.mae(video, noise, self.hparams.mask_ratio, self.hparams.norm_pix_loss)
        self.log("train/reconstruction_video", loss, on_step=True, prog_bar=True, batch_size=len(video))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The held-out frames' reconstruction loss, masked by noise fixed per batch (comparable across
        epochs); evaluation batches carry all T frames of a clip, of which the middle one is scored."""
        video = batch["video"]
        if video.ndim == 5:
            video = video[:, video.shape[1] // 2]
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.rand(video.shape[0], self.mae.num_patches, generator=generator).to(video.device)
        loss = self.mae(video, noise, self.hparams.mask_ratio, self.hparams.norm_pix_loss)
        self.log("val/reconstruction_video", loss, on_epoch=True, batch_size=len(video), sync_dist=True)

    def configure_optimizers(self):
        optimizer = adam_optimizer(
            [p for p in self.parameters() if p.requires_grad],
            kind="adamw",
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("the MAE stage needs a run length: trainer.max_steps or a fixed epoch_length")
        per_epoch = max(1, int(total) // max(1, self.trainer.max_epochs or 1))
        warmup = max(1, round(self.hparams.warmup_epochs * per_epoch))
        min_ratio = self.hparams.min_lr / self.hparams.lr if self.hparams.lr else 0.0  # lr 0: frozen
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, int(total), min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export_file(self) -> Path:
        if self.hparams.export_path:
            return Path(self.hparams.export_path)
        folder = self.logger.log_dir if self.logger is not None and self.logger.log_dir else None
        return Path(folder or self.trainer.default_root_dir) / "mae.pth"

    def on_fit_end(self) -> None:
        self.export(self.export_file())

    @rank_zero_only
    def export(self, path: Path) -> Path:
        """Write the weights as the released MAE checkpoints hold them: `{"model": state_dict}`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.mae.state_dict().items()}
        partial = path.with_name(path.name + ".partial")
        torch.save({"model": state}, partial)
        os.replace(partial, path)
        log.info("MAE weights (released MAE layout, %d tensors) -> %s", len(state), path)
        print(f"MAE weights (released MAE layout) -> {path}")
        return path
