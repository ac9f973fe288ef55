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

import inspect
import json
import math
import os
from pathlib import Path

import torch

from avsync.checkpoint_io import CheckpointError, check_backed_by_data, check_finite, read_weights
from avsync.model import CAVMAESync
from avsync.model.interop import load_authors_checkpoint, strip_prefix

CONFIG_METADATA_KEY = "avsync_backbone_config"
BACKBONE_PREFIX = "backbone."
#: Version of the export layout (weights + metadata keys); a reader refuses versions newer than its own.
FORMAT_VERSION_KEY = "format_version"
FORMAT_VERSION = 1


#: Constructor arguments that may be 0 (the others that are integers must be positive).
_MAY_BE_ZERO = {"encoder_depth", "joint_depth", "decoder_depth", "num_registers", "contrastive_head_depth"}
#: Values a model built from the authors' layout may have beyond twice what the file holds.
_SLACK = 2**20
_DEPTHS = ("encoder_depth", "joint_depth", "decoder_depth", "contrastive_head_depth")


def _check_config(config: object, state: dict[str, torch.Tensor], source: str) -> dict:
    """`config` as `CAVMAESync` keyword arguments, or a `CheckpointError` saying which entry is wrong."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: backbone config is a {type(config).__name__}, not a mapping")
    parameters = inspect.signature(CAVMAESync).parameters
    unknown = sorted(str(k) for k in config if k not in parameters)
    if unknown:
        raise CheckpointError(
            f"{source}: backbone config does not fit this avsync version: unknown {unknown}"
        )
    for name, value in config.items():
        default = parameters[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = (
                isinstance(value, int) and not isinstance(value, bool) and value >= (name not in _MAY_BE_ZERO)
            )
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise CheckpointError(f"{source}: backbone config has an invalid {name}: {value!r}")
    # Every block holds several tensors: more blocks than tensors is a lie, caught before building any.
    if sum(config.get(name, parameters[name].default) for name in _DEPTHS) > len(state):
        raise CheckpointError(f"{source}: backbone config declares more blocks than the file has tensors")
    return config


def build_backbone(config: object, state: dict[str, torch.Tensor], source: str, *, exact: bool) -> CAVMAESync:
    """A `CAVMAESync(**config)` on the CPU, built only once the file is known to back it.

    The model is first built on the `meta` device (no memory) and compared with `state`: with `exact`,
    every key and shape must match; otherwise (the authors' layouts, converted and checked key by key
    afterwards) the model may not be much larger than what the file holds (`_SLACK`: room for a few
    wrong shapes, which the conversion then lists). A tiny file declaring a huge model is refused, not
    allocated; weights holding NaN or infinity are refused too (`check_finite`).
    """
    config = _check_config(config, state, source)
    check_backed_by_data(state, source)
    try:
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in CAVMAESync(**config).state_dict().items()}
    except Exception as error:  # the constructor's own checks (heads, mask mode, ...)
        raise CheckpointError(f"{source}: backbone config cannot build a model: {error}") from None
    if exact:
        missing = sorted(set(shapes) - set(state))
        unexpected = sorted(set(state) - set(shapes))
        wrong = [
            f"{k}: {tuple(state[k].shape)} vs {shapes[k]}"
            for k in shapes
            if k in state and tuple(state[k].shape) != shapes[k]
        ]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{source}: weights do not fit the backbone: missing {missing}, unexpected {unexpected}, "
                f"wrong shapes {wrong}"
            )
    else:
        declared = sum(math.prod(shape) for shape in shapes.values())
        held = sum(t.numel() for t in state.values())
        if declared > 2 * held + _SLACK:
            raise CheckpointError(
                f"{source}: the weights' shapes declare a model of {declared} values, the file holds {held}"
            )
    check_finite(state, source)
    return CAVMAESync(**config)


def _load_avsync_state(config: object, state: dict[str, torch.Tensor], source: str) -> CAVMAESync:
    model = build_backbone(config, state, source, exact=True)
    model.load_state_dict(state)
    return model


def _read_metadata_config(path: Path, source: str) -> object:
    """The backbone config from an export's metadata, after checking the format version."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{source}: not a readable safetensors file ({error})") from None
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
    return _load_avsync_state(config, strip_prefix(state, "_orig_mod."), source)


def load_backbone(path: str | Path, **authors_kwargs) -> CAVMAESync:
    """A `CAVMAESync` (in eval mode, on the CPU) from a checkpoint file of any supported format.

    Every problem with the file is a `CheckpointError` naming it; nothing is built before the stored
    tensors are known to fit the declared config.
    """
    path = Path(path)
    source = str(path)
    if path.suffix == ".safetensors":
        state = read_weights(path)
        config = _read_metadata_config(path, source)
        return _load_avsync_state(config, state, source).eval()

    content = read_weights(path)
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
