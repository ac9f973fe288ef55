"""The CAV-MAE Sync backbone and its parts."""

from avsync.model.backbone import CAVMAESync, Embeddings, PretrainOutput
from avsync.model.presets import PRESETS

__all__ = ["CAVMAESync", "Embeddings", "PretrainOutput", "PRESETS"]
