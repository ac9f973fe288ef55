"""Reading weight files without executing code: `torch.load(weights_only=True)` or safetensors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not the shape the model expects."""


def read_weights(path: str | Path) -> Any:
    """The object stored in a `.pt`/`.pth`/`.ckpt` (weights only) or `.safetensors` file, on the CPU.

    A pickle that would need to run code (a class, a function, a `__reduce__` payload) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects that need code execution to unpickle "
            f"(only tensors, numbers, strings and containers are accepted). Details: {error}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from error


def state_dict_of(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint: the object itself, or its `state_dict`/`model` entry."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise CheckpointError(f"{source}: no state dict (a mapping of names to tensors) found")
