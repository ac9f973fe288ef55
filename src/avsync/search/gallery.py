"""The clips an index is built from: the output of `avsync embed`, read in place.

Three sources, one interface (`Gallery`):

- an `avsync embed --shards` directory: its `manifest.json` and float16 npz parts (`keys`, `audio`,
  `video`; docs/embedding.md). A clip id in two parts is kept once (the first), as
  `avsync.api.outputs.read_shard_embeddings` does. A directory without `manifest.json` is an embed run
  that has not finished: it is refused rather than indexed half-way.
- one npz file: `avsync embed FILES --out x.npz`, or any npz holding `audio` and/or `video` `(N, T, D)`
  and the clip ids as `keys` (or `ids`).
- arrays in memory (`Gallery.from_arrays`).

Each file is opened once and read through memory maps of that open file (npz members are stored
uncompressed by numpy; `NpzFile`): the build streams the gallery in chunks, and a query by clip id or
an exact re-ranking reads a few rows, so a collection of millions of clips is never loaded whole.
`describe()` records what was read (paths, sizes), so that an index can tell later whether its source
changed.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avsync.data.member_paths import UnsafeNameError, member_path

MODALITIES = ("audio", "video")
MANIFEST = "manifest.json"


class GalleryError(ValueError):
    """A source that cannot be indexed or read; the message names the file and the problem."""


def npz_member(path: Path, name: str) -> np.ndarray:
    """Array `name` of the npz file `path` (see `NpzFile`)."""
    with NpzFile(path) as npz:
        return npz[name]


class NpzFile:
    """An npz file opened once: its arrays memory-mapped where they hold numbers stored uncompressed (as
    `np.savez` stores them), else read into memory (clip ids, metadata, compressed members).

    numpy maps only `.npy` files (`np.load(mmap_mode=...)` reads an npz member whole), and `zipfile` does
    not say where a member's bytes start: that is read from the member's 30-byte local header, then
    numpy's own `.npy` header readers give the array's layout. Kept (issue 22 item 7): measured in one
    run against the same arrays as `.npy` files opened with `np.load(mmap_mode="r")` and against
    `np.load` of the npz (BENCHMARKS.md, `gallery_reads`; 10,000 float16 clips, 2 busy cores), opening
    the gallery and reading 100 clips' tokens (a search's exact re-ranking) takes 28.7 ms, as with `.npy`
    files (28.7 ms), against 1,427 ms with `np.load`; streaming it (an index build) 0.78 s, against 0.74
    and 6.2 s. `.npy` files would gain nothing and change `avsync embed`'s output format.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle = path.open("rb")
        except OSError as error:
            raise GalleryError(f"{path}: not a readable npz file ({error})") from None
        try:
            self._archive = zipfile.ZipFile(self._handle)
        except (OSError, zipfile.BadZipFile, EOFError, ValueError):
            self._handle.close()
            raise GalleryError(f"{path}: not an npz file (expected `avsync embed` output)") from None
        self.members = {
            info.filename.removesuffix(".npy"): info
            for info in self._archive.infolist()
            if info.filename.endswith(".npy")
        }

    def __enter__(self) -> NpzFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._archive.close()
        self._handle.close()

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.members.get(name)
        if info is None:
            raise GalleryError(f"{self.path}: has no `{name}` array")
        try:
            mapped = self._mapped(info) if info.compress_type == zipfile.ZIP_STORED else None
            if mapped is not None:
                return mapped
            with self._archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        except ValueError as error:
            raise GalleryError(f"{self.path}: `{name}` cannot be read without pickle ({error})") from None
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            raise GalleryError(f"{self.path}: not a readable npz file ({error})") from None

    def _mapped(self, info: zipfile.ZipInfo) -> np.memmap | None:
        """The member as a memory map of this file, or None where it holds no numbers to map."""
        handle = self._handle
        handle.seek(info.header_offset)
        local = handle.read(30)  # the local file header: name and extra-field lengths at bytes 26-29
        if local[:4] != b"PK\x03\x04":
            return None  # left to `zipfile`, which names the damage
        handle.seek(
            info.header_offset
            + 30
            + int.from_bytes(local[26:28], "little")
            + int.from_bytes(local[28:30], "little")
        )
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        reader = readers.get(np.lib.format.read_magic(handle))
        if reader is None:
            return None
        shape, fortran, dtype = reader(handle)
        if dtype.kind not in "fiu" or not shape or 0 in shape:
            return None
        order = "F" if fortran else "C"
        return np.memmap(handle, dtype=dtype, mode="r", offset=handle.tell(), shape=shape, order=order)


@dataclass
class _Part:
    """Rows `keep` of the arrays of one file (or of arrays in memory)."""

    arrays: dict[str, np.ndarray]
    keep: np.ndarray
    path: Path | None = None


@dataclass
class Gallery:
    """Clip ids and per-frame tokens `(T, D)` of each modality, over one or more parts.

    `ids` (N,) in row order; row `i` of every modality is clip `ids[i]`. `metadata` holds what the
    embedding run recorded (checkpoint, alignment, num_frames...) when the source has it.
    """

    ids: np.ndarray
    parts: list[_Part]
    modalities: tuple[str, ...]
    steps: int
    dim: int
    metadata: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path) -> Gallery:
        """An `avsync embed --shards` directory or an npz file."""
        path = Path(path)
        if path.is_dir():
            return cls._from_directory(path)
        if not path.exists():
            raise GalleryError(f"{path}: no such file or directory")
        if path.suffix.lower() in (".parquet", ".pq"):
            raise GalleryError(
                f"{path}: parquet is not read here; embed to npz (`avsync embed ... --out x.npz`) or "
                "with --shards"
            )
        return cls._from_files([path], metadata=None, kind="npz")

    @classmethod
    def from_arrays(
        cls,
        ids: Sequence[str] | np.ndarray,
        audio: np.ndarray | None = None,
        video: np.ndarray | None = None,
    ) -> Gallery:
        """Arrays `(N, T, D)` in memory (either modality may be None) with their clip ids."""
        given = {"audio": audio, "video": video}
        arrays = {name: np.asarray(value) for name, value in given.items() if value is not None}
        ids = np.asarray([str(i) for i in ids])
        for name, value in arrays.items():
            if len(value) != len(ids):
                raise GalleryError(f"{len(ids)} clip ids for {len(value)} clips of {name} tokens")
        part = _Part(arrays, np.arange(len(ids)))
        return cls._assemble([part], [ids], "arrays in memory", {}, {"kind": "arrays in memory"})

    @classmethod
    def _from_directory(cls, directory: Path) -> Gallery:
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise GalleryError(
                f"{directory}: no {MANIFEST}, so not a finished `avsync embed --shards` output (rerun the "
                "same embed command to complete it) nor a gallery"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            names = [part["name"] for part in manifest["parts"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise GalleryError(f"{manifest_path}: unreadable embed manifest ({error})") from None
        except RecursionError:
            raise GalleryError(
                f"{manifest_path}: unreadable embed manifest (JSON nested too deeply)"
            ) from None
        if not names:
            raise GalleryError(f"{directory}: its manifest lists no embedding parts")
        try:
            paths = [member_path(directory, name, manifest_path) for name in names]
        except UnsafeNameError as error:
            raise GalleryError(str(error)) from None
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise GalleryError(f"{directory}: parts listed in {MANIFEST} are missing: {missing[:5]}")
        settings = manifest.get("settings", {})
        if not isinstance(settings, dict):
            raise GalleryError(
                f"{manifest_path}: unreadable embed manifest (its `settings` is not a mapping)"
            )
        metadata = {**manifest, **settings}
        return cls._from_files(paths, metadata, kind="embed --shards")

    @classmethod
    def _from_files(cls, paths: list[Path], metadata: dict | None, kind: str) -> Gallery:
        """Each file opened once; `metadata` None: the JSON `metadata` member of the (single) file."""
        parts, id_lists, seen = [], [], set()
        for path in paths:
            with NpzFile(path) as npz:
                id_name = "keys" if "keys" in npz else "ids" if "ids" in npz else None
                if id_name is None:
                    raise GalleryError(f"{path}: no clip ids (a `keys` or `ids` array)")
                keys = np.asarray(npz[id_name]).astype(str)
                arrays = {name: npz[name] for name in MODALITIES if name in npz}
                if metadata is None:
                    metadata = _npz_metadata(npz)
            keep = np.array([row for row, key in enumerate(keys) if key not in seen], dtype=np.int64)
            seen.update(keys.tolist())
            parts.append(_Part(arrays, keep, path))
            id_lists.append(keys[keep])
        source = {
            "kind": kind,
            "files": [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in paths],
        }
        where = str(paths[0].parent if kind == "embed --shards" else paths[0])
        return cls._assemble(parts, id_lists, where, metadata, source)

    @classmethod
    def _assemble(
        cls, parts: list[_Part], id_lists: list[np.ndarray], where: str, metadata: dict, source: dict
    ) -> Gallery:
        ids = np.concatenate(id_lists) if id_lists else np.array([], dtype=str)
        if len(ids) == 0:
            raise GalleryError(f"{where}: holds no clips")
        if len(set(ids.tolist())) != len(ids):
            raise GalleryError(f"{where}: clip ids repeat within one file; every clip needs its own id")
        modalities = tuple(name for name in MODALITIES if all(name in part.arrays for part in parts))
        if not modalities:
            raise GalleryError(f"{where}: holds neither `audio` nor `video` tokens in every part")
        shapes = {array.shape[1:] for part in parts for name in modalities for array in [part.arrays[name]]}
        for part in parts:
            for name in modalities:
                array = part.arrays[name]
                label = part.path or where
                if array.ndim != 3:
                    raise GalleryError(
                        f"{label}: `{name}` has shape {array.shape}; expected (clips, time steps, dim)"
                    )
                if array.shape[0] < (part.keep.max(initial=-1) + 1) or array.dtype.kind != "f":
                    raise GalleryError(
                        f"{label}: `{name}` is {array.dtype} {array.shape}, expected floats for each clip id"
                    )
        if len(shapes) != 1:
            raise GalleryError(f"{where}: parts or modalities differ in (time steps, dim): {sorted(shapes)}")
        (steps, dim) = shapes.pop()
        source = {**source, "num_clips": int(len(ids))}
        return cls(ids, parts, modalities, int(steps), int(dim), metadata, source)

    # ------------------------------------------------------------------ reading
    @property
    def num_clips(self) -> int:
        return len(self.ids)

    def describe(self) -> dict:
        """What the index records about its source."""
        return self.source

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise GalleryError(f"the gallery holds no {modality} tokens (it has {list(self.modalities)})")

    def chunks(self, size: int, modalities: Sequence[str] | None = None) -> Iterator[tuple[int, dict]]:
        """`(first row, {modality: float32 (n, T, D)})` over the gallery in order, at most `size` clips
        at a time."""
        modalities = tuple(modalities or self.modalities)
        for modality in modalities:
            self.check_modality(modality)
        start = 0
        for part in self.parts:
            for first in range(0, len(part.keep), size):
                rows = part.keep[first : first + size]
                yield start, {m: _rows(part.arrays[m], rows) for m in modalities}
                start += len(rows)

    def tokens(self, modality: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 `(len(rows), T, D)` of gallery rows `rows` (any order)."""
        self.check_modality(modality)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.steps, self.dim), dtype=np.float32)
        bounds = np.cumsum([0] + [len(part.keep) for part in self.parts])
        which = np.searchsorted(bounds, rows, side="right") - 1
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_clips):
            raise IndexError(f"rows out of range for a gallery of {self.num_clips} clips")
        for number in np.unique(which):
            mine = np.flatnonzero(which == number)
            part = self.parts[number]
            out[mine] = _rows(part.arrays[modality], part.keep[rows[mine] - bounds[number]])
        return out

    def sample_rows(self, count: int, seed: int = 0) -> np.ndarray:
        """`count` distinct rows spread over the gallery (all of them when it has fewer), sorted."""
        if count >= self.num_clips:
            return np.arange(self.num_clips)
        return np.sort(np.random.default_rng(seed).choice(self.num_clips, count, replace=False))


def _rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 rows of a (memory-mapped) array; a contiguous run is read as one slice."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        picked = array[rows[0] : rows[-1] + 1]
    else:
        order = np.argsort(rows)
        picked = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        picked[order] = array[rows[order]]  # sorted reads from a memory map
    return np.asarray(picked, dtype=np.float32)


def _npz_metadata(npz: NpzFile) -> dict:
    """The JSON `metadata` an `avsync embed` npz carries, or {}."""
    if "metadata" not in npz:
        return {}
    try:
        value = npz["metadata"]
    except GalleryError:
        return {}
    try:
        metadata = json.loads(str(np.asarray(value).item()))
    except (ValueError, TypeError, RecursionError):
        return {}
    return metadata if isinstance(metadata, dict) else {}
