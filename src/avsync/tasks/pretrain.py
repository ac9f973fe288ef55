"""Pretraining (paper §3, supplementary Table 9): the masked-reconstruction + contrastive objective."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from einops import rearrange
from torch.optim.lr_scheduler import LambdaLR

from avsync.checkpoints import MAE_INIT_HINT, CheckpointError, init_from_mae, resolve_backbone
from avsync.config_checks import check_count, check_optimizer
from avsync.model import CAVMAESync
from avsync.tasks.visualize import reconstruction_panels
from avsync.training.nonfinite import NonFiniteLossGuard

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adam_optimizer(
    parameters: list[torch.nn.Parameter],
    kind: Literal["adam", "adamw"] = "adam",
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.95, 0.999),
    weight_decay: float = 5e-7,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Adam or AdamW over `parameters`; `fused=None` takes the fused kernel on CPU and CUDA, where
    PyTorch has one (at ViT-B size on CPU it is several times faster than the multi-tensor default)."""
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
    optimizer_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    options = {"fused": True} if fused else {}
    return optimizer_class(parameters, lr=lr, betas=betas, weight_decay=weight_decay, **options)


class PretrainModule(L.LightningModule):
    """Trains a `CAVMAESync` backbone on batches of one aligned frame/window pair per clip.

    Args:
        backbone: the model to train (defaults to the paper's ViT-B).
        lr, weight_decay, betas: Adam settings (supplementary Table 9).
        optimizer: `adam` (the authors': L2 penalty through the gradient) or `adamw` (decoupled decay).
        fused_optimizer: the fused (single-kernel) Adam; None: on CPU and CUDA, where PyTorch has it
            (see `adam_optimizer` and `BENCHMARKS.md`), unless fp16 mixed precision must clip gradients.
        warmup_epochs: linear warm-up length, in epochs (fractions allowed), then cosine decay.
        warmup_steps: the warm-up in optimizer steps instead (for runs whose epochs have no length).
        min_lr: learning rate at the end of the cosine.
        init_from: the ImageNet MAE checkpoint to start from (a local file, read weights-only), mapped as
            CAV-MAE's adapt_vmae_weights.py maps it (`avsync.checkpoints.init_from_mae`); `none`: random
            initialization, on purpose.
        log_images_every_n_steps: TensorBoard images of input, masked input and reconstruction (0: off).
        compile: `torch.compile` the backbone (training and validation passes; see `BENCHMARKS.md`).
        max_nonfinite_steps: a step whose loss is NaN/inf (on any rank) is skipped; this many in a row
            stop the run with `NonFiniteLossError` (see `avsync.training.nonfinite`).
        backbone_config: constructor arguments of the backbone; filled in when a checkpoint is reloaded.
        equal_batches: every rank's training batches hold the same number of clips (as
            `AVShardDataModule`'s do: it drops partial training batches), so the contrastive loss gathers
            the global batch without first gathering its sizes (a collective and a host sync per step).
        init_required: the paper's recipe (supplementary §6.2 starts from the MAE weights): refuse to
            start when `init_from` is not set, since random weights must be a decision (`init_from: none`)
            and not an accident, and refuse a file that leaves a tensor adapt_vmae_weights.py fills
            untouched (an encoder-only MAE file leaves the decoder random).

    Learning rate and throughput are logged by Lightning's callbacks (`LearningRateMonitor`, avsync's
    `ThroughputMonitor`; see the recipes); the schedule is named `train/lr` for the former.
    """

    def __init__(
        self,
        backbone: CAVMAESync | None = None,
        lr: float = 2e-4,
        weight_decay: float = 5e-7,
        betas: tuple[float, float] = (0.95, 0.999),
        optimizer: Literal["adam", "adamw"] = "adam",
        fused_optimizer: bool | None = None,
        warmup_epochs: float = 2.5,
        warmup_steps: int | None = None,
        min_lr: float = 0.0,
        init_from: str | None = None,
        log_images_every_n_steps: int = 500,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        backbone_config: dict | None = None,
        equal_batches: bool = False,
        init_required: bool = False,
    ):
        super().__init__()
        check_optimizer("PretrainModule", lr, weight_decay, betas, warmup_epochs, min_lr)  # ConfigError
        check_count("PretrainModule", "warmup_steps", warmup_steps, 0, optional=True)
        check_count("PretrainModule", "log_images_every_n_steps", log_images_every_n_steps, 0)
        check_count("PretrainModule", "max_nonfinite_steps", max_nonfinite_steps, 1)
        if init_required and init_from is None:  # before the model is built and the ranks are started
            raise CheckpointError(
                "init_from is not set, and this recipe starts from the ImageNet MAE weights (supplementary "
                f"§6.2): {MAE_INIT_HINT}"
            )
        if backbone is None:  # a fresh model, or the one a reloaded checkpoint's weights then fill
            backbone = resolve_backbone(backbone_config=backbone_config or {})
        self.backbone = backbone
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone_config"] = dict(backbone.config)
        self._nonfinite = NonFiniteLossGuard(max_nonfinite_steps)
        self._skip_step = False

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        resuming = self.trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and not resuming:
            self.initialize_from(self.hparams.init_from)

    def initialize_from(self, source: str | None) -> None:
        """Start the backbone from the MAE weights in `source` (None or `none`: keep its random weights)."""
        if source is None:
            return
        if source.lower() == "none":
            self.print("init_from none: the backbone starts from random weights")
            return
        if not Path(source).is_file():
            raise CheckpointError(f"init_from {source}: no such file; {MAE_INIT_HINT}")
        report = init_from_mae(self.backbone, source, complete=self.hparams.init_required)
        log.info("init_from %s: %s", source, report.summary())
        self.print(f"init_from {source}: {report.summary()}")

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self._compiled = True

    def configure_optimizers(self):
        fused = self.hparams.fused_optimizer
        if fused is None and self.trainer.precision == "16-mixed" and self.trainer.gradient_clip_val:
            fused = False  # Lightning cannot clip a fused optimizer's gradients under fp16 loss scaling
        optimizer = adam_optimizer(
            [p for p in self.backbone.parameters() if p.requires_grad],
            kind=self.hparams.optimizer,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
            fused=fused,
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                "the warm-up + cosine schedule needs the run's length, but the training data has no length "
                "and trainer.max_steps is not set: set trainer.max_steps, or stream shards with a fixed "
                "epoch (AVShardDataModule(resampled=True, epoch_length=...))"
            )
        total = int(total)
        min_ratio = self.hparams.min_lr / self.hparams.lr if self.hparams.lr else 0.0  # lr 0: frozen
        warmup = self._warmup_steps()
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"},
        }

    def _warmup_steps(self) -> int:
        """`warmup_steps`, or `warmup_epochs` times the optimizer steps of one epoch."""
        if self.hparams.warmup_steps is not None:
            return self.hparams.warmup_steps
        if not self.hparams.warmup_epochs:
            return 0
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "warmup_epochs needs the length of an epoch, which this training data does not have: "
                "give warmup_steps instead, or use AVShardDataModule(resampled=True, epoch_length=...)"
            )
        steps_per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches)
        return max(1, round(self.hparams.warmup_epochs * steps_per_epoch))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.backbone.contrastive.equal_batches = self.hparams.equal_batches
        out = self.backbone(batch["audio"], batch["video"])  # through __call__: compiled with `compile`
        batch_size = batch["audio"].shape[0]
        skip = self._nonfinite.should_skip(out.loss, self.trainer.strategy, self.global_step)
        self._skip_step = self._skip_step or skip  # one bad micro-batch spoils the accumulated gradient
        if skip:  # backward still runs on every rank (DDP's all-reduce needs all of them)
            skipped = float(self._nonfinite.skipped)
            self.log("train/nonfinite_skipped", skipped, on_step=True, batch_size=batch_size)
            return out.loss
        self._log_terms("train", out, batch_size, on_step=True)
        every = self.hparams.log_images_every_n_steps
        if every and self.global_step % every == 0:
            self._log_images(batch, out)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_step:  # no gradients: the optimizer leaves weights and moments as they are
            optimizer.zero_grad(set_to_none=True)
        self._skip_step = False

    def _log_terms(self, split: str, out, batch_size: int, on_step: bool) -> None:
        terms = {
            "loss": out.loss,
            "reconstruction_audio": out.reconstruction_audio,
            "reconstruction_video": out.reconstruction_video,
            "contrastive": out.contrastive,
            "contrastive_accuracy": out.contrastive_accuracy,
        }
        for name, value in terms.items():
            self.log(
                f"{split}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name in ("loss", "contrastive_accuracy"),
                batch_size=batch_size,
                sync_dist=not on_step,
            )

    def _log_images(self, batch: dict, out) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or self.global_rank != 0:
            return
        panels = reconstruction_panels(self.backbone, batch["audio"][:1], batch["video"][:1], out)
        for name, image in panels.items():
            experiment.add_image(f"reconstruction/{name}", image, self.global_step)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.backbone.contrastive.equal_batches = False  # evaluation keeps the last, partial batch
        audio, video = batch["audio"], batch["video"]
        generator = torch.Generator().manual_seed(batch_idx)
        if video.ndim == 5:  # evaluation batches carry all T pairs of each clip
            frame = torch.randint(video.shape[1], (video.shape[0],), generator=generator).to(video.device)
            rows = torch.arange(video.shape[0], device=video.device)
            pair_audio, pair_video = audio[rows, frame], video[rows, frame]
        else:
            pair_audio, pair_video = audio, video
        noise = self.backbone.draw_noise(pair_audio.shape[0], torch.device("cpu"), generator)
        noise_a, noise_v = (n.to(audio.device) for n in noise)
        out = self.backbone(pair_audio, pair_video, noise_a=noise_a, noise_v=noise_v)
        self._log_terms("val", out, pair_audio.shape[0], on_step=False)
        if video.ndim == 5 and video.shape[0] > 1:
            embeddings = self.backbone.encode(audio, video)
            for direction, recall in in_batch_recall_at_1(
                embeddings.global_audio, embeddings.global_video
            ).items():
                self.log(
                    f"val/{direction}_R1", recall, on_epoch=True, batch_size=video.shape[0], sync_dist=True
                )


def in_batch_recall_at_1(audio: torch.Tensor, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """R@1 within a batch of clips `(B, T, D)`, diagonal-mean similarity (paper Eq. 5), both directions."""
    audio = rearrange(torch.nn.functional.normalize(audio.float(), dim=-1), "b t d -> b (t d)")
    video = rearrange(torch.nn.functional.normalize(video.float(), dim=-1), "b t d -> b (t d)")
    similarity = video @ audio.T  # (queries = video, targets = audio), up to the constant 1/T
    truth = torch.arange(similarity.shape[0], device=similarity.device)
    return {
        "video_to_audio": (similarity.argmax(dim=1) == truth).float().mean(),
        "audio_to_video": (similarity.argmax(dim=0) == truth).float().mean(),
    }
