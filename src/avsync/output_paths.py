"""Where a command may write, checked before any work.

A command writes over nothing the user did not hand over to it: never over one of its own inputs, never
over an existing file that is not its own earlier output (each output format says how it is recognised:
`avsync.api.outputs.is_embeddings_file`, `avsync.checkpoints.is_backbone_export`), and an output folder
only where a folder can be. The checks run before the model is loaded, so a wrong path costs a second,
not an evaluation, and is reported in one line (`OutputError`, a `ValueError`: exit status 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output path that would destroy something that is not the command's to replace."""


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` are one existing file (through links, `..`, another spelling of the path)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _check_parent(path: Path, flag: str) -> None:
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as an output folder: an existing folder, or a path where one can be made; an existing
    file (or a link to one) is refused, whatever it holds."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists() or path.is_symlink():
        raise OutputError(
            f"{flag} {path}: exists and is not a folder; this command writes a folder there (give a new "
            "path or an existing folder)"
        )
    _check_parent(path, flag)
    return path


def check_output_file(
    path: str | Path,
    *,
    inputs: Iterable[str | Path] = (),
    ours: Callable[[Path], bool],
    what: str,
    flag: str = "--out",
) -> Path:
    """`path` as an output file: not one of `inputs`, not a folder, and, when it exists, a file that
    `ours` recognises as an earlier output of the same kind (`what` names it in the error)."""
    path = Path(path)
    for given in inputs:
        if same_file(path, given):
            raise OutputError(f"{flag} {path}: is one of the inputs ({given}); give another output path")
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file() or not ours(path):
            raise OutputError(
                f"{flag} {path}: exists and is not {what}, so it is not replaced; give another path, or "
                "move the file away"
            )
    _check_parent(path, flag)
    return path
