"""Training throughput by Lightning's `ThroughputMonitor`, without a device sync on every step.

Lightning's monitor calls `torch.cuda.synchronize()` after every training batch to time it. Here
batches and samples are counted on the host at every step and the clock is read (and the device
synchronized) only on the steps that log (`trainer.log_every_n_steps`), which is all the rates need:
they are differences between the first and last of `window_size` timed points.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage


def clips_in_batch(batch: dict) -> int:
    """Clips in an avsync batch (`audio` leads with the batch dimension), read from the shape only."""
    return int(batch["audio"].shape[0])


class ThroughputMonitor(LightningThroughputMonitor):
    """Logs `train/device/samples_per_sec` (and `train/samples_per_sec` over all ranks) every
    `log_every_n_steps`, as an average over the last `window_size` logging steps.

    Args:
        batch_size_fn: samples in a batch (default: `clips_in_batch`).
        window_size: logging steps the rates average over (Lightning's default, 100, would need
            100 logging steps before the first rate).
    """

    def __init__(self, batch_size_fn=clips_in_batch, window_size: int = 4, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_size_fn, window_size=window_size, **kwargs)

    def _update(self, trainer, pl_module, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING or trainer._logger_connector.should_update_logs:
            super()._update(trainer, pl_module, batch, iter_num)
            return
        self._samples[stage] += self.batch_size_fn(batch)  # counted on the host: no device sync
        self._batches[stage] += 1
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
