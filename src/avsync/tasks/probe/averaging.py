"""Weight averaging for probing (supplementary Table 9): the uniform mean of the weights at the end of
each epoch from `start_epoch` on - CAV-MAE's `wa` option (the authors average epochs 3 to the last,
counted from 1) - on top of Lightning's `WeightAveraging` callback."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging


class EpochWeightAveraging(WeightAveraging):
    """Averages the LightningModule's weights at the end of epochs `start_epoch, start_epoch + 1, ...`
    (0-based), uniformly; validation, checkpoints and the module after `fit` use the average.

    The snapshot of an epoch is taken on its last training batch, i.e. before that epoch's validation
    and checkpoint, so both include it. Until the first snapshot the current weights are used (the
    base class would evaluate the untrained initial copy instead).

    Args:
        start_epoch: first epoch (0-based) whose end-of-epoch weights enter the average.
        device: where the averaged copy lives (default: the module's device).
    """

    def __init__(self, start_epoch: int = 0, device: str | None = None):
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        super().__init__(device=device, use_buffers=True)
        self.start_epoch = start_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return False  # snapshots are taken in on_train_batch_end, on each epoch's last batch

    @property
    def averaged_epochs(self) -> int:
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            trainer.is_last_batch
            and trainer.current_epoch >= self.start_epoch
            and self._average_model is not None
        ):
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged_epochs:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged_epochs:
            self._swap_models(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged_epochs:
            self._copy_average_to_current(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.averaged_epochs:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
