"""Keeping long training runs alive: atomic checkpoints, stopping on signals, skipping non-finite steps."""

from avsync.training.atomic_checkpoint import AtomicCheckpointIO
from avsync.training.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from avsync.training.preemption import CheckpointOnSignal, StoppedBySignal

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointOnSignal",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "StoppedBySignal",
]
