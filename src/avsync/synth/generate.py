"""`avsync synth OUT --clips N --classes K`: a synthetic audio-visual set with exact ground truth.

Each clip is a sequence of events; each event shows one class's object (colour, shape, texture, at a
random place and size on a cluttered background) while that class's sound plays (pitch and timbre), so
the audio-visual correspondence changes within the clip. Written as real H.264 + AAC mp4 files with the
CSVs that `avsync prepare` reads, plus the per-frame ground truth that evaluation scores against:

    OUT/videos/<clip>.mp4              10 fps, 128x128 H.264 (yuv420p) + 16 kHz mono AAC by default
    OUT/labels.csv                     clip_id,labels   (labels: quoted, comma-separated mids)
    OUT/classes.csv                    index,mid,display_name   (mids synth_0, synth_1, ...)
    OUT/annotations/<clip>.json        events and the class at the 16 frame times (below)
    OUT/masks/<clip>/f00.png..f15.png  the sounding object's pixels at those times (uint8, 255 = object)
    OUT/splits/{train,test}.txt        clip ids; a `--holdout` fraction held out for evaluation
    OUT/localization_{train,test,all}.csv  per split, the localization manifest `avsync localize` reads
                                       (docs/localization.md: video,frame,mask,class; a row per frame)
    OUT/localization_classes.txt       its class names (the mids) in index order
    OUT/synth.json                     parameters, class designs, counts, clip list (written last)

An annotation holds `events` (`start`, `end` in seconds, half-open, and the same as `start_frame`,
`end_frame`; `class_index`, `mid`, the object's `box` x0,y0,x1,y1) and `frames` (`times`: SPEC §1's
`i * D / 16`; `video_frames`: the frame on screen at each time; `class_indices`; `masks`: paths relative
to OUT). Event boundaries lie on the frame grid, the sound switches on the same sample, and no boundary
falls between the frame on screen at a frame time `t` and the first frame at or after `t`: both show the
same object in the same place, so the ground truth holds for either reading of "the frame at t".

The set depends only on its parameters (clip `i` on `(seed, i)`, however the work is split among
workers); with the encoders single-threaded, even the mp4 bytes repeat on the same FFmpeg build. It is
built in a staging folder that replaces OUT's set only when complete, and an OUT that already holds the
same set is reused as it is ("cached"; a set written before the localization manifests existed gets them
added, without re-rendering, so that the shards prepared from it stay valid). Only the set's own files
are replaced: other entries beside them in OUT (a user's notes, a folder of their work) stay, and a file
inside the set's folders that is not the set's (`videos/mine.mp4`) makes the command refuse rather than
delete it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from avsync.synth.classes import SynthClass
from avsync.synth.clip import (
    ClipRecord,
    annotation_path,
    catalogue,
    clip_id,
    mask_path,
    video_path,
    write_clip,
)
from avsync.synth.config import KIND_DEFAULTS, KINDS, SYNTH_VERSION, SynthConfig, parse_fps
from avsync.tools import Synth, matching

MANIFEST_NAME = "synth.json"
MANIFEST_FORMAT = "avsync-synth"
SPLITS = ("train", "test")
#: The set's own entries in OUT: folders (with the files each may hold, relative to it) and files.
SET_FOLDERS = {
    "videos": re.compile(r"synth_s\d+_\d+\.mp4"),
    "annotations": re.compile(r"synth_s\d+_\d+\.json"),
    "masks": re.compile(r"synth_s\d+_\d+/f\d+\.png"),
    "splits": re.compile(r"(train|test)\.txt"),
}
#: The files the product reads as it reads real data (`avsync.tasks.localization_data.SYNTH_MANIFEST`
#: and `SYNTH_CLASSES`; the product does not import this package): a localization manifest per split
#: (`all`: every clip) and its class list. The segmentation annotations are `annotations/<clip>.json`.
LOCALIZATION_MANIFEST, LOCALIZATION_CLASSES = "localization_{split}.csv", "localization_classes.txt"
LOCALIZATION_SPLITS = (*SPLITS, "all")
PRODUCT_FILES = (*(LOCALIZATION_MANIFEST.format(split=s) for s in LOCALIZATION_SPLITS), LOCALIZATION_CLASSES)
SET_FILES = (MANIFEST_NAME, "labels.csv", "classes.csv", *PRODUCT_FILES)


@dataclass(frozen=True)
class SynthManifest:
    """A complete synthetic set on disk: where it is, how it was made, what it holds."""

    out_dir: Path
    config: SynthConfig
    classes: list[SynthClass]
    clips: list[ClipRecord]
    splits: dict[str, list[str]]
    cached: bool = False
    seconds: float = 0.0
    kept: tuple[str, ...] = ()  # entries of OUT that are not the set's, left as they were

    def video(self, clip: str) -> Path:
        return video_path(self.out_dir, clip)

    def annotation_file(self, clip: str) -> Path:
        return annotation_path(self.out_dir, clip)

    def annotation(self, clip: str) -> dict[str, Any]:
        return json.loads(self.annotation_file(clip).read_text())

    def localization_manifest(self, split: str | None = "test") -> Path:
        """The localization manifest of `split` (None: every clip), the file `avsync localize` reads."""
        return self.out_dir / LOCALIZATION_MANIFEST.format(split=split or "all")

    def to_json(self) -> dict[str, Any]:
        split_of = {clip: split for split, ids in self.splits.items() for clip in ids}
        return {
            "format": MANIFEST_FORMAT,
            "version": SYNTH_VERSION,
            "parameters": self.config.to_json(),
            "classes": [c.to_json() for c in self.classes],
            "counts": {
                "clips": len(self.clips),
                "classes": len(self.classes),
                "events": sum(clip.num_events for clip in self.clips),
                **{split: len(ids) for split, ids in self.splits.items()},
            },
            "clips": [
                {
                    "clip_id": clip.clip_id,
                    "labels": [self.classes[k].mid for k in clip.class_indices],
                    "num_events": clip.num_events,
                    "split": split_of[clip.clip_id],
                }
                for clip in self.clips
            ],
        }


def synthesize(
    out_dir: str | Path,
    clips: int,
    classes: int,
    seed: int = 0,
    *,
    kind: str = "tones",
    duration: float = 10.0,
    fps: float | str | Fraction | None = None,
    size: int | tuple[int, int] | str | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
    holdout: float = 0.2,
    events: tuple[int, int] = (2, 4),
    min_event: float = 1.5,
    video_noise: float | None = None,
    audio_snr_db: float | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> SynthManifest:
    """Write a synthetic set to `out_dir` (or reuse the one there if it has the same parameters).

    `kind`: `tones` or `speechlike` (see :data:`KIND_DEFAULTS`: every parameter left at None takes
    the kind's default). `size`: a square's side, `(width, height)` or `"WxH"`.
    `workers`: processes (default: the CPUs this process may use; 0 or 1 renders in this process).
    `force`: regenerate even when `out_dir` already holds this set.
    """
    if kind not in KINDS:
        raise ValueError(f"invalid synth parameters: --kind must be one of {KINDS}, got {kind!r}")
    given = dict(
        fps=fps,
        size=size,
        sample_rate=sample_rate,
        channels=channels,
        video_noise=video_noise,
        audio_snr_db=audio_snr_db,
    )
    values = {**KIND_DEFAULTS[kind], **{k: v for k, v in given.items() if v is not None}}
    width, height = parse_size(values.pop("size"))
    config = SynthConfig(
        clips=clips,
        classes=classes,
        seed=seed,
        duration=duration,
        fps=parse_fps(values.pop("fps")),
        size=width,
        height=None if height == width else height,
        holdout=holdout,
        events=events,
        min_event=min_event,
        kind=kind,
        **values,
    )
    return synthesize_config(Path(out_dir), config, workers=workers, force=force, progress=progress)


def synthesize_config(
    out_dir: Path,
    config: SynthConfig,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> SynthManifest:
    """:func:`synthesize` for a ready-made :class:`SynthConfig`."""
    started = time.perf_counter()
    out_dir = out_dir.resolve()
    if not force:
        existing = _complete_set(out_dir)
        if existing is not None and existing.config == config:
            _write_product_files(existing, missing_only=True)
            return dataclasses.replace(existing, cached=True, seconds=time.perf_counter() - started)
    kept = _check_replaceable(out_dir)

    staging = out_dir.parent / f".{out_dir.name}.synth-partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        records = _write_clips(staging, config, workers, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = SynthManifest(staging, config, catalogue(config), records, _split(config))
    _write_tables(manifest)
    _write_product_files(manifest)
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    _replace(out_dir, staging)
    return SynthManifest(
        out_dir,
        config,
        manifest.classes,
        records,
        manifest.splits,
        seconds=time.perf_counter() - started,
        kept=tuple(kept),
    )


def load_synth(out_dir: str | Path) -> SynthManifest:
    """The complete set in `out_dir`; a clear error if there is none (missing, partial or foreign)."""
    out_dir = Path(out_dir)
    manifest = _complete_set(out_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"{out_dir} holds no complete synthetic set (no valid {MANIFEST_NAME} or missing files)"
        )
    return manifest


def _complete_set(out_dir: Path) -> SynthManifest | None:
    """The set described by `out_dir/synth.json` if that file is ours and current and all its files exist."""
    try:
        stored = json.loads((out_dir / MANIFEST_NAME).read_text())
        if stored.get("format") != MANIFEST_FORMAT or stored.get("version") != SYNTH_VERSION:
            return None
        config = SynthConfig.from_json(stored["parameters"])
        classes = catalogue(config)
        index = {c.mid: c.index for c in classes}
        clips = [
            ClipRecord(c["clip_id"], tuple(index[mid] for mid in c["labels"]), c["num_events"])
            for c in stored["clips"]
        ]
        splits = {split: [c["clip_id"] for c in stored["clips"] if c["split"] == split] for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    expected = [clip_id(config.seed, i) for i in range(config.clips)]
    if [c.clip_id for c in clips] != expected:
        return None
    for clip in expected:
        paths = [video_path(out_dir, clip), annotation_path(out_dir, clip)]
        paths += [mask_path(out_dir, clip, i) for i in range(config.annotated_frames)]
        if not all(path.is_file() for path in paths):
            return None
    return SynthManifest(out_dir, config, classes, clips, splits)


def _check_replaceable(out_dir: Path) -> list[str]:
    """Refuse to replace a folder that is not a synthetic set, or a set whose folders hold files that are
    not the set's: they may be someone's data. Returns the other entries beside the set (kept)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return []
    interrupted = _retired(out_dir).is_dir()  # a swap of the set's entries that did not finish
    if not (out_dir / MANIFEST_NAME).is_file() and not interrupted:
        raise FileExistsError(
            f"{out_dir} is not empty and holds no {MANIFEST_NAME}, so it is not a synthetic set that may be "
            "replaced; choose another path or empty it"
        )
    strangers = _foreign_files(out_dir)
    if strangers:
        listed = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise FileExistsError(
            f"{out_dir} holds files in the synthetic set's folders that are not the set's ({listed}); "
            "replacing the set would delete them: move them out, or choose another path"
        )
    own = {*SET_FOLDERS, *SET_FILES}
    return sorted(name for name in os.listdir(out_dir) if name not in own)


def _foreign_files(out_dir: Path) -> list[str]:
    """Paths (relative to `out_dir`) under the set's own entry names that a set does not write there."""
    strangers = []
    for name in SET_FILES:
        path = out_dir / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            strangers.append(name)
    for name, pattern in SET_FOLDERS.items():
        folder = out_dir / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            strangers.append(name)
            continue
        for root, folders, files in os.walk(folder):
            here = Path(root).relative_to(folder)
            for entry in [*files, *(f for f in folders if os.path.islink(os.path.join(root, f)))]:
                relative = (here / entry).as_posix()
                if os.path.islink(os.path.join(root, entry)) or not pattern.fullmatch(relative):
                    strangers.append(f"{name}/{relative}")
    return sorted(strangers)


def _retired(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.synth-old"


def _write_clips(staging: Path, config: SynthConfig, workers: int | None, progress: bool) -> list[ClipRecord]:
    workers = min(config.clips, _available_cpus() if workers is None else workers)
    records: list[ClipRecord | None] = [None] * config.clips
    if workers <= 1:
        with _progress_bar(config.clips, progress) as bar:
            for index in range(config.clips):
                records[index] = write_clip(staging, config, index)
                bar.update()
        return records
    # The pool starts its processes before the progress bar starts its monitor thread.
    with ProcessPoolExecutor(workers, mp_context=_worker_context()) as pool:
        futures = {pool.submit(write_clip, staging, config, i): i for i in range(config.clips)}
        with _progress_bar(config.clips, progress) as bar:
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update()
    return records


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _worker_context() -> multiprocessing.context.BaseContext:
    """`fork` on Linux: workers start at once instead of re-importing the caller's `__main__` (with torch
    and whatever else it loads) as `spawn` and `forkserver` do. They run only NumPy, Pillow and PyAV code.
    Elsewhere (macOS, Windows) `spawn`, the only safe choice there."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _progress_bar(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="synth", unit="clip", disable=not enabled, file=sys.stderr)


def _split(config: SynthConfig) -> dict[str, list[str]]:
    """A seeded random `holdout` fraction of the clips as `test` (at least one when asked and possible)."""
    held = round(config.clips * config.holdout)
    if config.holdout > 0 and config.clips > 1:
        held = min(max(held, 1), config.clips - 1)
    order = np.random.default_rng([config.seed, config.clips, 1]).permutation(config.clips)
    test = set(order[:held].tolist())
    ids = [clip_id(config.seed, i) for i in range(config.clips)]
    return {
        "train": [c for i, c in enumerate(ids) if i not in test],
        "test": [c for i, c in enumerate(ids) if i in test],
    }


def _write_tables(manifest: SynthManifest) -> None:
    """`classes.csv`, `labels.csv` (the formats `avsync prepare` reads) and the split lists."""
    out = manifest.out_dir
    rows = [f'{c.index},{c.mid},"{c.display_name}"' for c in manifest.classes]
    (out / "classes.csv").write_text("\n".join(["index,mid,display_name", *rows]) + "\n")
    rows = [
        f'{clip.clip_id},"{",".join(manifest.classes[k].mid for k in clip.class_indices)}"'
        for clip in manifest.clips
    ]
    (out / "labels.csv").write_text("\n".join(["clip_id,labels", *rows]) + "\n")
    (out / "splits").mkdir()
    for split, ids in manifest.splits.items():
        (out / "splits" / f"{split}.txt").write_text("".join(f"{c}\n" for c in ids))


def _write_product_files(manifest: SynthManifest, missing_only: bool = False) -> None:
    """The localization manifests (`video,frame,mask,class`, a row per annotated frame, paths relative
    to the set) and their class list, built from the annotations (each read once). `missing_only`: add
    those absent from a complete set written before they existed, each atomically (a temporary name,
    then a rename)."""
    names = [name for name in PRODUCT_FILES if not (missing_only and (manifest.out_dir / name).is_file())]
    if not names:
        return
    mids = [c.mid for c in manifest.classes]
    frames = {c.clip_id: manifest.annotation(c.clip_id)["frames"] for c in manifest.clips}
    contents = {LOCALIZATION_CLASSES: "".join(f"{mid}\n" for mid in mids)}
    for split in LOCALIZATION_SPLITS:
        clips = manifest.splits[split] if split in manifest.splits else list(frames)
        rows = [["video", "frame", "mask", "class"]]
        for clip in clips:
            video = video_path(Path(), clip).as_posix()
            masks, classes = frames[clip]["masks"], frames[clip]["class_indices"]
            rows += [
                [video, str(i), mask, mids[k]] for i, (mask, k) in enumerate(zip(masks, classes, strict=True))
            ]
        lines = io.StringIO()
        csv.writer(lines, lineterminator="\n").writerows(rows)
        contents[LOCALIZATION_MANIFEST.format(split=split)] = lines.getvalue()
    for name in names:
        partial = manifest.out_dir / f".{name}.partial"
        partial.write_text(contents[name])
        partial.replace(manifest.out_dir / name)


def _replace(out_dir: Path, staging: Path) -> None:
    """Swap the finished staging folder's entries in for the set's own entries of `out_dir` (absent,
    empty, or an older set), one rename each; the other entries of `out_dir` stay where they are.
    `synth.json` leaves first and arrives last, so the folder never reads as a complete set midway."""
    if not out_dir.is_dir():
        staging.rename(out_dir)
        return
    retired = _retired(out_dir)  # only ever holds the set's own entries
    shutil.rmtree(retired, ignore_errors=True)
    retired.mkdir()
    for name in [*SET_FILES, *SET_FOLDERS]:  # MANIFEST_NAME first
        if (out_dir / name).exists():
            (out_dir / name).rename(retired / name)
    for name in sorted(os.listdir(staging), key=lambda name: name == MANIFEST_NAME):
        (staging / name).rename(out_dir / name)
    staging.rmdir()
    shutil.rmtree(retired)


def parse_size(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """`(width, height)` from a side (`128`, `"128"`), `"320x240"` or a pair."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    text = str(value).lower()
    try:
        width, _, height = text.partition("x")
        return int(width), int(height or width)
    except ValueError as error:
        raise ValueError(f"invalid synth parameters: --size must be SIDE or WxH, got {value!r}") from error


def run_synth(options: Synth) -> int:
    """`avsync synth`: exit status 0 when the set is written (or already there), 2 for bad parameters."""
    try:
        manifest = synthesize(
            options.out, **matching(options, synthesize, events=tuple(options.events), progress=True)
        )
    except (ValueError, FileExistsError) as error:
        print(f"avsync synth: error: {error}", file=sys.stderr)
        return 2
    counts = f"{len(manifest.clips)} clips, {len(manifest.classes)} classes"
    if manifest.cached:
        print(f"cached: {manifest.out_dir} already holds this set ({counts}); --force regenerates")
    else:
        rate = len(manifest.clips) / manifest.seconds
        print(f"wrote {counts} to {manifest.out_dir} in {manifest.seconds:.1f} s ({rate:.2f} clips/s)")
        if manifest.kept:
            print(f"kept what else was there, untouched: {', '.join(manifest.kept)}")
    return 0
