"""Stopping at a step boundary with a checkpoint when the job is told to stop (SIGTERM, SIGUSR1).

Schedulers announce the end of a job with a signal: SLURM sends SIGTERM on pre-emption or
cancellation and, with `#SBATCH --signal=USR1@90`, SIGUSR1 shortly before the time limit; torchrun
forwards SIGTERM to its workers; Kubernetes sends SIGTERM. Lightning's own handling of SIGTERM exits
without a checkpoint, so the steps since the last periodic one are lost.

`CheckpointOnSignal` replaces the handlers while training runs. The handler only notes the signal;
at the end of the step every rank learns whether any rank got one (alone: every step; on several
ranks every `check_every_n_steps` steps, by an all-reduce of one number, so that the ranks stop
together, none waits in a collective, and the device is not synchronized with the host each step),
the checkpoint is written where `--ckpt_path last` finds it (`<ModelCheckpoint dirpath>/last.ckpt`),
and the process exits with status `128 + signal` (143 for SIGTERM, 138 for SIGUSR1), the
convention for "ended by this signal", so that a job script can tell a finished run (0) from one to requeue.

Between steps, while the next batch is fetched (a loader skipping bad samples, a stalled remote
shard: this can take long, even forever), a single-rank run stops at once: the handler raises, and
`last.ckpt` (the weights of the last finished step) is written on the way out. On several ranks the
signal waits for the step end (stopping one rank alone would leave the others in a collective).
A run that ends for lack of usable training data (`avsync.data.skips.NoUsableData`) after some
steps also writes `last.ckpt` (one rank), so that it resumes once the shards are fixed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops import fetchers
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

#: How to resume, said after the checkpoint is saved; a program that resumes by itself (`avsync demo`)
#: replaces it with its own advice.
RESUME_HINT = "Resume with the same command and --ckpt_path last."


class StoppedBySignal(SystemExit):
    """Training stopped for a signal after saving `checkpoint`; exits with status 128 + `signum`."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


class CheckpointOnSignal(L.Callback):
    """Save a resumable checkpoint and exit at the next step boundary when one of `signals` arrives.

    Args:
        signals: names of the signals to handle (`SIGTERM`, `SIGUSR1`, `SIGINT`, ...).
        check_every_n_steps: on several ranks, agree on the signal every this many training batches
            (the all-reduce waits for the device, a host sync); one rank alone checks every batch, for free.
            Schedulers give tens of seconds of grace, far more than a few steps.
    """

    def __init__(
        self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"), check_every_n_steps: int = 10
    ) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}")
        self.signals = [signal.Signals[name] for name in signals]
        self.check_every_n_steps = check_every_n_steps
        self._batches = 0  # training batches seen, the same count on every rank
        self.received: int = 0
        self._previous: dict[signal.Signals, object] = {}
        self._trainer: L.Trainer | None = None  # while training runs: the handler stops between steps
        self._between_steps = False  # a signal stopped the run while a batch was fetched

    # Installed when training starts, i.e. after Lightning installed its own handlers, which are
    # restored when training ends.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: signals will not be turned into checkpoints")
            return
        self.received = 0
        self._batches = 0
        self._trainer, self._between_steps = trainer, False
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame) -> None:
        self.received = signum
        trainer = self._trainer
        if (
            trainer is not None
            and not self._between_steps
            and trainer.world_size == 1
            and trainer.training
            and _fetching_a_batch(frame)
        ):
            self._between_steps = True  # on_exception saves the checkpoint; later signals are only noted
            raise StoppedBySignal(signum, None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        signum = self._signal_on_any_rank(trainer)
        if not signum:
            return
        checkpoint = _save_last(trainer, f"{signal.Signals(signum).name} received")
        raise StoppedBySignal(signum, checkpoint)

    def _signal_on_any_rank(self, trainer: L.Trainer) -> int:
        if trainer.world_size == 1:
            return self.received
        self._batches += 1
        if self._batches % self.check_every_n_steps:
            return 0  # every rank skips the same batches, so none waits in the collective
        flag = torch.tensor(self.received, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max"))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        try:
            if isinstance(exception, StoppedBySignal) and self._between_steps:
                name = signal.Signals(exception.signum).name
                exception.checkpoint = _save_last(trainer, f"{name} received while fetching the next batch")
            elif _no_training_data(exception) and trainer.world_size == 1 and trainer.global_step > 0:
                _save_last(trainer, "no usable training data")
        finally:
            self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._trainer, self._between_steps = None, False


_FETCHERS = os.path.normcase(os.path.splitext(fetchers.__file__)[0])


def _fetching_a_batch(frame) -> bool:
    """Whether the interrupted code is Lightning fetching a batch (its data fetcher is on the stack)."""
    while frame is not None:
        if os.path.normcase(os.path.splitext(frame.f_code.co_filename)[0]) == _FETCHERS:
            return True
        frame = frame.f_back
    return False


def _no_training_data(exception: BaseException) -> bool:
    from avsync.data.skips import NoUsableData  # training does not otherwise depend on data

    return isinstance(exception, NoUsableData) and exception.split == "train"


def _save_last(trainer: L.Trainer, why: str) -> Path | None:
    """Write `last.ckpt` (where `--ckpt_path last` finds it) and say so, with `why` the run stopped."""
    checkpoint = _last_checkpoint_path(trainer)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint, weights_only=False)  # full state, for a resume
    _announce(
        f"{why}: stopped after step {trainer.global_step}; "
        + (
            f"checkpoint saved to {checkpoint}. {RESUME_HINT}"
            if checkpoint is not None
            else "no checkpoint saved (checkpointing is disabled)."
        )
    )
    return checkpoint


def _last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """`last.ckpt` (or the configured last name) in the first ModelCheckpoint's directory."""
    callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if callback is None or callback.dirpath is None:
        return None
    metrics = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
    return Path(callback.format_checkpoint_name(metrics, filename=callback.CHECKPOINT_NAME_LAST))


@rank_zero_only
def _announce(message: str) -> None:
    log.warning(message)
