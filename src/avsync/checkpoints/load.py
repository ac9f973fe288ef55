"""One function to get a backbone out of any checkpoint avsync understands, from one read of the file.

Formats, recognized by their contents (never by executing code):
- a Lightning checkpoint of any avsync task (`state_dict` with `backbone.` keys, the backbone's
  constructor arguments in `hyper_parameters.backbone_config`);
- an avsync safetensors export (weights plus the config as JSON in the file's metadata, `export.py`);
- the authors' CAV-MAE Sync release or an original CAV-MAE checkpoint (their key names, optionally
  `module.`-prefixed, `authors.py`); pass the authors' constructor arguments that the weights cannot
  reveal.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import torch

from avsync.checkpoints.authors import load_authors_checkpoint
from avsync.checkpoints.export import config_from_metadata
from avsync.checkpoints.formats import CheckpointError, read, read_pickle, strip_prefix
from avsync.checkpoints.validate import build_backbone, check_lightning
from avsync.model import CAVMAESync

BACKBONE_PREFIX = "backbone."
#: Why a run cannot resume from (or validate / test) a safetensors file.
SAFETENSORS_IS_NOT_A_RUN = (
    "a safetensors file holds weights only; a run resumes from (and validate / test read) a Lightning "
    "checkpoint (.ckpt)"
)


def _avsync_backbone(config: object, state: dict[str, torch.Tensor], source: str) -> CAVMAESync:
    model = build_backbone(config, state, source, exact=True)
    model.load_state_dict(state)
    return model


def _lightning_backbone(content: dict, source: str) -> CAVMAESync:
    hyper_parameters, weights = content["hyper_parameters"], content["state_dict"]
    if not isinstance(hyper_parameters, dict) or not isinstance(weights, dict):
        raise CheckpointError(
            f"{source}: Lightning checkpoint whose hyper_parameters or state_dict is not a mapping"
        )
    config = hyper_parameters.get("backbone_config")
    if config is None:
        raise CheckpointError(f"{source}: Lightning checkpoint without a backbone_config hyper-parameter")
    state = {
        str(k)[len(BACKBONE_PREFIX) :]: v for k, v in weights.items() if str(k).startswith(BACKBONE_PREFIX)
    }
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: Lightning checkpoint whose backbone weights are not all tensors")
    return _avsync_backbone(config, strip_prefix(state, "_orig_mod."), source)


def load_backbone(path: str | Path, **authors_kwargs) -> CAVMAESync:
    """A `CAVMAESync` (in eval mode, on the CPU) from a checkpoint file of any supported format.

    The file is opened once; every problem with it is a `CheckpointError` naming it; nothing is built
    before the stored tensors are known to fit the declared config.
    """
    source = str(path)
    stored = read(path)
    if stored.metadata is not None:  # a safetensors file: an avsync export
        config = config_from_metadata(stored.metadata, source)
        return _avsync_backbone(config, stored.content, source).eval()
    content = stored.content
    if isinstance(content, dict) and "state_dict" in content and "hyper_parameters" in content:
        return _lightning_backbone(content, source).eval()
    return load_authors_checkpoint(content, source=source, **authors_kwargs).eval()


def resolve_backbone(
    backbone: CAVMAESync | None = None,
    backbone_checkpoint: str | Path | None = None,
    authors_kwargs: dict | None = None,
    *,
    backbone_config: dict | None = None,
) -> CAVMAESync:
    """The one way every task module gets its backbone, from exactly one source:

    - `backbone`: a model built in code, used as it is;
    - `backbone_checkpoint`: a file of any format `load_backbone` reads (`authors_kwargs` for the
      authors' files);
    - `backbone_config`: constructor arguments, for a module whose own checkpoint holds the backbone
      weights (reloading it rebuilds the model here, then Lightning restores the weights) or that
      trains one from scratch.
    """
    sources = {
        "backbone": backbone,
        "backbone_checkpoint": backbone_checkpoint,
        "backbone_config": backbone_config,
    }
    given = [name for name, value in sources.items() if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of backbone, backbone_checkpoint or backbone_config (got {given or 'none'})"
        )
    if backbone is not None:
        return backbone
    if backbone_checkpoint is not None:
        return load_backbone(backbone_checkpoint, **(authors_kwargs or {}))
    return CAVMAESync(**backbone_config)


def read_lightning_checkpoint(
    handle: IO[bytes],
    name: str,
    map_location: Any = None,
    *,
    module: torch.nn.Module | None = None,
    training_state: bool = False,
) -> dict[str, Any]:
    """The Lightning checkpoint in the open binary `handle` (a run's `--ckpt_path`), read weights-only
    and checked for the run (`validate.check_lightning`) before Lightning touches the module."""
    checkpoint = read_pickle(handle, name, map_location, safetensors_hint=SAFETENSORS_IS_NOT_A_RUN)
    check_lightning(checkpoint, name, module=module, training_state=training_state)
    return checkpoint
