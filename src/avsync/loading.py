"""One function to get a backbone out of any checkpoint avsync understands.

Formats, recognized by their contents (never by executing code):
- a Lightning checkpoint of any avsync task (`state_dict` with `backbone.` keys, the backbone's
  constructor arguments in `hyper_parameters.backbone_config`);
- an avsync safetensors export (weights plus the config as JSON in the file's metadata);
- the authors' CAV-MAE Sync release or an original CAV-MAE checkpoint (their key names, optionally
  `module.`-prefixed); pass the authors' constructor arguments that the weights cannot reveal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from avsync.checkpoint_io import CheckpointError, read_weights
from avsync.model import CAVMAESync
from avsync.model.interop import load_authors_checkpoint, strip_prefix

CONFIG_METADATA_KEY = "avsync_backbone_config"
BACKBONE_PREFIX = "backbone."


def _load_avsync_state(config: dict, state: dict[str, torch.Tensor], source: str) -> CAVMAESync:
    try:
        model = CAVMAESync(**config)
    except TypeError as error:
        raise CheckpointError(f"{source}: backbone config does not fit this avsync version: {error}") from error
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: weights do not fit the backbone: missing {missing}, unexpected {unexpected}, wrong shapes {wrong}"
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
            raise CheckpointError(f"{source}: safetensors file without an avsync backbone config in its metadata")
        return _load_avsync_state(json.loads(metadata[CONFIG_METADATA_KEY]), state, source).eval()

    content = read_weights(path)
    if isinstance(content, dict) and "state_dict" in content and "hyper_parameters" in content:
        config = content["hyper_parameters"].get("backbone_config")
        if config is None:
            raise CheckpointError(f"{source}: Lightning checkpoint without a backbone_config hyper-parameter")
        state = {
            k[len(BACKBONE_PREFIX) :]: v for k, v in content["state_dict"].items() if k.startswith(BACKBONE_PREFIX)
        }
        return _load_avsync_state(config, strip_prefix(state, "_orig_mod."), source).eval()
    return load_authors_checkpoint(content, source=source, **authors_kwargs).eval()
