"""Decoded partitions: the intermediate files of the Dask engine of `prepare` (`dask_prepare`).

The (shuffled) input list is cut into fixed partitions of `partition_size` clips: partition `p` holds
inputs `[p * size, (p + 1) * size)`, whatever the number of workers. A worker decodes one partition
into `OUT/prepare.parts/part-<p>.tar` (its samples, in input order, written like shard members) and
then `part-<p>.json` (each sample's position, key and tar size, each failure with its position). Both
are written under a unique temporary name and renamed, the record last, so a record names a whole
tar: a killed run keeps every finished partition, and a partition run twice (a worker presumed lost,
a killed driver's leftovers) writes the same bytes. Records carry the run's fingerprint: those of
other inputs or settings, or of another partition size, are deleted, never reused.
"""

from __future__ import annotations

import json
import os
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avsync.data.shard_writer import sample_tar_bytes, tar_writer

PARTS_DIR = "prepare.parts"


def partition_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """`[start, stop)` of each partition of `count` inputs."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def part_name(partition: int) -> str:
    return f"part-{partition:06d}"


@dataclass
class PartRecord:
    """What the driver learns of a decoded partition (the samples themselves stay in its tar)."""

    fingerprint: str
    partition: int
    start: int
    stop: int
    samples: list[list] = field(default_factory=list)  # [position, key, tar bytes]
    failures: list[list] = field(default_factory=list)  # [position, failure]
    tar_bytes: int = 0

    def outcomes(self) -> Iterator[tuple[int, int | None, int | None, dict | None]]:
        """In input order, `(position, sample tar bytes, the sample's index in the tar, None)` or
        `(position, None, None, failure)`."""
        merged = [(p, size, index, None) for index, (p, _, size) in enumerate(self.samples)]
        merged += [(p, None, None, failure) for p, failure in self.failures]
        return iter(sorted(merged, key=lambda outcome: outcome[0]))


def write_part(
    directory: Path,
    fingerprint: str,
    partition: int,
    start: int,
    outcomes: Iterable[tuple[dict | None, dict | None]],
) -> PartRecord:
    """Write partition `partition` from its `(sample, failure)` outcomes (one per input from `start`)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = part_name(partition)
    record = PartRecord(fingerprint, partition, start, start)
    temporary = directory / f"{name}.tar.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as handle:
            writer = tar_writer(handle)
            for position, (sample, failure) in enumerate(outcomes, start):
                record.stop = position + 1
                if failure is not None:
                    record.failures.append([position, failure])
                    continue
                writer.write(sample)
                record.samples.append([position, sample["__key__"], sample_tar_bytes(sample)])
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        record.tar_bytes = temporary.stat().st_size
        os.replace(temporary, directory / f"{name}.tar")
    finally:
        temporary.unlink(missing_ok=True)
    _write_atomically(directory / f"{name}.json", json.dumps(asdict(record)).encode())
    return record


def load_parts(directory: Path, fingerprint: str, bounds: list[tuple[int, int]], keep: set[int]) -> dict:
    """The finished partitions among `keep` (partition -> `PartRecord`); every other file of `directory`
    that a run left (other runs', stale, unfinished, no longer needed) is deleted."""
    found: dict[int, PartRecord] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("part-*.json")):
        record = _read_record(path)
        if (
            record is not None
            and record.fingerprint == fingerprint
            and record.partition in keep
            and (record.start, record.stop) == bounds[record.partition]
            and path.name == f"{part_name(record.partition)}.json"
            and _size(directory / f"{part_name(record.partition)}.tar") == record.tar_bytes
        ):
            found[record.partition] = record
    wanted = {f"{part_name(p)}.{suffix}" for p in found for suffix in ("json", "tar")}
    for path in directory.iterdir():
        if path.is_file() and path.name.startswith("part-") and path.name not in wanted:
            path.unlink(missing_ok=True)
    return found


def remove_part(directory: Path, partition: int) -> None:
    for suffix in ("json", "tar"):  # the record first: a record never names a missing tar
        (directory / f"{part_name(partition)}.{suffix}").unlink(missing_ok=True)


def read_samples(path: Path, first: int, count: int) -> Iterator[dict[str, bytes | str]]:
    """Samples `first` to `first + count - 1` of a part tar, as `ShardWriter.write` takes them."""
    index, sample = -1, None
    with tarfile.open(path, mode="r|") as archive:
        for member in archive:
            key, name = member.name.split(".", 1)
            if sample is None or key != sample["__key__"]:
                if sample is not None and index >= first:
                    yield sample
                index += 1
                if index >= first + count:
                    return
                sample = {"__key__": key}
            if index >= first:
                sample[name] = archive.extractfile(member).read()
    if sample is not None and first <= index < first + count:
        yield sample


def _read_record(path: Path) -> PartRecord | None:
    try:
        return PartRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
