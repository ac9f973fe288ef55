"""The earlier home of `load_backbone`, `save_backbone` and `resolve_backbone`, kept so that code
written against it (`from avsync.loading import load_backbone`) keeps working: everything about
checkpoints now lives in `avsync.checkpoints`."""

from avsync.checkpoints import (
    CONFIG_METADATA_KEY,
    FORMAT_VERSION,
    load_backbone,
    resolve_backbone,
    save_backbone,
)

__all__ = ["CONFIG_METADATA_KEY", "FORMAT_VERSION", "load_backbone", "resolve_backbone", "save_backbone"]
