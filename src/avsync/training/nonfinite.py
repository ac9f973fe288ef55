"""Skipping training steps whose loss is NaN or infinite, the same way on every rank, and giving up
when they keep coming.

One bad batch (a corrupt input that slipped through, an overflow) should cost one step, not the run:
the step is skipped and the weights stay those of the last good step. Many in a row mean the run
itself is broken (learning rate, precision, data), and it stops with a message saying so.

Under DDP every rank must take the same decision, or the ranks that still run backward wait forever
for the gradient all-reduce of those that skipped. The guard therefore all-reduces a flag, so a
non-finite loss on any rank skips the step on all of them. The skipped step still runs backward on
every rank (DDP's gradient all-reduce needs all of them; Lightning refuses `training_step` returning
None under DDP), and its gradients are then dropped before the optimizer step
(`PretrainModule.on_before_optimizer_step`): an optimizer without gradients leaves the weights and
its moments untouched, which zeroed gradients would not (Adam would still move by its momentum).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.strategies import Strategy

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite on too many consecutive steps."""


class NonFiniteLossGuard:
    """Counts non-finite losses (on any rank) and says whether the current step must be skipped.

    Args:
        max_consecutive: stop with `NonFiniteLossError` when this many steps in a row were non-finite.
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def should_skip(self, loss: torch.Tensor, strategy: Strategy, step: int) -> bool:
        """Whether the step is to be skipped (identical on every rank); raises once the limit is hit."""
        finite_here = bool(torch.isfinite(loss.detach()).all())
        if strategy.reduce_boolean_decision(finite_here, all=True):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped += 1
        where = f"loss {loss.item()} on this rank" if not finite_here else "non-finite loss on another rank"
        log.warning(
            "step %d: %s; step skipped, weights unchanged (%d in a row, stopping at %d)",
            step,
            where,
            self.consecutive,
            self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            first = step - self.consecutive + 1
            raise NonFiniteLossError(
                f"the loss was NaN or infinite on {self.consecutive} steps in a row (global_step {first} "
                f"to {step}), max_nonfinite_steps={self.max_consecutive}: stopping. Those steps did not "
                "change the weights. Usual causes: a learning rate too high, fp16 overflow (use "
                "bf16-mixed), or corrupt inputs (see the data/skipped_train metric)."
            )
        return True
