"""Reading a weight file once, without executing code: `torch.load(weights_only=True)` or safetensors.

`read(path)` opens the file once and returns everything in it: the unpickled object of a
`.pt`/`.pth`/`.ckpt`, or a `.safetensors` file's tensors together with its header metadata (one
`safe_open` session, not a tensor read and a second metadata read). A pickle is recognised from the
bytes of the same handle it is then loaded from.

Every pickle avsync reads (tools, `avsync.load`, and Lightning's resume through `AtomicCheckpointIO`)
goes through `load_pickle`, which passes `weights_only=True` explicitly: on the torch versions avsync
accepts, an explicit `True` wins over `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`, and the weights-only
unpickler has no known way to run code (older ones did: CVE-2025-32434 before 2.6, CVE-2026-24747
before 2.10). A torch older than that is refused rather than trusted.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch.torch_version import TorchVersion

#: The oldest torch whose weights-only loader avsync trusts (keep equal to pyproject.toml's floor).
MIN_SAFE_TORCH = "2.10"
#: A safetensors header larger than this is not a header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
SAFETENSORS_NAMED_AS_PICKLE = (
    "this is a safetensors file, not a PyTorch checkpoint; give it the .safetensors suffix"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not the shape the model expects."""


@dataclass(frozen=True)
class Stored:
    """What one read of a checkpoint file gave: `content` (the unpickled object, or a safetensors file's
    name-to-tensor mapping) and, for safetensors, the header's `metadata` (None for a pickle)."""

    content: Any
    metadata: dict[str, str] | None = None


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes start a safetensors file (8-byte header length, then a JSON object)."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < MAX_HEADER_BYTES


def _is_pickle_or_zip(source: str | Path | IO[bytes]) -> bool:
    """Whether the data starts as a pickle (PROTO opcode) or a zip (torch's format) does (read from the
    handle already open, only when loading failed)."""
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


def read_pickle(
    handle: IO[bytes],
    name: str,
    map_location: Any = "cpu",
    *,
    safetensors_hint: str = SAFETENSORS_NAMED_AS_PICKLE,
) -> Any:
    """The weights-only pickle in the open binary `handle`, after its first bytes show it is not a
    safetensors file (which `torch.load` would report as an unreadable pickle)."""
    head = handle.read(9)
    if looks_like_safetensors(head):
        raise CheckpointError(f"{name}: {safetensors_hint}")
    handle.seek(0)
    return load_pickle(handle, name, map_location)


def _read_safetensors(path: Path) -> Stored:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    return Stored(tensors, metadata)


def read(path: str | Path) -> Stored:
    """Everything in a `.pt`/`.pth`/`.ckpt` (weights only) or `.safetensors` file, on the CPU, from one
    opening of the file. A pickle that would need to run code (a class, a function, a `__reduce__`
    payload) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the one read
    except OSError as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
    with handle:
        return Stored(read_pickle(handle, str(path)))


def read_weights(path: str | Path) -> Any:
    """The object stored in a `.pt`/`.pth`/`.ckpt` (weights only) or `.safetensors` file, on the CPU."""
    return read(path).content


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


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """`state` without `prefix` (DataParallel's `module.`, `torch.compile`'s `_orig_mod.`), when every
    key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state
