"""Writing one size-capped WebDataset shard, reproducibly and atomically.

`webdataset.TarWriter` is reproducible once its member metadata is pinned (mtime 0, uid/gid 0, fixed
user/group names and mode; it already writes a sample's members in sorted order). The shard is
written as `<name>.tmp` and renamed with `os.replace` only when complete and flushed to disk, so a
file named `shard-*.tar` is always whole. Sizes are computed from the tar layout (512-byte headers,
512-byte-padded members, 1024 bytes of end marker, padding to 10240-byte records), so the cap holds
for the final file exactly.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

_BLOCK = 512
_RECORD = 20 * _BLOCK
_END_OF_ARCHIVE = 2 * _BLOCK


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_tar_bytes(sample: dict[str, bytes | str]) -> int:
    """Bytes the sample adds to a tar: one header block per member plus its padded data."""
    total = 0
    for field, value in sample.items():
        if field.startswith("_"):
            continue
        size = len(value.encode() if isinstance(value, str) else value)
        total += _BLOCK + -(-size // _BLOCK) * _BLOCK
    return total


def _final_size(member_bytes: int) -> int:
    return -(-(member_bytes + _END_OF_ARCHIVE) // _RECORD) * _RECORD


def fits(
    clips: int, member_bytes: int, sample_bytes: int, max_bytes: int | None, max_clips: int | None
) -> bool:
    """Whether a sample of `sample_bytes` (`sample_tar_bytes`) may join a shard that holds `clips` samples
    of `member_bytes`: the packing rule, shared by `ShardWriter` and the planner of the Dask engine."""
    if clips == 0:
        return True
    if max_clips is not None and clips >= max_clips:
        return False
    if max_bytes is not None:
        return _final_size(member_bytes + sample_bytes) <= max_bytes
    return True


def tar_writer(file) -> wds.TarWriter:
    """A `TarWriter` on the open binary `file` with the pinned member metadata of shards."""
    return wds.TarWriter(file, encoder=False, mtime=0, user="avsync", group="avsync", mode=0o444)


@dataclass(frozen=True)
class ShardRecord:
    name: str
    clips: int
    bytes: int
    sha256: str


class ShardWriter:
    """Accumulates samples into `directory/shard-<index>.tar` up to `max_bytes` and/or `max_clips`.

    A sample larger than `max_bytes` on its own still gets a shard (of one clip): nothing is dropped.
    """

    def __init__(
        self, directory: str | Path, index: int, max_bytes: int | None, max_clips: int | None
    ) -> None:
        self.path = Path(directory) / shard_name(index)
        self.temporary = self.path.with_name(self.path.name + ".tmp")
        self.max_bytes, self.max_clips = max_bytes, max_clips
        self.clips = 0
        self.member_bytes = 0
        self._file = open(self.temporary, "wb")
        self._tar = tar_writer(self._file)

    def fits(self, sample: dict[str, bytes | str]) -> bool:
        """Whether `sample` may join this shard without breaking a cap (always true when empty)."""
        return fits(self.clips, self.member_bytes, sample_tar_bytes(sample), self.max_bytes, self.max_clips)

    def write(self, sample: dict[str, bytes | str]) -> None:
        self._tar.write(sample)
        self.member_bytes += sample_tar_bytes(sample)
        self.clips += 1

    def finish(self) -> ShardRecord:
        """Close, flush to disk and rename into place; returns what the journal and manifest record."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = hashlib.sha256()
        with open(self.temporary, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        size = self.temporary.stat().st_size
        if size != _final_size(self.member_bytes):
            expected = _final_size(self.member_bytes)
            raise RuntimeError(f"{self.temporary}: wrote {size} bytes, the tar layout predicts {expected}")
        os.replace(self.temporary, self.path)
        return ShardRecord(name=self.path.name, clips=self.clips, bytes=size, sha256=digest.hexdigest())

    def abandon(self) -> None:
        """Drop the unfinished shard (used when a run stops early, a full disk included).

        The tar stream is closed too, or its buffer would be written to the closed file when it is
        collected ("Exception ignored ... write to closed file" after the run's error); errors of the
        writes that closing still makes (the disk is full) do not matter: the file is deleted.
        """
        with suppress(OSError, ValueError):
            self._tar.close()
        with suppress(OSError):
            self._file.close()
        self.temporary.unlink(missing_ok=True)
