"""Linear probing (paper §3.5.2, supplementary §6.2 and Tables 9, 10, 12): a small classifier trained on
the features of a frozen CAV-MAE Sync backbone.

Two ways to feed it (the module accepts both batch kinds):
- cached features (`CachedFeatureDataModule`, `data.py`): the backbone runs once over the data,
  epochs read `{"features" (B, T, W), "label", "key"}` batches - the fast, recommended path;
- clips (`AVShardDataModule` with `train_mode: eval`): `{"audio" (B, T, L, mel), "video" (B, T, 3, H, W),
  "label", "key"}`, the backbone runs in every step (for comparison, or for one-off runs).

Weight averaging is the `EpochWeightAveraging` callback (`averaging.py`).
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from avsync.checkpoints import CheckpointError, resolve_backbone
from avsync.config_checks import check_count, check_number, check_optimizer
from avsync.model import CAVMAESync
from avsync.model.backbone import FeatureLayer
from avsync.tasks.pretrain import adam_optimizer, warmup_cosine
from avsync.tasks.probe.features import FrozenBackbone, ProbeModality, ProbeToken, check_options
from avsync.tasks.probe.head import ProbeHead
from avsync.tasks.probe.objective import (
    ProbeTask,
    metric_targets,
    mixup,
    probe_loss,
    probe_metrics,
    soft_targets,
)

log = logging.getLogger(__name__)
CHECKPOINT_FINGERPRINT = "probe_backbone_fingerprint"


class ProbeModule(L.LightningModule):
    """Trains `ProbeHead` on a frozen backbone's per-step tokens (multi-label or single-label).

    The backbone is held outside the module's parameters (`FrozenBackbone`): it is never trained,
    stays in eval mode, and probe checkpoints hold only the head plus the backbone's fingerprint. A
    checkpoint reloads with `ProbeModule.load_from_checkpoint(path)` when the backbone came from
    `backbone_checkpoint` (else pass `backbone=`); a backbone whose weights differ is refused.

    Args:
        backbone: a `CAVMAESync` (frozen in place: eval mode, no gradients).
        backbone_checkpoint: or a checkpoint `avsync.checkpoints.resolve_backbone` loads (PretrainModule
            checkpoint, avsync safetensors export, the authors' release).
        authors_kwargs: constructor arguments for an authors' checkpoint that its weights cannot reveal.
        modality: `audio`, `video` or `audio_visual` (`[g_a, g_v]` per step, paper Table 10).
        token: `global`, `register` (mean of the register tokens) or `patch` (mean of the patch tokens),
            paper Table 12.
        layer: where the tokens are read: `encoder` (the authors' classifier `CAVMAEFT`: as the modality
            encoders leave them, before the joint layer, no LayerNorm) or `joint` (after the joint layer
            and its modality LayerNorm, the tokens retrieval and the contrastive objective use).
        task: `multilabel` (BCE, mAP; AudioSet) or `multiclass` (cross-entropy, top-1/top-5; VGGSound).
        num_classes: output classes (527 AudioSet, 309 VGGSound).
        head_depth, head_heads, head_mlp_ratio: classifier blocks (paper: 2; heads and MLP ratio default
            to the backbone's).
        lr, weight_decay, betas: Adam (Table 9: lr 5e-2 AS-20K, 1e-3 VGGSound; decay 5e-7; betas
            (0.95, 0.999)).
        warmup_epochs: linear warm-up, in epochs (fractions allowed), then cosine decay to `min_lr`.
        mixup: share of training clips mixed with another (CAV-MAE's mixup rate; 0 = off).
        mixup_alpha: Beta(alpha, alpha) distribution of the mixing weight (CAV-MAE: 10).
        label_smoothing: training targets `y (1 - s) + s / C` (CAV-MAE's scripts: 0.1).
    """

    def __init__(
        self,
        backbone: CAVMAESync | None = None,
        backbone_checkpoint: str | None = None,
        authors_kwargs: dict | None = None,
        modality: ProbeModality = "audio_visual",
        token: ProbeToken = "global",
        layer: FeatureLayer = "encoder",
        task: ProbeTask = "multilabel",
        num_classes: int = 527,
        head_depth: int = 2,
        head_heads: int | None = None,
        head_mlp_ratio: float | None = None,
        lr: float = 5e-2,
        weight_decay: float = 5e-7,
        betas: tuple[float, float] = (0.95, 0.999),
        warmup_epochs: float = 1.5,
        min_lr: float = 0.0,
        mixup: float = 0.0,
        mixup_alpha: float = 10.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        check_options(modality, token, layer)
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
        check_optimizer("ProbeModule", lr, weight_decay, betas, warmup_epochs, min_lr)  # ConfigError
        check_count("ProbeModule", "num_classes", num_classes, 1)
        check_count("ProbeModule", "head_depth", head_depth, 0)
        check_count("ProbeModule", "head_heads", head_heads, 1, optional=True)
        check_number("ProbeModule", "head_mlp_ratio", head_mlp_ratio, 0, low_open=True, optional=True)
        check_number("ProbeModule", "mixup", mixup, 0, 1)
        check_number("ProbeModule", "mixup_alpha", mixup_alpha, 0, low_open=True)
        check_number("ProbeModule", "label_smoothing", label_smoothing, 0, 1, high_open=True)
        backbone = resolve_backbone(backbone, backbone_checkpoint, authors_kwargs)
        if token == "register" and backbone.registers.count == 0:
            raise ValueError("token='register' needs a backbone with register tokens (num_registers > 0)")
        self.frozen = FrozenBackbone(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.head = ProbeHead(
            self.frozen.width(modality),
            num_classes,
            depth=head_depth,
            num_heads=head_heads or backbone.config["num_heads"],
            mlp_ratio=head_mlp_ratio or backbone.config["mlp_ratio"],
        )
        self.val_metrics = probe_metrics(task, num_classes, prefix="val/")
        self.test_metrics = probe_metrics(task, num_classes, prefix="test/")

    # ------------------------------------------------------------------ features
    @property
    def backbone(self) -> CAVMAESync:
        """The frozen backbone (read-only; data modules read its input sizes from here)."""
        return self.frozen.model

    @property
    def feature_signature(self) -> dict:
        """What the features depend on, for the feature cache's key."""
        return {
            "backbone": self.frozen.fingerprint,
            "modality": self.hparams.modality,
            "token": self.hparams.token,
            "layer": self.hparams.layer,
        }

    def extract_features(self, batch: dict) -> torch.Tensor:
        """Eval-mode clips -> `(B, T, W)` features from the frozen backbone."""
        return self.frozen.tokens(
            batch.get("audio"),
            batch.get("video"),
            self.hparams.modality,
            self.hparams.token,
            self.hparams.layer,
        )

    def features(self, batch: dict) -> torch.Tensor:
        """`(B, T, W)` float features of a batch of cached features or of clips."""
        if "features" in batch:
            features = batch["features"].float()
            if features.ndim != 3 or features.shape[-1] != self.head.width:
                raise ValueError(
                    f"cached features must be (B, T, {self.head.width}) for "
                    f"modality={self.hparams.modality}; got {tuple(features.shape)}"
                )
            return features
        return self.extract_features(batch)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits `(B, num_classes)`."""
        return self.head(self.features(batch))

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        optimizer = adam_optimizer(  # fused on CPU/CUDA: the head is 57 M parameters at ViT-B width
            list(self.head.parameters()),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        steps_per_epoch = total / epochs if epochs else max(1, self.trainer.num_training_batches)
        warmup = (
            max(1, round(self.hparams.warmup_epochs * steps_per_epoch)) if self.hparams.warmup_epochs else 0
        )
        min_ratio = self.hparams.min_lr / self.hparams.lr
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.features(batch)
        targets = soft_targets(batch["label"], self.hparams.num_classes, self.hparams.label_smoothing)
        if self.hparams.mixup:
            features, targets = mixup(features, targets, self.hparams.mixup, self.hparams.mixup_alpha)
        loss = probe_loss(self.head(features), targets, self.hparams.task)
        batch_size = features.shape[0]
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        self.log(
            "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=batch_size
        )
        return loss

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict, split: str, metrics) -> None:
        logits = self(batch)
        labels = batch["label"]
        num_classes, task = self.hparams.num_classes, self.hparams.task
        loss = probe_loss(logits, soft_targets(labels, num_classes), task)
        metrics.update(logits.float(), metric_targets(labels, task, num_classes))
        batch_size = logits.shape[0]
        self.log(f"{split}/loss", loss, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log_dict(metrics, on_epoch=True, on_step=False, batch_size=batch_size, prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """`{"key", "logits", "scores"}`: scores are class probabilities (sigmoid for multilabel, softmax
        for multiclass) in float64, where a float32 sigmoid would tie every logit above ~16.6 at 1.0;
        rank by `logits` (as the metrics do) to keep even float64's ties (above ~36.7) apart."""
        logits = self(batch).double()
        scores = logits.sigmoid() if self.hparams.task == "multilabel" else logits.softmax(dim=-1)
        return {"key": batch.get("key"), "logits": logits, "scores": scores}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_FINGERPRINT] = self.frozen.fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved_options = checkpoint.get("hyper_parameters")
        if saved_options is not None and "layer" not in saved_options and self.hparams.layer != "joint":
            raise CheckpointError(
                "this probe head was trained before the `layer` option existed, on the joint-layer "
                "features: load it with layer='joint'"
            )
        saved = checkpoint.get(CHECKPOINT_FINGERPRINT)
        if saved is not None and saved != self.frozen.fingerprint:
            raise CheckpointError(
                "this probe head was trained on another backbone (weights fingerprint "
                f"{saved[:12]}..., the given backbone has {self.frozen.fingerprint[:12]}...)"
            )
