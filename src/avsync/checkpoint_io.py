"""Reading weight files without executing code: `torch.load(weights_only=True)` or safetensors.

Every pickle avsync reads (tools, `avsync.load`, and Lightning's resume through `AtomicCheckpointIO`)
goes through `load_pickle`, which passes `weights_only=True` explicitly: on the torch versions avsync
accepts, an explicit `True` wins over `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`, and the weights-only
unpickler has no known way to run code (older ones did: CVE-2025-32434 before 2.6, CVE-2026-24747
before 2.10). A torch older than that is refused rather than trusted.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import IO, Any

import torch
from torch.torch_version import TorchVersion

#: The oldest torch whose weights-only loader avsync trusts (keep equal to pyproject.toml's floor).
MIN_SAFE_TORCH = "2.10"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not the shape the model expects."""


def looks_like_safetensors(path: str | Path) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then a JSON object)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 100_000_000


def _is_pickle_or_zip(source: str | Path | IO[bytes]) -> bool:
    """Whether the data starts as a pickle (PROTO opcode) or a zip (torch's format) does."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                head = handle.read(2)
        else:
            source.seek(0)
            head = source.read(2)
    except (OSError, ValueError):
        return True  # unknown: keep the stricter wording
    return head[:1] == b"\x80" or head == b"PK"


def load_pickle(source: str | Path | IO[bytes], name: str, map_location: Any = "cpu") -> Any:
    """`torch.load(source, weights_only=True)`; every failure is a `CheckpointError` naming `name`."""
    if TorchVersion(torch.__version__) < MIN_SAFE_TORCH:
        raise CheckpointError(
            f"{name}: refused to load: torch {torch.__version__} cannot read pickles safely (its "
            f"weights-only loader can be made to run code); install torch>={MIN_SAFE_TORCH}"
        )
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # the weights-only unpickler met something it will not run
        detail = str(error.__context__ or error).strip()  # torch wraps the short reason in a long text
        if "GLOBAL" not in detail and not _is_pickle_or_zip(source):
            raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({detail})") from None
        raise CheckpointError(
            f"{name}: refused to load: the file holds objects that need code execution to unpickle "
            f"(only tensors, numbers, strings and containers are accepted). Details: {detail}"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... on damaged files
        detail = str(error).split("\n")[0] or type(error).__name__
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({detail})") from None


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
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if looks_like_safetensors(path):
        raise CheckpointError(
            f"{path}: this is a safetensors file, not a PyTorch checkpoint; give it the .safetensors suffix"
        )
    return load_pickle(path, str(path))


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


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
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
