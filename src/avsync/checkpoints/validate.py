"""Checks that run on the tensors a file gave, before any model is built from them.

A checkpoint is data from anywhere: its config may declare a model of any size, its tensors may be
views promising more values than the file holds, its weights may be NaN. Each check here refuses such a
file with a `CheckpointError` naming it, so that nothing is allocated or run on a lie.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

from avsync.checkpoints.formats import CheckpointError
from avsync.model import CAVMAESync

#: Constructor arguments that may be 0 (the others that are integers must be positive).
_MAY_BE_ZERO = {"encoder_depth", "joint_depth", "decoder_depth", "num_registers", "contrastive_head_depth"}
#: Values a model built from the authors' layout may have beyond twice what the file holds.
_SLACK = 2**20
DEPTHS = ("encoder_depth", "joint_depth", "decoder_depth", "contrastive_head_depth")
#: What a `fit` resume reads besides the weights (absent from `save_weights_only` checkpoints).
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops")


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: a model built from them embeds every clip as NaN, which
    a tool would otherwise write, rank or index as if it were an answer."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not _all_finite(tensor)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{source}: weights hold NaN or infinite values ({', '.join(bad[:3])}{more}); the model "
            "cannot be used (a diverged run's checkpoint? take an earlier one)"
        )


def _all_finite(tensor: torch.Tensor) -> bool:
    """`isfinite(tensor).all()`, through `aminmax` (which propagates NaN): ten times faster on a CPU,
    with no tensor of flags as large as the weights."""
    if not tensor.numel():
        return True
    try:
        low, high = torch.aminmax(tensor)
    except RuntimeError:  # a dtype aminmax does not cover (float8): widened, NaN stays NaN
        low, high = torch.aminmax(tensor.float())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_backed_by_data(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that promise more values than the file holds (stride-0 or overlapping views of
    one small storage): a few bytes on disk could otherwise make a loader build a model of any size."""
    declared = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    storages = {
        (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()) for tensor in state.values()
    }
    held = sum(nbytes for _, nbytes in storages)
    if declared > held:
        raise CheckpointError(
            f"{source}: its tensors declare {declared} bytes but hold only {held} (broadcast or "
            "overlapping views of a smaller storage, not weights)"
        )


def check_config(config: object, state: dict[str, torch.Tensor], source: str) -> dict:
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
    if sum(config.get(name, parameters[name].default) for name in DEPTHS) > len(state):
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
    config = check_config(config, state, source)
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


def check_lightning(
    checkpoint: Any,
    name: str,
    *,
    module: torch.nn.Module | None = None,
    training_state: bool = False,
) -> None:
    """Refuse a Lightning checkpoint that cannot serve the run: no `state_dict` of tensors, weights
    that are not finite, no optimizer/scheduler/loop state for a `fit` resume (`training_state`), or
    weights that do not fit `module` (checked when it loads strictly)."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{name}: not a Lightning checkpoint (no state_dict mapping)")
    if not isinstance(checkpoint.get("hyper_parameters", {}), Mapping):
        raise CheckpointError(f"{name}: its hyper_parameters are not a mapping")
    state = checkpoint["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{name}: its state_dict is not a mapping of names to tensors")
    check_finite(state, name)
    if training_state:
        absent = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
        if absent:
            raise CheckpointError(
                f"{name}: holds no training state ({', '.join(absent)} missing: saved with "
                "save_weights_only, or not a training checkpoint); fit cannot resume from it"
            )
    if module is not None and getattr(module, "strict_loading", True):
        own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != own[k])
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{name}: its weights do not fit the configured model (another model or config): "
                f"missing {_some(missing)}, unexpected {_some(unexpected)}, wrong shapes {_some(wrong)}"
            )


def _some(keys: list[str], limit: int = 5) -> str:
    return str(keys[:limit])[:-1] + (f", ... {len(keys) - limit} more]" if len(keys) > limit else "]")
