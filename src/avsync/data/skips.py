"""Samples that fail to decode are skipped, never replaced, and counted where the training loop sees them.

`SkipCounter` is the webdataset handler of a split's pipeline: it logs each failure (with the shard
URL and the reason webdataset attached) and returns True so that iteration goes on. Its counts live
in a small shared-memory tensor with one slot per DataLoader worker: each worker writes only its own
slot (no lost updates), and the main process reads the sum for this rank. `LogSkippedSamples` logs
that sum at the end of every epoch (summed over ranks), as `data/skipped_<split>`.

A tar-level failure (an unreadable or truncated shard) counts once, for the whole remainder of that
shard: webdataset cannot tell how many samples it held.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.utils.data

log = logging.getLogger(__name__)


class SkipCounter:
    def __init__(self, split: str, num_workers: int) -> None:
        self.split = split
        self.counts = torch.zeros(max(1, num_workers), dtype=torch.int64).share_memory_()

    def __call__(self, error: Exception) -> bool:
        info = torch.utils.data.get_worker_info()
        slot = (info.id if info is not None else 0) % len(self.counts)
        self.counts[slot] += 1
        log.warning(
            "%s: skipped a sample that failed to decode (%d skipped by %s so far): %s: %s",
            self.split,
            int(self.counts[slot]),
            f"worker {slot}" if info is not None else "the main process",
            type(error).__name__,
            error,
        )
        return True

    @property
    def count(self) -> int:
        """Skips on this rank so far, summed over its workers."""
        return int(self.counts.sum())


class LogSkippedSamples(L.Callback):
    """Logs the datamodule's skip counts (`skipped_samples`, a split -> count dict) every epoch."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    @staticmethod
    def _log(trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        counts = getattr(trainer.datamodule, "skipped_samples", None)
        if counts is not None and split in counts:
            pl_module.log(f"data/skipped_{split}", float(counts[split]), sync_dist=True, reduce_fx="sum")
