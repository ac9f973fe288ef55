"""One function to get a backbone out of any checkpoint avsync understands.

Formats, recognized by their contents (never by executing code):
- a Lightning checkpoint of any avsync task (`state_dict` with `backbone.` keys, the backbone's
  constructor arguments in `hyper_parameters.backbone_config`);
- an avsync safetensors export (weights plus the config as JSON in the file's metadata);
- the authors' CAV-MAE Sync release or an original CAV-MAE checkpoint (their key names, optionally
  `module.`-prefixed); pass the authors' constructor arguments that the weights cannot reveal.

`save_backbone` writes the export format: one safetensors file whose metadata carries the config, so
that the file alone rebuilds the model (no pickle, no code, nothing else to keep beside it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from avsync.checkpoint_io import CheckpointError, read_weights
from avsync.model import CAVMAESync
from avsync.model.interop import load_authors_checkpoint, strip_prefix

CONFIG_METADATA_KEY = "avsync_backbone_config"
BACKBONE_PREFIX = "backbone."
#: Version of the export layout (weights + metadata keys); a reader refuses versions newer than its own.
FORMAT_VERSION_KEY = "format_version"
FORMAT_VERSION = 1


def _load_avsync_state(config: dict, state: dict[str, torch.Tensor], source: str) -> CAVMAESync:
    try:
        model = CAVMAESync(**config)
    except TypeError as error:
        raise CheckpointError(
            f"{source}: backbone config does not fit this avsync version: {error}"
        ) from error
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: weights do not fit the backbone: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}"
        )
    model.load_state_dict(state)
    return model


def load_backbone(path: str | Path, **authors_kwargs) -> CAVMAESync:
    """A `CAVMAESync` (in eval mode, on the CPU) from a checkpoint file of any supported format."""
    path = Path(path)
    source = str(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state = read_weights(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if CONFIG_METADATA_KEY not in metadata:
            raise CheckpointError(
                f"{source}: safetensors file without an avsync backbone config in its metadata"
            )
        version = metadata.get(FORMAT_VERSION_KEY, str(FORMAT_VERSION))
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: export format version {version!r} is not one this avsync reads (up to "
                f"{FORMAT_VERSION}); upgrade avsync"
            )
        return _load_avsync_state(json.loads(metadata[CONFIG_METADATA_KEY]), state, source).eval()

    content = read_weights(path)
    if isinstance(content, dict) and "state_dict" in content and "hyper_parameters" in content:
        config = content["hyper_parameters"].get("backbone_config")
        if config is None:
            raise CheckpointError(f"{source}: Lightning checkpoint without a backbone_config hyper-parameter")
        state = {
            k[len(BACKBONE_PREFIX) :]: v
            for k, v in content["state_dict"].items()
            if k.startswith(BACKBONE_PREFIX)
        }
        return _load_avsync_state(config, strip_prefix(state, "_orig_mod."), source).eval()
    return load_authors_checkpoint(content, source=source, **authors_kwargs).eval()


def resolve_backbone(
    backbone: CAVMAESync | None, backbone_checkpoint: str | Path | None, authors_kwargs: dict | None = None
) -> CAVMAESync:
    """The backbone a task module was given, or the one its checkpoint path names (exactly one of them)."""
    if (backbone is None) == (backbone_checkpoint is None):
        raise ValueError("give exactly one of backbone or backbone_checkpoint")
    if backbone is not None:
        return backbone
    return load_backbone(backbone_checkpoint, **(authors_kwargs or {}))


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
