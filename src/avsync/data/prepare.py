"""`avsync prepare`: videos (or a CAV-MAE datafile) to WebDataset shards, a manifest and a failures file.

    avsync prepare INPUT... OUT [--labels CSV] [--classes CSV] [--workers N]
                   [--shard-max-bytes 512MiB] [--shard-max-clips N] [--allow-silent] ...

How a run is made reproducible and resumable:
1. inputs are listed in a fixed order (sorted directory walk, list/datafile order), duplicates and
   clips with unknown labels are dropped and reported, then the order is shuffled with a fixed seed
   (so that shards mix classes and sources) unless `--keep-order`;
2. clips are decoded by a process pool but consumed in that order, and packed into shards
   sequentially, so shard contents do not depend on the number of workers or on timing;
3. each finished shard is renamed into place and journaled with how far into the input list it
   reaches; a rerun keeps those shards and continues after them (see `journal.py`);
4. at the end `failures.jsonl` and `manifest.json` are written (atomically) and the journal removed.
The output's layout is described in docs/shards.md. The decoding and packing are an engine's: the local
process pool (`pool_prepare.py`) or, with `engine="dask"`, a Dask cluster (`dask_prepare.py`,
docs/prepare_cluster.md); both share the per-clip work and the packing (`prepare_core.py`) and write
the same files. This module is the command around them: listing, labels, fingerprint, output, manifest.

One run at a time writes into an OUT: another is refused at once (`output_lock.py`). The command stops
on SIGINT (Ctrl-C) or SIGTERM with one line saying so and how to resume (exit status 128 + signal).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from avsync import __version__
from avsync.data import pool_prepare
from avsync.data.cavmae import cavmae_frame_path, check_frame_folders
from avsync.data.clip import ExtractionOptions
from avsync.data.journal import Journal, JournalEntry, JournalMismatch
from avsync.data.labels import ClassList, LabelError, clip_id_for_matching, read_labels_csv
from avsync.data.output_lock import OutputInUse, OutputLock
from avsync.data.parts import PARTS_DIR
from avsync.data.pool_prepare import STOP_SIGNALS
from avsync.data.prepare_core import (  # noqa: F401 (WorkItem, process: re-exported)
    Packer,
    PackJob,
    PrepareError,
    WorkItem,
    failure_record,
    process,
)
from avsync.data.schema import SCHEMA_VERSION, stable_json
from avsync.data.shard_writer import ShardRecord
from avsync.data.sources import ClipSource, InputError, discover, file_digest, printable
from avsync.tools import DEFAULT_SHARD_MAX_BYTES, Prepare, default_workers, matching, parse_size  # noqa: F401

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
_SHARD_FILE = re.compile(r"^shard-\d{6}\.tar(\.tmp)?$")

log = logging.getLogger(__name__)


RESUME_HINT = "finished shards are kept: rerun the same command to resume"


class Stopped(BaseException):
    """A stop signal arrived. A `BaseException`, as `KeyboardInterrupt` is, so that no `except
    Exception` on the way (a clip's decoding, in-process with one worker) takes it for a bad input."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class PrepareSummary:
    output: Path
    clips: int
    failures: int
    shards: list[ShardRecord]
    resumed_shards: int


def prepare(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    labels: str | Path | None = None,
    classes: str | Path | None = None,
    options: ExtractionOptions | None = None,
    shard_max_bytes: int | None = DEFAULT_SHARD_MAX_BYTES,
    shard_max_clips: int | None = None,
    workers: int | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
    content_hash: bool = False,
    engine: str = "pool",
    scheduler=None,
    partition_size: int | None = None,
) -> PrepareSummary:
    """Prepare `inputs` into shards under `output` (resuming a killed run there). See the module doc.

    `engine`: "pool" (a process pool of `workers` on this machine) or "dask" (`scheduler`: "local" for
    a `LocalCluster` of `workers` processes, a scheduler address or file, or a `distributed.Client`;
    `partition_size` clips per task); both write the same bytes. `shuffle_seed=None` keeps the input
    order. The fingerprint that tells a finished or resumable run covers each input file's size and
    modification time, or its SHA-256 with `content_hash` (slower: every input is read once more; then
    touching a file changes nothing). Raises `PrepareError` for problems with the run as a whole;
    problems with single inputs end up in `failures.jsonl`.
    """
    if shard_max_bytes is None and shard_max_clips is None:
        raise PrepareError("give a shard cap: shard_max_bytes and/or shard_max_clips")
    options = options or ExtractionOptions()
    pack = _engine(engine, workers, scheduler, partition_size)
    output = Path(output)
    _check_output(output)
    with _claimed(output):
        return _prepare_claimed(
            inputs, output, labels, classes, options, shard_max_bytes, shard_max_clips, shuffle_seed,
            overwrite, progress, content_hash, pack,
        )  # fmt: skip


@contextmanager
def _claimed(output: Path) -> Iterator[None]:
    """OUT, made if need be and locked for this run: a second run into it is refused at once, before
    its listing (`output_lock.py`). An OUT made here that the run leaves empty is removed."""
    made = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(output)
    except OutputInUse as error:
        raise PrepareError(str(error)) from None
    except OSError as error:  # read-only or full file system, permissions
        where = printable(str(error.filename)) if error.filename else output
        raise PrepareError(
            f"{where}: {error.strerror or error} (OUT must be a directory you can write)"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if made:
            with suppress(OSError):  # not empty: the run wrote something
                output.rmdir()


def _prepare_claimed(
    inputs, output, labels, classes, options, shard_max_bytes, shard_max_clips, shuffle_seed, overwrite,
    progress, content_hash, pack,
) -> PrepareSummary:  # fmt: skip
    """`prepare`, once OUT is locked."""
    try:
        discovery = discover(list(inputs))
        _report_listing(discovery)
        datafiles = [
            str(path) for path in inputs if Path(path).suffix.lower() == ".json" and Path(path).is_file()
        ]
        check_frame_folders(discovery.sources, options.num_frames, datafiles)
        class_list, items, label_failures = _resolve_labels(discovery.sources, labels, classes)
    except (InputError, LabelError, OSError) as error:
        raise PrepareError(str(error)) from error
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    listing_failures = discovery.duplicates + label_failures
    fingerprint = _fingerprint(
        items, class_list, options, shard_max_bytes, shard_max_clips, shuffle_seed, content_hash
    )
    try:
        return _prepare_into(
            output, fingerprint, overwrite, items, listing_failures, discovery, class_list, options,
            shard_max_bytes, shard_max_clips, shuffle_seed, pack, progress,
        )  # fmt: skip
    except OSError as error:  # a full disk, a read-only or vanished output directory
        where = printable(str(error.filename)) if error.filename else output
        raise PrepareError(f"{where}: {error.strerror or error} ({RESUME_HINT})") from error


def _engine(engine: str, workers: int | None, scheduler, partition_size: int | None) -> Packer:
    """The `Packer` of `engine` (`prepare_core.py`): the local process pool or the Dask cluster."""
    if partition_size is not None and partition_size < 1:
        raise PrepareError(f"partition_size must be at least 1, not {partition_size}")
    if engine == "pool":
        if scheduler not in (None, "local") or partition_size is not None:
            raise PrepareError(
                "a scheduler and a partition size are settings of the dask engine (--engine dask)"
            )
        return partial(pool_prepare.pack, workers=workers or default_workers())
    if engine != "dask":
        raise PrepareError(f"unknown engine {engine!r}: 'pool' or 'dask'")
    from avsync.data import dask_prepare

    try:
        import distributed  # noqa: F401
    except ImportError:
        raise PrepareError(
            "--engine dask needs Dask's distributed scheduler: pip install 'avsync[cluster]'"
        ) from None
    size = partition_size or dask_prepare.DEFAULT_PARTITION_SIZE
    return partial(
        dask_prepare.pack, scheduler=scheduler, workers=workers or default_workers(), partition_size=size
    )


def _prepare_into(
    output: Path,
    fingerprint: str,
    overwrite: bool,
    items: list[WorkItem],
    listing_failures: list[dict],
    discovery,
    class_list: ClassList,
    options: ExtractionOptions,
    shard_max_bytes: int | None,
    shard_max_clips: int | None,
    shuffle_seed: int | None,
    pack: Packer,
    progress: bool,
) -> PrepareSummary:
    entries = _open_output(output, fingerprint, overwrite)
    if entries is None:
        log.info("%s is already prepared with these inputs and settings; nothing to do", output)
        manifest = _read_json(output / MANIFEST_NAME)
        shards = [ShardRecord(**shard) for shard in manifest["shards"]]
        counts = manifest["counts"]
        return PrepareSummary(output, counts["clips"], counts["failures"], shards, len(shards))
    journal = Journal(output, fingerprint)
    shards, failures = pack(
        PackJob(
            items,
            entries,
            journal,
            options,
            shard_max_bytes,
            shard_max_clips,
            progress,
            failed_before=len(listing_failures),
        )
    )
    all_failures = listing_failures + failures
    _write_atomically(output / FAILURES_NAME, b"".join(stable_json(f) + b"\n" for f in all_failures))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "producer": f"avsync {__version__} prepare",
        "fingerprint": fingerprint,
        "counts": {
            "inputs": len(discovery.sources) + len(discovery.duplicates),
            "clips": sum(shard.clips for shard in shards),
            "failures": len(all_failures),
            "shards": len(shards),
            "ignored_files": discovery.ignored_files,
        },
        "num_classes": len(class_list),
        "classes": class_list.to_json(),
        "preprocessing": _preprocessing(options),
        "sharding": {
            "max_bytes": shard_max_bytes,
            "max_clips": shard_max_clips,
            "order": "input order" if shuffle_seed is None else "shuffled",
            "shuffle_seed": shuffle_seed,
        },
        "shards": [{"name": s.name, "clips": s.clips, "bytes": s.bytes, "sha256": s.sha256} for s in shards],
    }
    _write_atomically(output / MANIFEST_NAME, stable_json(manifest, indent=2) + b"\n")
    journal.remove()
    shutil.rmtree(output / PARTS_DIR, ignore_errors=True)  # left by a Dask run that this one resumed
    return PrepareSummary(output, manifest["counts"]["clips"], len(all_failures), shards, len(entries))


def _examples(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def _report_listing(discovery) -> None:
    """Say what the listing did not turn into clips, so that nothing goes unnoticed."""
    if discovery.ignored_files:
        log.warning(
            "ignored %d file(s) without a video or audio extension, e.g. %s",
            discovery.ignored_files,
            _examples(discovery.ignored_examples),
        )
    if discovery.shared_ids:
        names = [f"{printable(i)} ({len(paths)} files)" for i, paths in discovery.shared_ids.items()]
        log.warning(
            "%d clip id(s) are shared by different files, all kept under distinct keys (one row of "
            "--labels applies to all of them): %s",
            len(names),
            _examples(names),
        )


def _resolve_labels(
    sources: list[ClipSource], labels_csv: str | Path | None, classes_csv: str | Path | None
) -> tuple[ClassList, list[WorkItem], list[dict]]:
    by_clip: dict = {}
    if labels_csv is not None:
        by_clip, problems = read_labels_csv(labels_csv)
        for problem in problems:
            log.warning(problem)
    rows = {s.clip_id: by_clip.get(clip_id_for_matching(s.clip_id)) for s in sources}
    tokens_of = {clip_id: list(row.labels) if row is not None else None for clip_id, row in rows.items()}
    for source in sources:
        if tokens_of[source.clip_id] is None:
            tokens_of[source.clip_id] = list(source.labels or ())
    if labels_csv is not None:
        found = {clip_id_for_matching(s.clip_id) for s in sources}
        unused = [(clip_id, row.line) for clip_id, row in by_clip.items() if clip_id not in found]
        if unused:
            log.warning(
                "%s: %d row(s) name clips that are not among the inputs and are ignored: %s",
                labels_csv,
                len(unused),
                _examples([f"{clip_id} (line {line})" for clip_id, line in unused]),
            )
    if classes_csv is not None:
        class_list = ClassList.from_csv(classes_csv)
    else:
        class_list = ClassList.from_labels(token for tokens in tokens_of.values() for token in tokens)
    items, failures = [], []
    for source in sources:
        try:
            indices = sorted({class_list.resolve(token) for token in tokens_of[source.clip_id]})
        except LabelError as error:
            row = rows[source.clip_id]
            where = f" ({labels_csv}:{row.line})" if row is not None else ""
            failures.append(failure_record(source, f"{error}{where}"))
            continue
        names = tuple(class_list.classes[i].name for i in indices)
        items.append(WorkItem(source, tuple(indices), names))
    unlabeled = sum(1 for item in items if rows[item.source.clip_id] is None and not item.labels)
    if labels_csv is not None and unlabeled:
        log.warning("%d clip(s) have no entry in %s and are kept without labels", unlabeled, labels_csv)
    return class_list, items, failures


def _fingerprint(
    items: list[WorkItem],
    class_list: ClassList,
    options: ExtractionOptions,
    shard_max_bytes: int | None,
    shard_max_clips: int | None,
    shuffle_seed: int | None,
    content_hash: bool = False,
) -> str:
    """Identifies everything that decides the output bytes (not the worker count), the inputs' contents
    included: a changed video must not pass for an already prepared one."""
    description = {
        "schema_version": SCHEMA_VERSION,
        "options": options.as_dict(),
        "classes": class_list.to_json(),
        "shard_max_bytes": shard_max_bytes,
        "shard_max_clips": shard_max_clips,
        "shuffle_seed": shuffle_seed,
        "items": [
            [
                i.source.key,
                printable(i.source.clip_id),
                i.source.kind,
                printable(i.source.path),
                printable(i.source.wav or ""),
                list(i.labels),
                [_stamp(path, content_hash) for path in _files_of(i.source, options.num_frames)],
            ]
            for i in items
        ],
    }
    if content_hash:
        description["content"] = "sha256"
    return hashlib.sha256(stable_json(description)).hexdigest()


def _files_of(source: ClipSource, num_frames: int) -> list[str]:
    """The files whose bytes make a clip's sample."""
    if source.kind == "video":
        return [source.path]
    frames = [str(cavmae_frame_path(source.path, source.clip_id, i)) for i in range(num_frames)]
    return [source.wav or "", *frames]


def _stamp(path: str, content_hash: bool) -> list | None:
    """What is known of a file's content: [size, mtime in ns], or [size, SHA-256]; None if unreadable
    (it fails to decode, and the failure is in the output)."""
    try:
        status = os.stat(path)
        return [status.st_size, file_digest(path) if content_hash else status.st_mtime_ns]
    except OSError:
        return None


def _check_output(output: Path) -> None:
    """Refuse an output path that cannot become the output directory, before any work."""
    if output.is_dir():
        return
    if output.exists() or output.is_symlink():
        what = "a file" if output.is_file() else "not a directory"
        raise PrepareError(f"{output}: exists and is {what}; OUT must be a directory (or a new path)")
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PrepareError(f"{output}: {parent} is a file, so this directory cannot be made")


def _open_output(output: Path, fingerprint: str, overwrite: bool) -> list[JournalEntry] | None:
    """Make `output` ready: entries to resume from ([] for a fresh run), or None if already complete."""
    try:
        return _open_output_unchecked(output, fingerprint, overwrite)
    except OSError as error:  # read-only or full file system, permissions
        where = printable(str(error.filename)) if error.filename else output
        raise PrepareError(
            f"{where}: {error.strerror or error} (OUT must be a directory you can write)"
        ) from None


def _open_output_unchecked(output: Path, fingerprint: str, overwrite: bool) -> list[JournalEntry] | None:
    output.mkdir(parents=True, exist_ok=True)
    journal = Journal(output, fingerprint)
    _refuse_foreign_manifest(output / MANIFEST_NAME)
    if overwrite:
        _clear(output, journal)
    manifest = output / MANIFEST_NAME
    if manifest.exists() and not journal.exists():
        if _read_json(manifest).get("fingerprint") == fingerprint:
            return None
        raise PrepareError(
            f"{output} holds shards of other inputs or settings, or inputs changed since (size or "
            "modification time; content with --content-hash); use a new directory or --overwrite"
        )
    if journal.exists():
        try:
            entries = journal.load()
        except JournalMismatch as error:
            raise PrepareError(str(error)) from error
    else:
        if any(_SHARD_FILE.match(p.name) for p in output.iterdir()):
            raise PrepareError(
                f"{output} holds shard files of an unknown run; use a new directory or --overwrite"
            )
        entries = []
    kept = {entry.shard.name for entry in entries}
    for path in output.iterdir():  # shards past the journal (or half written) are written again
        if _SHARD_FILE.match(path.name) and path.name not in kept:
            path.unlink()
    journal.start(entries)
    if entries:
        log.info("resuming %s after %d finished shard(s)", output, len(entries))
    return entries


def _refuse_foreign_manifest(manifest: Path) -> None:
    """A `manifest.json` that reads as another program's JSON (not prepare's: no `fingerprint` and
    `shards`) is not replaced, even with --overwrite; a damaged one (not JSON) is prepare's to rewrite."""
    try:
        stored = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not (isinstance(stored, dict) and {"fingerprint", "shards"} <= set(stored)):
        raise PrepareError(
            f"{manifest}: not a manifest of avsync prepare (no fingerprint and shards), so it is not "
            "replaced, even with --overwrite; use a new directory"
        )


def _clear(output: Path, journal: Journal) -> None:
    for path in output.iterdir():
        if _SHARD_FILE.match(path.name) or path.name in (MANIFEST_NAME, FAILURES_NAME):
            path.unlink()
    journal.remove()
    shutil.rmtree(output / PARTS_DIR, ignore_errors=True)


def _preprocessing(options: ExtractionOptions) -> dict:
    return {
        **options.as_dict(),
        "frame_rule": "frame i: first frame shown at or after i * D / num_frames (D: video stream duration)",
        "frame_resize": "PIL bicubic to short side <= short_side, never upscaled",
        "frame_orientation": "upright: the display matrix's quarter turns and mirrors applied, as ffmpeg's "
        "autorotate does (metadata: rotation, mirrored)",
        "frame_format": "JPEG",
        "audio": "PyAV decode, libswresample to fbank.sample_rate per channel, then mono; DC removed",
        "fbank_dtype": "float16",
        "fbank_extent": "whole clip, unpadded (cut/pad at read time)",
    }


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrepareError(f"{path}: damaged ({error}); use a new directory or --overwrite") from None
    if not isinstance(value, dict):
        raise PrepareError(f"{path}: damaged (not a JSON object); use a new directory or --overwrite")
    return value


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Stopped` for the block: the run unwinds (pool or cluster shut
    down, the unfinished shard dropped, OUT unlocked) and `main` says so in one line. A second signal
    ends the process at once (what it wrote is as safe as after `kill -9`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_DFL)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_prepare(options: Prepare) -> int:
    """`avsync prepare`: exit status 0 when shards hold a clip, 1 when none, 2 for an unusable input,
    128 + the signal when stopped."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if options.engine == "dask":
        from avsync.data.dask_prepare import quiet_dask_logs

        quiet_dask_logs()
    try:
        with _stop_on_signals():
            summary = prepare(
                **matching(
                    options,
                    prepare,
                    options=ExtractionOptions(**matching(options, ExtractionOptions)),
                    shuffle_seed=None if options.keep_order else options.shuffle_seed,
                    progress=not options.no_progress,
                )
            )
    except PrepareError as error:
        print(f"avsync prepare: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"avsync prepare: stopped by {stop} ({RESUME_HINT})", file=sys.stderr)
        return 128 + stop.signum
    print(
        f"{summary.clips} clip(s) in {len(summary.shards)} shard(s) at {summary.output}; "
        f"{summary.failures} input(s) skipped (see {summary.output / FAILURES_NAME})",
        file=sys.stderr,
    )
    return 0 if summary.clips else 1


if __name__ == "__main__":  # `python -m avsync.data.prepare` (docs/shards.md) is `avsync prepare`
    from avsync.tools import parse

    sys.exit(run_prepare(parse("prepare", sys.argv[1:])))
