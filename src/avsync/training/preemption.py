"""Stopping at a step boundary with a checkpoint when the job is told to stop (SIGTERM, SIGUSR1).

Schedulers announce the end of a job with a signal: SLURM sends SIGTERM on pre-emption or
cancellation and, with `#SBATCH --signal=USR1@90`, SIGUSR1 shortly before the time limit; torchrun
forwards SIGTERM to its workers; Kubernetes sends SIGTERM. Lightning's own handling of SIGTERM exits
without a checkpoint, so the steps since the last periodic one are lost.

`CheckpointOnSignal` replaces the handlers while training runs. The handler only notes the signal;
at the end of the current step every rank learns whether any rank got one (an all-reduce of one
number, so the ranks stop together and none waits in a collective), the checkpoint is written where
`--ckpt_path last` finds it (`<ModelCheckpoint dirpath>/last.ckpt`), and the process exits with
status `128 + signal` (143 for SIGTERM, 138 for SIGUSR1), the convention for "ended by this signal",
so that a job script can tell a finished run (0) from one to requeue.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class StoppedBySignal(SystemExit):
    """Training stopped for a signal after saving `checkpoint`; exits with status 128 + `signum`."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


class CheckpointOnSignal(L.Callback):
    """Save a resumable checkpoint and exit at the next step boundary when one of `signals` arrives.

    Args:
        signals: names of the signals to handle (`SIGTERM`, `SIGUSR1`, `SIGINT`, ...).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.received: int = 0
        self._previous: dict[signal.Signals, object] = {}

    # Installed when training starts, i.e. after Lightning installed its own handlers, which are
    # restored when training ends.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: signals will not be turned into checkpoints")
            return
        self.received = 0
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame) -> None:
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        signum = self._signal_on_any_rank(trainer)
        if not signum:
            return
        name = signal.Signals(signum).name
        checkpoint = _last_checkpoint_path(trainer)
        if checkpoint is not None:
            trainer.save_checkpoint(checkpoint)
        _announce(
            f"{name} received: stopped after step {trainer.global_step}; "
            + (
                f"checkpoint saved to {checkpoint}. Resume with the same command and --ckpt_path last."
                if checkpoint is not None
                else "no checkpoint saved (checkpointing is disabled)."
            )
        )
        raise StoppedBySignal(signum, checkpoint)

    def _signal_on_any_rank(self, trainer: L.Trainer) -> int:
        if trainer.world_size == 1:
            return self.received
        flag = torch.tensor(self.received, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max"))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


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
