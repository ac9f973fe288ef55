"""Samples that fail to decode are skipped, never replaced, and counted where the training loop sees them.

`SkipCounter` is the webdataset handler of a split's pipeline: it counts each failure by reason
(`SKIP_REASONS` of `samples.py`, plus `unreadable shard` for tar-level failures) and returns True so
that iteration goes on. Its counts live in a small shared-memory tensor with one row per DataLoader
worker: each worker writes only its own row (no lost updates), and the main process reads the sums
for this rank. Warnings are rate-limited: the first `log_first` skips of each reason are logged in
full (shard URL, key, message), then only running totals at 10, 100, 1000, ... per reason.

Bounds, so that bad data ends a run instead of hanging it or training it on nothing:
- `max_consecutive_skips` skips in a row in one worker (e.g. every sample NaN in resampled mode, which
  would otherwise skip forever) raise `TooManySkips` there;
- `CheckedLoader` turns that, and a pass over a split that skipped samples and yielded no batch at
  all (fixed mode with every sample bad), into `NoUsableData`: a one-line error that exits with
  status 1 (a `SystemExit`, so Lightning still tears down, and `CheckpointOnSignal` saves
  `last.ckpt` first when training had made progress).

`LogSkippedSamples` logs the counts at the end of every epoch (summed over ranks) as
`data/skipped_<split>`, warns with the reasons when an epoch skipped samples, and ends the run with a
summary of how many samples each split skipped and why. `avsync fit` adds it to every run.

A tar-level failure (an unreadable or truncated shard) counts once, for the whole remainder of that
shard: webdataset cannot tell how many samples it held.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator

import lightning as L
import torch
import torch.utils.data
from torch.utils.data import DataLoader

from avsync.data.samples import SKIP_REASONS, SampleError

log = logging.getLogger(__name__)

#: Every reason a sample is counted under; `other` stays last.
REASONS = (*SKIP_REASONS[:-1], "unreadable shard", "other")
_OTHER = REASONS.index("other")


class TooManySkips(RuntimeError):
    """Raised by `SkipCounter` after `max_consecutive_skips` skips in a row; the message is one line."""


class NoUsableData(SystemExit):
    """A split's shards gave nothing to train or evaluate on: stops the run with a one-line message
    (exit status 1) instead of a traceback, a hang, or an epoch of no batches."""

    def __init__(self, split: str, message: str) -> None:
        super().__init__(f"error: {message}")
        self.split = split


class SkipCounter:
    """The webdataset handler of one split: counts, rate-limited warnings, and the skip bound.

    Args:
        split: the split's name, in messages.
        num_workers: DataLoader workers reading the split (one row of counts each).
        max_consecutive_skips: skips in a row (in one worker) that raise `TooManySkips`; None = no bound.
        log_first: skips of each reason logged in full before only totals are.
    """

    def __init__(
        self, split: str, num_workers: int, max_consecutive_skips: int | None = None, log_first: int = 3
    ) -> None:
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be positive, got {max_consecutive_skips}")
        self.split, self.max_consecutive_skips, self.log_first = split, max_consecutive_skips, log_first
        self.counts = torch.zeros((max(1, num_workers), len(REASONS)), dtype=torch.int64).share_memory_()
        # The current run of skips, in this process (each worker is its own stream).
        self._streak: Counter[str] = Counter()
        self._last_error = ""

    def __call__(self, error: Exception) -> bool:
        info = torch.utils.data.get_worker_info()
        slot = (info.id if info is not None else 0) % len(self.counts)
        reason = error.reason if isinstance(error, SampleError) else "unreadable shard"
        column = REASONS.index(reason) if reason in REASONS else _OTHER
        self.counts[slot, column] += 1
        for_reason = int(self.counts[:, column].sum())
        message = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the library wrote
        if for_reason <= self.log_first:
            log.warning(
                "%s: skipped a sample (%s; %d skipped for this reason%s): %s",
                self.split,
                reason,
                for_reason,
                ", further ones are counted, not logged one by one" if for_reason == self.log_first else "",
                message,
            )
        elif _power_of_ten(for_reason):
            log.warning("%s: %d samples skipped so far for %s", self.split, for_reason, reason)
        self._streak[reason] += 1
        self._last_error = message
        streak = self._streak.total()
        if self.max_consecutive_skips is not None and streak >= self.max_consecutive_skips:
            where = f"worker {slot}" if info is not None else "the main process"
            raise TooManySkips(
                f"{self.split}: no usable data: {streak} samples in a row were skipped in {where} "
                f"(max_consecutive_skips={self.max_consecutive_skips}): {_listing(self._streak)}; last: "
                f"{message}. Fix or remove these shards, or raise max_consecutive_skips if they hold "
                "longer runs of bad samples."
            )
        return True

    def passed(self) -> None:
        """A sample decoded: the run of skips is over."""
        if self._streak:
            self._streak.clear()

    @property
    def count(self) -> int:
        """Skips on this rank so far, summed over its workers."""
        return int(self.counts.sum())

    @property
    def by_reason(self) -> dict[str, int]:
        """Skips on this rank so far per reason (only reasons that occurred)."""
        totals = self.counts.sum(dim=0).tolist()
        return {reason: int(n) for reason, n in zip(REASONS, totals, strict=True) if n}


def _power_of_ten(n: int) -> bool:
    return n >= 10 and 10 ** round(math.log10(n)) == n


def _listing(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda item: -item[1]))


class CheckedLoader(DataLoader):
    """A DataLoader over a split's pipeline that ends the run with `NoUsableData` when the split has no
    usable data: a `TooManySkips` from the pipeline (in a worker or here), or a pass that skipped
    samples and yielded no batch."""

    def __init__(self, dataset, *, skips: SkipCounter, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.skips = skips

    def __iter__(self) -> Iterator:
        return _checked(super().__iter__(), self.skips)


def _checked(batches: Iterator, skips: SkipCounter) -> Iterator:
    skipped_before, yielded = skips.count, 0
    try:
        for batch in batches:
            yielded += 1
            yield batch
    except TooManySkips as error:
        raise NoUsableData(skips.split, _original_message(error)) from None
    skipped = skips.count - skipped_before
    if yielded == 0 and skipped:
        raise NoUsableData(
            skips.split,
            f"{skips.split}: no usable data: a pass over the shards gave no batch; {skipped} samples were "
            f"skipped ({_listing(skips.by_reason)}, in all so far; the reasons of the first few are "
            "in the warnings above)",
        )


def _original_message(error: TooManySkips) -> str:
    """The one-line message, also from a worker's error, which the DataLoader re-raises with the
    worker's traceback in front of it."""
    marker = f"{TooManySkips.__name__}: "
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last.split(marker, 1)[1] if marker in last and len(lines) > 1 else str(error)


class LogSkippedSamples(L.Callback):
    """Logs the datamodule's skip counts (`skip_counters`, split -> `SkipCounter`) every epoch as
    `data/skipped_<split>`, warns with the reasons after an epoch that skipped samples, and ends the
    run with a summary of how many samples each split skipped and why (on every rank, its own)."""

    def __init__(self) -> None:
        self._reported: dict[str, int] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        counters = _counters(trainer)
        if not counters:
            return
        parts = [
            f"{split} {counter.count}" + (f" ({_listing(counter.by_reason)})" if counter.count else "")
            for split, counter in counters.items()
        ]
        prefix = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
        if any(counter.count for counter in counters.values()):
            log.warning("%sskipped samples in this run: %s", prefix, "; ".join(parts))
        else:
            log.info("%sno samples were skipped in this run", prefix)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        counter = _counters(trainer).get(split)
        if counter is None:
            return
        count = counter.count
        pl_module.log(f"data/skipped_{split}", float(count), sync_dist=True, reduce_fx="sum")
        if count > self._reported.get(split, 0):
            log.warning("%s: %d samples skipped so far (%s)", split, count, _listing(counter.by_reason))
        self._reported[split] = count


def _counters(trainer: L.Trainer) -> dict[str, SkipCounter]:
    return dict(getattr(trainer.datamodule, "skip_counters", None) or {})
