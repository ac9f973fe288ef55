"""Checkpoints that are either the previous file or the complete new one, never a torn write.

Lightning's default writer serializes the whole checkpoint into memory, writes it to a temporary file
in the system temp directory and moves it into place. On a cluster the temp directory is usually
another filesystem than the checkpoint directory (node-local disk or tmpfs vs. a shared filesystem),
where the move becomes a copy into the final name: a job killed during that copy leaves a truncated
`last.ckpt`, and nothing is fsynced, so a node crash can leave an empty one.

`AtomicCheckpointIO` streams the checkpoint into `<name>.partial` beside its destination, fsyncs it,
renames it over the destination (`os.replace`, atomic within one filesystem) and fsyncs the directory.
The `.partial` name is not one that `ckpt_path="last"` or a `*.ckpt` glob picks up; a leftover from a
killed save is overwritten by the next save to the same name.

This plugin is the run's writer. It is not a second reader: a load (Lightning's resume, `--ckpt_path`
of every subcommand) opens the file once, here or through fsspec for a remote one, and hands the handle
to `avsync.checkpoints.read_lightning_checkpoint`, which reads it weights-only whatever the caller
asked and refuses a file that cannot serve the run (another format, no training state for `fit`,
weights of another model) with a `CheckpointError` naming it, before Lightning touches the module.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from avsync.checkpoints import CheckpointError, read_lightning_checkpoint
from avsync.checkpoints.load import SAFETENSORS_IS_NOT_A_RUN

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """Where a checkpoint bound for `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic and durable (see the module docstring).

    Remote destinations (`s3://...`, other fsspec URLs) keep Lightning's transactional upload.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        destination = Path(path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = partial_path(destination)
        with open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
        _fsync_directory(destination.parent)  # make the rename itself survive a crash
        log.debug("saved checkpoint %s", destination)

    def expect(self, module: Any = None, *, training_state: bool = False) -> None:
        """What the next load must fit: `module`'s weights (checked when it loads strictly) and, for a
        `fit` resume, the optimizer, scheduler and loop state. Set by avsync's CLI before it runs."""
        self._module = None if module is None else weakref.ref(module)
        self._training_state = training_state

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at `path`, read weights-only (`weights_only=False` is refused, not obeyed)."""
        if weights_only is False:
            raise CheckpointError(
                f"{path}: avsync reads checkpoints weights-only; weights_only=False is refused"
            )
        filesystem = get_filesystem(path)
        if not filesystem.exists(path):
            raise CheckpointError(f"{path}: no such checkpoint file")
        if str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path}: {SAFETENSORS_IS_NOT_A_RUN}")
        module = getattr(self, "_module", None)
        with filesystem.open(path, "rb") as handle:  # the one opening of the file
            return read_lightning_checkpoint(
                handle,
                str(path),
                map_location,
                module=module() if module is not None else None,
                training_state=getattr(self, "_training_state", False),
            )


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
