"""The Trainer for one-off evaluation passes (retrieval, localization, the demo's scoring)."""

from __future__ import annotations

import lightning as L


def evaluation_trainer(**overrides) -> L.Trainer:
    """A single-device Trainer without logger, checkpoints, progress bar or model summary; `overrides`
    are Trainer arguments (e.g. `accelerator`, `precision`, `max_epochs` for a probe fit)."""
    settings = dict(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(settings | overrides))
