"""PretrainModule on real shards in-process: the pieces the CLI tests do not reach."""

from __future__ import annotations

import lightning as L

from avsync.data.datamodule import AVShardDataModule
from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule


def test_fit_without_validation_shards_skips_validation(demo_run):
    data = AVShardDataModule(
        train_shards=str(demo_run.workdir / "train"),
        batch_size=4,
        num_workers=0,
        resampled=True,
        epoch_length=8,
    )
    module = PretrainModule(CAVMAESync.from_preset("tiny"), warmup_epochs=0)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert not any(name.startswith("val/") for name in trainer.callback_metrics)
