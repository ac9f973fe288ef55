"""What both engines of `avsync prepare` share: the work of one clip, where a run resumes, its progress
bar, and the packing of outcomes into journaled shards.

`pool_prepare.py` (a local process pool) and `dask_prepare.py` (a Dask cluster) decode clips their own
way and import this module, never each other; `prepare.py` (the command) chooses one. Both are
`Packer`s: given a `PackJob` (the ordered work items and the journal entries of a run being resumed),
they write the remaining shards and return every shard and failure. The local engine streams outcomes
into `pack_in_order`; the Dask engine learns sample sizes first and replays the same rule
(`shard_plan.py`). Either journals its shards through `journal_shard`, so one engine can resume the
other's run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from avsync.data.cavmae import extract_cavmae_clip
from avsync.data.clip import ExtractionOptions, extract_video_clip
from avsync.data.errors import DecodeError
from avsync.data.journal import Journal, JournalEntry
from avsync.data.schema import SCHEMA_VERSION, encode_sample
from avsync.data.shard_writer import ShardRecord, ShardWriter
from avsync.data.sources import ClipSource, printable


class PrepareError(RuntimeError):
    """A problem with the run as a whole (arguments, output directory), as opposed to one input."""


@dataclass(frozen=True)
class WorkItem:
    """One clip to decode, with its labels already resolved to class indices."""

    source: ClipSource
    labels: tuple[int, ...]
    label_names: tuple[str, ...]


@dataclass
class WorkResult:
    sample: dict | None
    failure: dict | None


@dataclass(frozen=True)
class PackJob:
    """What an engine is given: decode `items` after the journaled `entries` of a run being resumed and
    pack them into shards of at most `max_bytes` / `max_clips`, in order, each journaled as it is finished
    (`failed_before`: inputs already reported as failed by the listing, for the progress bar's count)."""

    items: list[WorkItem]
    entries: list[JournalEntry]
    journal: Journal
    options: ExtractionOptions
    max_bytes: int | None
    max_clips: int | None
    progress: bool
    failed_before: int


#: An engine: every shard and failure of the run (those of `job.entries` included).
Packer = Callable[[PackJob], tuple[list[ShardRecord], list[dict]]]


def process(item: WorkItem, options: ExtractionOptions) -> WorkResult:
    """Decode one clip into its shard sample, or say why it cannot be (runs in a worker process)."""
    source = item.source
    try:
        if source.kind == "cavmae":
            clip = extract_cavmae_clip(source.clip_id, source.path, source.wav, options)
        else:
            clip = extract_video_clip(source.path, options)
    except DecodeError as error:
        where = "" if error.path == source.path else f"{error.path}: "
        return WorkResult(None, failure_record(source, where + error.reason))
    except Exception as error:  # an ffmpeg or library surprise on odd data: report it, keep going
        return WorkResult(None, failure_record(source, f"unexpected {type(error).__name__}: {error}"))
    broken = int(np.count_nonzero(~np.isfinite(clip.fbank)))
    if broken:  # never in a shard, whatever the cause (`decode_audio` refuses the known ones)
        return WorkResult(
            None, failure_record(source, f"spectrogram holds {broken} NaN or infinite value(s)")
        )
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "id": printable(source.clip_id),
        "key": source.key,
        "source": printable(source.path)
        if source.kind == "video"
        else {"video_path": printable(source.path), "wav": printable(source.wav or "")},
        "num_frames": options.num_frames,
        "labels": list(item.labels),
        "label_names": list(item.label_names),
        **clip.metadata,
    }
    return WorkResult(encode_sample(source.key, clip.frames, clip.fbank, metadata), None)


def failure_record(source: ClipSource, reason: str) -> dict:
    """A line of `failures.jsonl`: which input, and why it is not in the shards."""
    return {"path": printable(source.path), "clip_id": printable(source.clip_id), "reason": reason}


def set_up_worker() -> None:
    """What a decoding process needs once: one torch thread (parallelism comes from the processes) and
    ffmpeg's log kept quiet."""
    import torch

    torch.set_num_threads(1)
    quiet_ffmpeg()


def quiet_ffmpeg() -> None:
    """Keep ffmpeg's last error for exception messages without printing its log over the progress bar."""
    import av.logging

    av.logging.set_level(av.logging.ERROR)
    libav = logging.getLogger("libav")
    libav.propagate = False
    if not libav.handlers:
        libav.addHandler(logging.NullHandler())


# ------------------------------------------------------------------------------------------ a run
@dataclass
class Resume:
    """Where a run continues: the journaled shards and failures, and the first input after them."""

    shards: list[ShardRecord]
    failures: list[dict]
    start: int

    @classmethod
    def from_entries(cls, entries: list[JournalEntry]) -> Resume:
        return cls(
            shards=[entry.shard for entry in entries],
            failures=[failure for entry in entries for failure in entry.failures],
            start=entries[-1].next_input if entries else 0,
        )


def progress_bar(total: int, start: int, enabled: bool) -> tqdm:
    """The clips bar of a run (`failed=N` is added as a postfix by the engines)."""
    return tqdm(
        total=total, initial=start, unit="clip", desc="prepare", disable=not enabled, dynamic_ncols=True
    )


def journal_shard(journal: Journal, record: ShardRecord, next_input: int, failures: list[dict]) -> None:
    """Record a finished shard: where the next shard starts, and the failures met since the previous."""
    journal.append(JournalEntry(record, next_input, list(failures)))


def pack_in_order(
    outcomes: Iterable[WorkResult],
    total: int,
    resume: Resume,
    journal: Journal,
    max_bytes: int | None,
    max_clips: int | None,
    bar: tqdm,
    failed_before: int,
) -> tuple[list[ShardRecord], list[dict]]:
    """Write the outcomes of inputs `resume.start`, ... (`total` inputs in all), in input order, into
    shards: a shard is closed when the next clip does not fit, and journaled with the failures met since
    the previous shard. Returns all shards and failures."""
    shards, failures = list(resume.shards), list(resume.failures)
    pending: list[dict] = []  # failures not yet journaled
    writer: ShardWriter | None = None
    try:
        for position, result in enumerate(outcomes, resume.start):
            bar.update(1)
            if result.failure is not None:
                pending.append(result.failure)
                bar.set_postfix(failed=failed_before + len(failures) + len(pending), refresh=False)
                continue
            if writer is not None and not writer.fits(result.sample):
                shards.append(_finish(writer, journal, position, pending, failures))
                writer = None
            if writer is None:
                writer = ShardWriter(journal.path.parent, len(shards), max_bytes, max_clips)
            writer.write(result.sample)
        if writer is not None:
            shards.append(_finish(writer, journal, total, pending, failures))
            writer = None
        failures += pending
    finally:
        if writer is not None:
            writer.abandon()
    return shards, failures


def _finish(
    writer: ShardWriter, journal: Journal, next_input: int, pending: list[dict], failures: list[dict]
) -> ShardRecord:
    record = writer.finish()
    journal_shard(journal, record, next_input, pending)
    failures += pending
    pending.clear()
    return record
