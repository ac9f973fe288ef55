"""Names read from files inside a folder (a shard manifest, an embed index, a cache) are data.

Shards, manifests, indexes and caches are shared between labs. A name such a file lists must name a
file *in that folder*: never a command (`pipe:...`, which webdataset would run through a shell), a URL
(`s3://...`, `http:...`, which a URL opener or ffmpeg would fetch), an absolute path or a `..` escape.
`member_path` is the one gate every such name passes; what a user types on the command line (a
`pipe:` URL, a brace pattern) is theirs and does not come through here.
"""

from __future__ import annotations

import os
from pathlib import Path


class UnsafeNameError(ValueError):
    """A file inside a folder names something other than a plain file in that folder."""


def member_path(directory: str | Path, name: object, listed_in: str | Path) -> Path:
    """`directory / name` as an absolute path, after checking that `name` (read from `listed_in`) is a
    plain file name: a string, one path component, no scheme or drive (`:`), not `.`/`..`, no NUL.

    The result is absolute, so even a later consumer that parses URLs (webdataset's `gopen`, ffmpeg's
    protocol prefixes) sees a file path. Raises `UnsafeNameError` naming `listed_in` and the name.
    """
    problem = _problem(name)
    if problem is not None:
        raise UnsafeNameError(f"{listed_in}: refuses the listed name {name!r}: {problem}")
    return Path(os.path.abspath(directory)) / str(name)


def _problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"not a file name but a {type(name).__name__}"
    if not name or name in (".", ".."):
        return "not a file name"
    if "\x00" in name:
        return "contains a NUL byte"
    if "/" in name or "\\" in name:
        return "a path, not a plain file name in the same folder"
    if ":" in name:
        return "a URL, command or drive (contains ':'), not a plain file name"
    return None


def inside_path(directory: str | Path, relative: object, listed_in: str | Path) -> Path:
    """`directory / relative` for a relative path read from `listed_in` (a CSV manifest's `images/a.jpg`),
    each component checked as `member_path` checks a name: no absolute path, `..`, scheme or NUL."""
    if not isinstance(relative, str) or not relative:
        raise UnsafeNameError(f"{listed_in}: refuses the listed path {relative!r}: not a relative path")
    parts = relative.replace("\\", "/").split("/")
    for part in parts:
        problem = "an absolute path" if part == "" else _problem(part) if part != "." else None
        if problem is not None:
            raise UnsafeNameError(
                f"{listed_in}: refuses the listed path {relative!r}: {problem} "
                f"(paths stay inside {directory})"
            )
    return Path(os.path.abspath(directory)).joinpath(*[p for p in parts if p != "."])
