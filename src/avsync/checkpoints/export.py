"""avsync's own export: one safetensors file whose metadata carries the backbone config, so that the
file alone rebuilds the model (no pickle, no code, nothing else to keep beside it)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from avsync.checkpoints.formats import MAX_HEADER_BYTES, CheckpointError
from avsync.model import CAVMAESync

CONFIG_METADATA_KEY = "avsync_backbone_config"
#: Version of the export layout (weights + metadata keys); a reader refuses versions newer than its own.
FORMAT_VERSION_KEY = "format_version"
FORMAT_VERSION = 1


def config_from_metadata(metadata: dict[str, str], source: str) -> object:
    """The backbone config in an export's header metadata, after checking the format version (the
    config's entries are checked by `validate.check_config`)."""
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointError(f"{source}: safetensors file without an avsync backbone config in its metadata")
    version = metadata.get(FORMAT_VERSION_KEY, str(FORMAT_VERSION))
    if not (version.isascii() and version.isdigit()) or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: export format version {version!r} is not one this avsync reads (up to "
            f"{FORMAT_VERSION}); upgrade avsync"
        )
    try:
        return json.loads(metadata[CONFIG_METADATA_KEY])
    except ValueError as error:
        raise CheckpointError(
            f"{source}: the backbone config in its metadata is not JSON ({error})"
        ) from None
    except RecursionError:  # `[[[[...` thousands deep: no config nests more than a few levels
        raise CheckpointError(
            f"{source}: the backbone config in its metadata is nested too deeply to be a config"
        ) from None


def _umask() -> int:
    """The process's umask (read by setting it, the only portable way, and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_backbone(
    backbone: CAVMAESync, path: str | Path, *, source: str | None = None, json_sidecar: bool = False
) -> Path:
    """Write `backbone`'s weights and constructor arguments to `path` (`.safetensors`), which
    `load_backbone` reads back into an identical model.

    The metadata holds the config as JSON under `CONFIG_METADATA_KEY`, the `format_version`, the avsync
    version and `source` (what the weights came from). `json_sidecar` also writes the same description
    to `path` with a `.json` suffix, for people and tools that do not read safetensors headers.
    """
    from safetensors.torch import save_file

    from avsync import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the export must end in .safetensors (that suffix is how it is recognized)")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    description = {
        FORMAT_VERSION_KEY: str(FORMAT_VERSION),
        "avsync_version": __version__,
        CONFIG_METADATA_KEY: json.dumps(backbone.config, sort_keys=True),
    }
    if source is not None:
        description["source"] = str(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(state, str(partial), metadata=description)
        os.chmod(partial, 0o666 & ~_umask())  # safetensors creates 600; other outputs follow the umask
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)  # a killed export never leaves a truncated file under the final name
    if json_sidecar:
        readable = {
            **description,
            FORMAT_VERSION_KEY: FORMAT_VERSION,
            CONFIG_METADATA_KEY: backbone.config,
            "tensors": len(state),
        }
        path.with_suffix(".json").write_text(json.dumps(readable, indent=2, sort_keys=True) + "\n")
    return path


def is_backbone_export(path: str | Path) -> bool:
    """Whether `path` is an avsync safetensors export (the header's metadata holds the backbone config
    under `avsync_backbone_config`), from its header alone: the only kind of existing file `avsync
    export` replaces."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size)) if size <= MAX_HEADER_BYTES else None
    except (OSError, struct.error, ValueError, RecursionError):  # too short, not JSON: not safetensors
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and CONFIG_METADATA_KEY in metadata


def is_export_description(path: str | Path) -> bool:
    """Whether `path` is the JSON description `avsync export --json` writes beside an export."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        return False
    return isinstance(stored, dict) and {CONFIG_METADATA_KEY, "avsync_version"} <= set(stored)
