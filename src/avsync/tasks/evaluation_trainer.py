"""The Trainer for one-off evaluation passes (retrieval, localization, the demo's scoring)."""

from __future__ import annotations

import logging

import lightning as L

from avsync.training.kernels import KernelChoice

#: Where Lightning announces the hardware ("GPU available: False, used: False", "TPU available: ...")
#: and its product tips ("💡 Tip: ... litlogger"): noise around a tool's results.
ANNOUNCING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_lightning() -> None:
    """Keep Lightning's warnings and errors, drop its informational banners (process-wide: the tools and
    the demo's scoring print their own results, and these banners only repeat on every pass)."""
    for name in ANNOUNCING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def evaluation_trainer(**overrides) -> L.Trainer:
    """A single-device Trainer without logger, checkpoints, progress bar, model summary or hardware
    banner; `overrides` are Trainer arguments (e.g. `accelerator`, `precision`, `max_epochs` for a probe
    fit). The run's CPU kernels are the ones measured fastest on this host (`KernelChoice`)."""
    quiet_lightning()
    settings = dict(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    callbacks = [*(overrides.pop("callbacks", None) or []), KernelChoice()]
    return L.Trainer(**(settings | overrides), callbacks=callbacks)
