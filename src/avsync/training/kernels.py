"""The CPU kernels of a Lightning run, chosen where the run chooses its precision (`avsync.kernels`)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from avsync.kernels import MODES, cache_path, chosen_kernels, kernel_cache, use_kernels


class KernelChoice(Callback):
    """Gives the run's model the linear and attention kernels measured fastest on this host (CPU only;
    GPUs keep PyTorch's) and says which after the first batch. `mode`: `auto` (cached measurements),
    `library` (PyTorch's defaults) or `measure`; None reads `AVSYNC_KERNELS`. Added to every
    `avsync fit/test/...` run by default."""

    def __init__(self, mode: str | None = None):
        if mode is not None and mode not in MODES:
            raise ValueError(f"KernelChoice(mode={mode!r}): use one of {', '.join(MODES)}")
        self.mode = mode
        self._reported = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        use_kernels(pl_module, self.mode)

    def _report(self, pl_module: L.LightningModule) -> None:
        if self._reported:
            return
        self._reported = True
        layers = ", ".join(f"{name} x{count}" for name, count in chosen_kernels(pl_module).items())
        measuring = kernel_cache().measuring_s
        source = f"measured in {measuring:.1f} s" if measuring else "read"
        rank_zero_info(
            f"Kernels: {layers} ({source}; cache {cache_path()}; AVSYNC_KERNELS=library for PyTorch's own)"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._report(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(pl_module)
