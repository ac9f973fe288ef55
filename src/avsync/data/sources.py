"""Finding the clips to prepare: video directories, list files, and the authors' CAV-MAE datafiles.

- A directory is searched recursively (symbolic links to directories followed, each directory once)
  for files with a video or audio extension, in sorted path order; other files are counted, not
  tried. Audio-only files are tried so that they are reported ("no video stream") rather than lost
  without a word. The clip id is the file name without its extension.
- Any other file ending in `.json` is read as a CAV-MAE datafile
  (`{"data": [{"video_id", "wav", "video_path", "labels"}]}`), in its own order.
- Any other file is a list of video paths, one per line (`#` comments and blank lines skipped,
  relative paths taken from the list's directory), in its own order. Every listed path is tried,
  whatever its extension, so a non-video entry is reported rather than silently dropped.

Every kept input gets a shard key of its own (`assign_keys`, rules in docs/shards.md): a readable ASCII
form of its clip id, with a short hash when that form lost information or is taken. Only the same file
listed twice, or a byte-identical copy under the same clip id, is dropped as a duplicate (reported).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from avsync.data.labels import read_utf8, split_labels
from avsync.data.schema import MAX_KEY_LENGTH

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".flv", ".ts", ".wmv", ".3gp", ".ogv"}
)
#: Tried like videos (a file may surprise), so that an audio-only file is reported with its reason.
AUDIO_EXTENSIONS = frozenset(
    {
        ".m4a",
        ".mp3",
        ".wav",
        ".flac",
        ".aac",
        ".ogg",
        ".oga",
        ".opus",
        ".wma",
        ".aif",
        ".aiff",
        ".mka",
        ".ac3",
    }
)
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS
_KEY_CHARACTERS = re.compile(r"[A-Za-z0-9_-]")
_HASH_LENGTH = 8


@dataclass(frozen=True)
class ClipSource:
    """One input. `kind="video"`: `path` is a video file; `kind="cavmae"`: `path` is the datafile's
    `video_path` (frames at `path/frame_{i}/{clip_id}.jpg`) and `wav` its audio file. `origin` names
    the input independently of where the tree lies (path relative to the searched directory, the list
    entry, the datafile entry), `key` is its shard key (set by `assign_keys`)."""

    clip_id: str
    path: str
    kind: Literal["video", "cavmae"] = "video"
    wav: str | None = None
    labels: tuple[str, ...] | None = None  # as written in the datafile; None = not given there
    origin: str = ""
    key: str = ""


@dataclass
class Discovery:
    sources: list[ClipSource]
    duplicates: list[dict]  # failure records of inputs dropped while listing (duplicates, unreadable dirs)
    ignored_files: int  # files in input directories without a media extension
    ignored_examples: list[str] = field(default_factory=list)  # the first few of them
    shared_ids: dict[str, list[str]] = field(default_factory=dict)  # clip id -> paths of different files


class InputError(ValueError):
    """An input argument that cannot be read at all (missing directory, malformed datafile)."""


def printable(text: str) -> str:
    """`text` safe to write as UTF-8 JSON: a file name's undecodable bytes (which Python keeps as lone
    surrogates) become `\\xff` escapes instead of failing the write."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def short_hash(text: str) -> str:
    """8 hex digits of SHA-256, stable for any string (even one holding undecodable file-name bytes)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]


def base_key(clip_id: str) -> str:
    """The key a clip id gets when nothing else claims it: its ASCII letters, digits, `_` and `-` kept,
    accents dropped (`é` -> `e`), every other character `_` (dots too: WebDataset splits member names
    at the first dot); when that lost information, or the id is too long for a tar member name, a hash
    of the whole id is appended, so that different ids never share a base key (`a.b` -> `a_b-<hash>`,
    `a_b` -> `a_b`)."""
    characters = []
    for character in clip_id:
        if _KEY_CHARACTERS.fullmatch(character):
            characters.append(character)
            continue
        plain = "".join(c for c in unicodedata.normalize("NFKD", character) if _KEY_CHARACTERS.fullmatch(c))
        characters.append(plain or "_")
    key = "".join(characters)
    if key == clip_id and 0 < len(key) <= MAX_KEY_LENGTH:
        return key
    return _suffixed(key or "_", short_hash(clip_id))


def _suffixed(key: str, suffix: str) -> str:
    return f"{key[: MAX_KEY_LENGTH - len(suffix) - 1]}-{suffix}"


def assign_keys(sources: list[ClipSource]) -> tuple[list[ClipSource], list[dict], dict[str, list[str]]]:
    """Give every input a key of its own; drop only true duplicates. Returns the kept sources (with
    `key` set), failure records of the dropped ones, and the clip ids that several different files share.

    Keys are unique even compared without case (shards may be unpacked on a case-insensitive file
    system): a taken key gets a hash of the input's `origin` appended (then of its full path). The
    first input in order keeps the plain key, so keys do not change when inputs are added after it.
    """
    kept: list[ClipSource] = []
    dropped: list[dict] = []
    first_of_identity: dict[tuple, ClipSource] = {}
    same_id: dict[str, list[ClipSource]] = {}
    taken: set[str] = set()
    for source in sources:
        identity = _identity(source)
        first = first_of_identity.get(identity)
        if first is not None:
            dropped.append(
                _dropped(
                    source,
                    f"duplicate clip id of {first.path}: the same file, listed twice; the first is kept",
                )
            )
            continue
        copy = _identical_copy(source, same_id.get(source.clip_id, []))
        if copy is not None:
            dropped.append(
                _dropped(
                    source, f"duplicate clip id of {copy.path}, with the same content; the first is kept"
                )
            )
            continue
        key = base_key(source.clip_id)
        candidates = iter([source.origin, source.path] + [f"{source.path}#{n}" for n in range(1, 1000)])
        while key.lower() in taken:
            key = _suffixed(base_key(source.clip_id), short_hash(next(candidates)))
        taken.add(key.lower())
        first_of_identity[identity] = source
        same_id.setdefault(source.clip_id, []).append(source)
        kept.append(replace(source, key=key))
    shared = {clip_id: [s.path for s in group] for clip_id, group in same_id.items() if len(group) > 1}
    return kept, dropped, shared


def _dropped(source: ClipSource, reason: str) -> dict:
    return {"path": printable(source.path), "clip_id": printable(source.clip_id), "reason": reason}


def _identity(source: ClipSource) -> tuple:
    """What makes two inputs the same input: the file they resolve to (through symbolic links)."""
    if source.kind == "cavmae":
        return ("cavmae", source.clip_id, os.path.realpath(source.path), os.path.realpath(source.wav or ""))
    return ("video", os.path.realpath(source.path))


def _identical_copy(source: ClipSource, earlier: list[ClipSource]) -> ClipSource | None:
    """The earlier input of the same clip id whose file has the same bytes, if any (videos only)."""
    if source.kind != "video" or not earlier:
        return None
    size = _size(source.path)
    if size is None:
        return None
    for other in earlier:
        if (
            other.kind == "video"
            and _size(other.path) == size
            and _digest(other.path) == _digest(source.path)
        ):
            return other
    return None


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size if os.path.isfile(path) else None
    except OSError:
        return None


def _digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1-MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def discover(inputs: list[str | Path]) -> Discovery:
    """All clip sources of `inputs`, in order, each with its own key; duplicates removed (first kept)."""
    found: list[ClipSource] = []
    problems: list[dict] = []
    ignored: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            videos, skipped, unreadable = _scan_directory(path)
            found += videos
            ignored += skipped
            problems += unreadable
        elif path.is_file() and path.suffix.lower() == ".json":
            found += _read_datafile(path)
        elif path.is_file():
            found += _read_list(path)
        else:
            raise InputError(f"{path}: {missing_reason(path)}")
    sources, duplicates, shared = assign_keys(found)
    return Discovery(sources, problems + duplicates, len(ignored), ignored[:5], shared)


def missing_reason(path: str | Path) -> str:
    """Why `path` cannot be opened, in words: a symlink loop, a dangling link, or no such file."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "no such file or directory"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop (a symbolic link that leads back to itself)"
        if isinstance(error, PermissionError):
            return "unreadable (permission denied)"
        return error.strerror or str(error)
    return "not a regular file or directory"


def _scan_directory(directory: Path) -> tuple[list[ClipSource], list[str], list[dict]]:
    """Media files under `directory` (sorted by relative path), names of the files ignored, and failure
    records of subdirectories that could not be listed (their files would otherwise vanish unreported)."""
    videos: list[Path] = []
    ignored: list[str] = []
    unreadable: list[dict] = []
    seen: set[tuple[int, int]] = set()

    def report(error: OSError) -> None:
        where = printable(str(error.filename))
        unreadable.append(
            {
                "path": where,
                "clip_id": None,
                "reason": f"directory not listed ({error.strerror or error}): the videos in it are missing",
            }
        )

    for root, dirs, files in os.walk(directory, onerror=report, followlinks=True):
        try:
            status = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:  # a link back to a directory already searched
            dirs[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        dirs.sort()
        for name in files:
            path = Path(root) / name
            if path.suffix.lower() in MEDIA_EXTENSIONS:
                videos.append(path)
            else:
                ignored.append(printable(path.relative_to(directory).as_posix()))
    videos.sort(key=lambda p: p.relative_to(directory).as_posix())
    sources = [
        ClipSource(clip_id=p.stem, path=str(p), origin=p.relative_to(directory).as_posix()) for p in videos
    ]
    return sources, sorted(ignored), unreadable


def _read_list(list_file: Path) -> list[ClipSource]:
    sources = []
    for line in read_utf8(list_file, InputError).splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        if not path.is_absolute():
            path = list_file.parent / path
        sources.append(ClipSource(clip_id=path.stem, path=str(path), origin=entry))
    return sources


def _read_datafile(datafile: Path) -> list[ClipSource]:
    text = read_utf8(datafile, InputError)
    try:
        entries = json.loads(text)["data"]
    except json.JSONDecodeError as error:
        raise InputError(
            f"{datafile}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})"
        ) from None
    except (KeyError, TypeError) as error:
        raise InputError(
            f"{datafile}: not a CAV-MAE datafile ({{'data': [...]}} expected): {error}"
        ) from error
    if not isinstance(entries, list):
        raise InputError(f"{datafile}: not a CAV-MAE datafile ('data' must be a list of entries)")
    sources = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(
                f"{datafile}: entry {position} is not an object (needs video_id, wav, video_path)"
            )
        try:
            labels = entry.get("labels")
            video_id, video_path, wav = str(entry["video_id"]), str(entry["video_path"]), str(entry["wav"])
        except (KeyError, AttributeError) as error:
            raise InputError(
                f"{datafile}: entry {position} lacks {error} (needs video_id, wav, video_path)"
            ) from error
        sources.append(
            ClipSource(
                clip_id=video_id,
                path=video_path,
                kind="cavmae",
                wav=wav,
                labels=None if labels is None else tuple(split_labels(str(labels))),
                origin=f"{video_path}\n{wav}\n{video_id}",
            )
        )
    return sources
