"""Finding the clips to prepare: video directories, list files, and the authors' CAV-MAE datafiles.

- A directory is searched recursively for files with a video extension (other files are counted,
  not tried), in sorted path order. The clip id is the file name without its extension.
- Any other file ending in `.json` is read as a CAV-MAE datafile
  (`{"data": [{"video_id", "wav", "video_path", "labels"}]}`), in its own order.
- Any other file is a list of video paths, one per line (`#` comments and blank lines skipped,
  relative paths taken from the list's directory), in its own order. Every listed path is tried,
  whatever its extension, so a non-video entry is reported rather than silently dropped.

Clip ids become shard keys (`schema.sample_key`); when two inputs give the same key, the first one
is kept and the later one reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from avsync.data.labels import split_labels
from avsync.data.schema import sample_key

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".flv", ".ts", ".wmv", ".3gp", ".ogv"}
)


@dataclass(frozen=True)
class ClipSource:
    """One input. `kind="video"`: `path` is a video file; `kind="cavmae"`: `path` is the datafile's
    `video_path` (frames at `path/frame_{i}/{clip_id}.jpg`) and `wav` its audio file."""

    clip_id: str
    path: str
    kind: Literal["video", "cavmae"] = "video"
    wav: str | None = None
    labels: tuple[str, ...] | None = None  # as written in the datafile; None = not given there

    @property
    def key(self) -> str:
        return sample_key(self.clip_id)


@dataclass
class Discovery:
    sources: list[ClipSource]
    duplicates: list[dict]  # failure records of the inputs dropped as duplicates
    ignored_files: int  # files in input directories without a video extension


class InputError(ValueError):
    """An input argument that cannot be read at all (missing directory, malformed datafile)."""


def discover(inputs: list[str | Path]) -> Discovery:
    """All clip sources of `inputs`, in order, with duplicate keys removed (first kept)."""
    found: list[ClipSource] = []
    ignored = 0
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            videos, skipped = _scan_directory(path)
            found += videos
            ignored += skipped
        elif path.is_file() and path.suffix.lower() == ".json":
            found += _read_datafile(path)
        elif path.is_file():
            found += _read_list(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    sources, duplicates, first_by_key = [], [], {}
    for source in found:
        first = first_by_key.get(source.key)
        if first is None:
            first_by_key[source.key] = source
            sources.append(source)
            continue
        same = (
            "clip id"
            if first.clip_id == source.clip_id
            else f"shard key {source.key!r} (clip id {first.clip_id!r})"
        )
        duplicates.append(
            {
                "path": source.path,
                "clip_id": source.clip_id,
                "reason": f"duplicate {same} of {first.path}; the first is kept",
            }
        )
    return Discovery(sources=sources, duplicates=duplicates, ignored_files=ignored)


def _scan_directory(directory: Path) -> tuple[list[ClipSource], int]:
    videos, ignored = [], 0
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                videos.append(Path(root) / name)
            else:
                ignored += 1
    videos.sort(key=lambda p: p.relative_to(directory).as_posix())
    return [ClipSource(clip_id=p.stem, path=str(p)) for p in videos], ignored


def _read_list(list_file: Path) -> list[ClipSource]:
    sources = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        if not path.is_absolute():
            path = list_file.parent / path
        sources.append(ClipSource(clip_id=path.stem, path=str(path)))
    return sources


def _read_datafile(datafile: Path) -> list[ClipSource]:
    try:
        entries = json.loads(datafile.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(
            f"{datafile}: not a CAV-MAE datafile ({{'data': [...]}} expected): {error}"
        ) from error
    sources = []
    for position, entry in enumerate(entries):
        try:
            labels = entry.get("labels")
            sources.append(
                ClipSource(
                    clip_id=str(entry["video_id"]),
                    path=str(entry["video_path"]),
                    kind="cavmae",
                    wav=str(entry["wav"]),
                    labels=None if labels is None else tuple(split_labels(str(labels))),
                )
            )
        except (KeyError, AttributeError) as error:
            raise InputError(
                f"{datafile}: entry {position} lacks {error} (needs video_id, wav, video_path)"
            ) from error
    return sources
