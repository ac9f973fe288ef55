"""Temporal segmentation of videos (supplementary §11, Fig. 6): which frames of a clip belong together?

A clip's 16 SPEC frames and their aligned audio windows go through the backbone; the per-frame global
tokens (L2-normalized; `audio_visual` concatenates both, each normalized) are clustered into K segments
(`avsync.evaluation.segmentation`), once per feature kind: video, audio-visual, audio. A figure like
Fig. 6 shows the frame strip, the three segment bars (and the ground truth when known) and the
spectrogram.

    avsync segment clip1.mp4 clip2.mp4 --ckpt model.ckpt --out seg/ [--segments K] [--annotations A]

writes `seg/<video>.png` per video and `seg/segments.json` (segment ids per kind, the number of segments
and where it came from, and with per-frame annotations the adjusted Rand index and boundary F1 per kind);
a video that fails is reported and skipped. Videos that share a file name get distinct names
(`video_names`); an `--out` that is an existing file is refused before any work.

How many segments: `--segments K` when given; else the clip's count from `--annotations`; else chosen per
clip and feature kind by the silhouette score over 2..`--max-segments` (a wrong K costs much: a clip of
two events cut into the paper's 5 scores an ARI near 0.6 even with perfect features). Annotations: a
folder of `<video stem>.json` in the synthetic set's format (`frames.class_indices`) or
`{"labels": [...]}`, one label per frame (`DIR` may also be a synthetic set's root: its `annotations/`
folder is used); or a CSV with columns `clip,segments` (clip: the video's stem or file name) that gives
only the count.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image

from avsync.data.alignment import AlignmentMode
from avsync.data.clip import ExtractionOptions, extract_video_clip
from avsync.data.errors import DecodeError
from avsync.data.transforms import AudioWindows, CenterFrame, frames_to_tensor
from avsync.evaluation.segmentation import (
    Linkage,
    adjusted_rand_index,
    boundary_f1,
    choose_segment_count,
    first_appearance_order,
    segment_frames,
)
from avsync.model import CAVMAESync
from avsync.tools import Segment, matching

FeatureKind = Literal["video", "audio_visual", "audio"]
#: Bar order of Fig. 6: visual, audio-visual, audio.
FEATURE_KINDS: tuple[FeatureKind, ...] = ("video", "audio_visual", "audio")
BAR_TITLES = {"video": "video", "audio_visual": "audio-visual", "audio": "audio", "truth": "ground truth"}
#: `num_segments` value that chooses the count per clip and feature kind (silhouette score).
AUTO = "auto"


@dataclass
class ClipFeatures:
    """Per-frame unit-norm global tokens of one clip, and what the figure shows of it."""

    name: str
    audio: np.ndarray  # (T, D)
    video: np.ndarray  # (T, D)
    frames: list[np.ndarray]  # T RGB uint8 images as decoded
    fbank: np.ndarray  # (S, mel) raw log-Mel spectrogram of the whole clip
    duration: float

    def of(self, kind: FeatureKind) -> np.ndarray:
        if kind == "audio":
            return self.audio
        if kind == "video":
            return self.video
        if kind == "audio_visual":
            return np.concatenate([self.audio, self.video], axis=1)
        raise ValueError(f"unknown feature kind {kind!r}; use one of {FEATURE_KINDS}")


@torch.no_grad()
def clip_features(
    backbone: CAVMAESync,
    path: str | Path,
    options: ExtractionOptions | None = None,
    alignment: AlignmentMode = "clip",
) -> ClipFeatures:
    """Decode `path` as `avsync prepare` does (SPEC frames, aligned windows) and encode its T pairs."""
    options = options or ExtractionOptions()
    clip = extract_video_clip(path, options)
    images = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in clip.frames]
    geometry = CenterFrame(backbone.image_size)
    device = next(backbone.parameters()).device
    video = frames_to_tensor([geometry(image) for image in images]).to(device)
    fbank = torch.from_numpy(clip.fbank).float()
    audio = AudioWindows(options.num_frames, backbone.audio_length, alignment).windows(fbank).to(device)
    embeddings = backbone.encode(audio[None], video[None])
    return ClipFeatures(
        name=Path(path).stem,
        audio=F.normalize(embeddings.global_audio[0].float(), dim=-1).cpu().numpy(),
        video=F.normalize(embeddings.global_video[0].float(), dim=-1).cpu().numpy(),
        frames=[np.asarray(image) for image in images],
        fbank=clip.fbank.astype(np.float32),
        duration=float(clip.metadata["duration"]),
    )


@dataclass
class VideoSegmentation:
    """Segment ids per feature kind, how many and why (`count_source`: `given`, `truth` or `silhouette`);
    with ground truth, the agreement of each kind with it."""

    name: str
    segments: dict[str, list[int]]
    methods: dict[str, str]
    truth: list[int] | None = None
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    count_source: str = "given"

    def to_json(self) -> dict:
        out = {
            "segments": self.segments,
            "methods": self.methods,
            "counts": self.counts,
            "count_source": self.count_source,
        }
        if self.truth is not None:
            out |= {"truth": self.truth, "agreement": self.agreement}
        return out


def segment_clip(
    features: ClipFeatures,
    num_segments: int | Literal["auto"] | None = AUTO,
    truth: Sequence[int] | None = None,
    linkage: Linkage = "ward",
    contiguous: bool = False,
    tolerance: int = 1,
    max_segments: int = 8,
) -> VideoSegmentation:
    """Segment a clip with each feature kind into `num_segments`; `None` takes the number of distinct
    ground-truth labels (needs `truth`), `"auto"` the silhouette's choice in 2..`max_segments` per kind.
    With `truth`, adds ARI and boundary precision/recall/F1."""
    frames = len(features.audio)
    if truth is not None and len(truth) != frames:
        raise ValueError(f"{features.name}: {len(truth)} ground-truth labels for {frames} frames")
    source = "given"
    if num_segments is None:
        if truth is None:
            raise ValueError("num_segments=None needs ground truth to count its segments")
        num_segments, source = len(set(truth)), "truth"
    elif num_segments == AUTO:
        source = "silhouette"
    elif not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive integer, None or {AUTO!r}, got {num_segments!r}")
    result = VideoSegmentation(features.name, {}, {}, None if truth is None else [int(x) for x in truth])
    result.count_source = source
    for kind in FEATURE_KINDS:
        if num_segments == AUTO:
            count = choose_segment_count(features.of(kind), max_segments, linkage, contiguous).count
        else:
            count = min(num_segments, frames)
        segmentation = segment_frames(features.of(kind), count, linkage, contiguous)
        result.segments[kind] = segmentation.labels.tolist()
        result.methods[kind] = segmentation.method
        result.counts[kind] = count
        if truth is not None:
            bounds = boundary_f1(truth, segmentation.labels, tolerance)
            result.agreement[kind] = {
                "ari": adjusted_rand_index(truth, segmentation.labels),
                "boundary_precision": bounds.precision,
                "boundary_recall": bounds.recall,
                "boundary_f1": bounds.f1,
            }
    return result


def plot_segmentation(features: ClipFeatures, result: VideoSegmentation, path: str | Path) -> Path:
    """Fig. 6-style PNG: frame strip, segment bars (video, audio-visual, audio, then truth), spectrogram."""
    bars = [(BAR_TITLES[kind], result.segments[kind]) for kind in FEATURE_KINDS]
    if result.truth is not None:
        bars.append((BAR_TITLES["truth"], _truth_ids(result.truth)))
    strip = np.concatenate([_thumbnail(frame, 96) for frame in features.frames], axis=1)
    duration, frames = features.duration, len(features.frames)
    ratios = [strip.shape[0] / strip.shape[1] * 16, *[0.5] * len(bars), 2.5]
    figure = Figure(figsize=(12, sum(ratios) * 0.75 + 0.6), layout="constrained")
    axes = figure.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    axes[0].imshow(strip, extent=(0, duration, 0, 1), aspect="auto")
    axes[0].set_title(features.name, fontsize=10)
    colours = ListedColormap(_palette(max(max(ids) for _, ids in bars) + 1))
    for axis, (title, ids) in zip(axes[1:], bars, strict=False):
        axis.imshow(
            np.asarray(ids)[None], extent=(0, duration, 0, 1), aspect="auto", cmap=colours,
            vmin=-0.5, vmax=colours.N - 0.5, interpolation="nearest",
        )  # fmt: skip
        for boundary in range(1, frames):
            if ids[boundary] != ids[boundary - 1]:
                axis.axvline(boundary * duration / frames, color="black", linewidth=1.5)
        axis.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    spectrogram = axes[-1]
    spectrogram.imshow(
        features.fbank.T, origin="lower", extent=(0, duration, 0, features.fbank.shape[1]), aspect="auto",
        cmap="magma",
    )  # fmt: skip
    spectrogram.set_ylabel("mel bin", fontsize=9)
    spectrogram.set_xlabel("time (s)")
    for axis in axes[:-1]:
        axis.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _thumbnail(frame: np.ndarray, height: int) -> np.ndarray:
    image = Image.fromarray(frame)
    width = max(1, round(image.width * height / image.height))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def _truth_ids(truth: Sequence[int]) -> list[int]:
    """Ground-truth labels renumbered by first appearance, so its colours line up with the bars'."""
    return first_appearance_order(truth).tolist()


def _palette(count: int) -> list:
    base = colormaps["tab10"].colors if count <= 10 else colormaps["tab20"].colors
    return [base[i % len(base)] for i in range(count)]


# ---------------------------------------------------------------------------------------------- ground truth
def read_annotation(directory: Path, name: str) -> list[int] | None:
    """Per-frame labels of video `name` from `directory` (see the module docstring), or None if absent."""
    folder = directory / "annotations" if (directory / "annotations").is_dir() else directory
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    content = json.loads(path.read_text())
    labels = content["frames"]["class_indices"] if "frames" in content else content.get("labels")
    if not isinstance(labels, list):
        raise ValueError(f"{path}: no per-frame labels (frames.class_indices or labels)")
    return [int(label) for label in labels]


def read_segment_counts(path: Path) -> dict[str, int]:
    """`clip -> number of segments` from a CSV with columns `clip,segments`; clip names are taken without
    their suffix, so that `a.mp4` and `a` both name video `a.mp4`. A `ValueError` names the file and row."""
    counts: dict[str, int] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"clip", "segments"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns clip,segments (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                count = int(row["segments"])
            except (TypeError, ValueError):
                count = 0
            if count < 1 or not row["clip"]:
                raise ValueError(f"{path}: line {line}: a clip name and a positive segment count are needed")
            counts[Path(row["clip"]).stem] = count
    return counts


# --------------------------------------------------------------------------- annotated videos, synthetic sets
@dataclass
class SynthSegmentationScore:
    """Per-clip results on annotated videos (a synthetic set's, or any) and their means per feature kind."""

    clips: list[VideoSegmentation]
    skipped: list[tuple[str, str]]

    def mean(self, metric: str = "ari", kind: FeatureKind = "audio_visual") -> float:
        values = [clip.agreement[kind][metric] for clip in self.clips]
        return float(np.mean(values)) if values else math.nan

    def to_json(self) -> dict:
        return {
            "clips": len(self.clips),
            "mean": {
                kind: {metric: self.mean(metric, kind) for metric in ("ari", "boundary_f1")}
                for kind in FEATURE_KINDS
            },
            "skipped": [{"source": source, "reason": reason} for source, reason in self.skipped],
        }


def score_segmentation(
    backbone: CAVMAESync,
    videos: Sequence[tuple[str, Path]],
    annotations: str | Path,
    num_segments: int | Literal["auto"] | None = None,
    linkage: Linkage = "ward",
    contiguous: bool = False,
    options: ExtractionOptions | None = None,
) -> SynthSegmentationScore:
    """Segment each `(name, video)` and score it against its per-frame labels, `<name>.json` in the
    folder `annotations` (`read_annotation`). A video that cannot be decoded, or has no annotation, is
    skipped with its reason. `num_segments=None`: each clip's own number of distinct labels (the true
    count); `"auto"`: the silhouette's choice."""
    clips, skipped = [], []
    for name, video in videos:
        truth = read_annotation(Path(annotations), name)
        if truth is None:
            skipped.append((name, f"no annotation {name}.json in {annotations}"))
            continue
        try:
            features = clip_features(backbone, video, options)
        except DecodeError as error:
            skipped.append((name, str(error)))
            continue
        clips.append(segment_clip(features, num_segments, truth, linkage, contiguous))
    return SynthSegmentationScore(clips, skipped)


def synth_videos(synth_dir: str | Path, split: str | None = "test") -> list[tuple[str, Path]]:
    """`(clip id, video)` of a synthetic set's split (None: every clip), in the set's order: the videos of
    the localization manifest `avsync synth` writes (`synth_prompt_set`), not the generator's code."""
    from avsync.tasks.localization_data import synth_prompt_set

    return [(source.key, source.video) for source in synth_prompt_set(synth_dir, split).sources]


def score_synth_segmentation(
    backbone: CAVMAESync,
    synth_dir: str | Path,
    split: str | None = "test",
    num_segments: int | Literal["auto"] | None = None,
    linkage: Linkage = "ward",
    contiguous: bool = False,
    options: ExtractionOptions | None = None,
) -> SynthSegmentationScore:
    """Segment every clip of a synthetic set (or one split) and score it against its per-frame classes
    (`score_segmentation` on the set's videos and `annotations/`, the path of real annotated videos).
    `num_segments=None`: each clip's own number of distinct classes, i.e. the true count (the synthetic
    clips hold 2-4 events, fewer than the paper's 5); `"auto"`: the silhouette's choice."""
    videos = synth_videos(synth_dir, split)
    annotations = Path(synth_dir) / "annotations"
    return score_segmentation(backbone, videos, annotations, num_segments, linkage, contiguous, options)


def synth_segmentation_ari(
    backbone: CAVMAESync,
    synth_dir: str | Path,
    split: str | None = "test",
    kind: FeatureKind = "audio_visual",
    num_segments: int | Literal["auto"] | None = None,
) -> float:
    """Mean adjusted Rand index of `kind` segments over a synthetic set's clips (for the demo table);
    by default each clip is cut into its true number of segments."""
    return score_synth_segmentation(backbone, synth_dir, split, num_segments).mean("ari", kind)


def synth_segmentation_aris(
    backbone: CAVMAESync,
    synth_dir: str | Path,
    split: str | None = "test",
    kind: FeatureKind = "audio_visual",
    settings: Sequence[int | Literal["auto"] | None] = (None, AUTO),
) -> list[float]:
    """`synth_segmentation_ari` for each `num_segments` of `settings`, encoding every clip once."""
    annotations = Path(synth_dir) / "annotations"
    per_setting: list[list[float]] = [[] for _ in settings]
    for name, video in synth_videos(synth_dir, split):
        truth = read_annotation(annotations, name)
        try:
            features = clip_features(backbone, video)
        except DecodeError:
            continue
        if truth is None:
            continue
        for scores, count in zip(per_setting, settings, strict=True):
            scores.append(segment_clip(features, count, truth).agreement[kind]["ari"])
    return [float(np.mean(scores)) if scores else math.nan for scores in per_setting]


# ---------------------------------------------------------------------------------------------- command line
def video_names(videos: Sequence[Path]) -> list[str]:
    """One name per video, for its figure and its `segments.json` entry: the file's stem, unless an
    earlier video has it (`d1/clip.mp4`, `d2/clip.mp4`; compared without case, as the folder may be on
    a case-insensitive file system): then the stem and a hash of the path as given, `clip-1a2b3c4d`, as
    `avsync embed` keys such files. Distinct inputs never share an output."""
    from avsync.data.sources import printable, short_hash

    names: list[str] = []
    taken: set[str] = set()
    for video in videos:
        stem = printable(Path(video).stem)
        name, attempt = stem, 0
        while name.casefold() in taken:
            attempt += 1
            name = f"{stem}-{short_hash(str(video) if attempt == 1 else f'{video}#{attempt}')}"
        taken.add(name.casefold())
        names.append(name)
    return names


def run_segment(options: Segment) -> int:
    """`avsync segment`: exit status 0 when a video was segmented, 1 when none could be, 2 for an
    unusable checkpoint or annotations."""
    from avsync.checkpoints import CheckpointError, load_backbone
    from avsync.output_paths import check_output_folder

    counts: dict[str, int] = {}
    try:
        check_output_folder(options.out)  # before the model is read and the videos decoded
        if options.annotations is not None and options.annotations.is_file():
            counts = read_segment_counts(options.annotations)
        elif options.annotations is not None and not options.annotations.is_dir():
            raise ValueError(f"{options.annotations}: no such annotation folder or CSV file")
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        backbone = load_backbone(options.ckpt).to(device)
    except (CheckpointError, RuntimeError, ValueError, OSError) as error:
        print(f"avsync segment: error: {error}", file=sys.stderr)
        return 2
    extraction = ExtractionOptions(max_duration=options.max_duration)
    results: dict[str, dict] = {}
    failures: list[dict[str, str]] = []
    for video, name in zip(options.videos, video_names(options.videos), strict=True):
        try:
            features = clip_features(backbone, video, extraction, options.alignment)
            truth = None
            if options.annotations and not counts:
                truth = read_annotation(options.annotations, video.stem)
            # the count: given > the annotation's (a CSV's, or the truth's distinct labels) > silhouette
            count = options.segments or counts.get(video.stem) or (None if truth is not None else AUTO)
            result = segment_clip(
                features, **matching(options, segment_clip, num_segments=count, truth=truth)
            )
            if video.stem in counts and options.segments is None:
                result.count_source = "annotations"
            picture = plot_segmentation(features, result, options.out / f"{name}.png")
        except (DecodeError, ValueError, KeyError, OSError) as error:
            reason = str(error) if isinstance(error, DecodeError) else f"{video}: {error}"
            print(f"skipped {reason}", file=sys.stderr)
            failures.append({"source": str(video), "reason": reason})
            continue
        results[name] = {"video": str(video), "figure": picture.name, **result.to_json()}
        scores = result.agreement.get("audio_visual")
        summary = f"  ARI {scores['ari']:.2f}  boundary F1 {scores['boundary_f1']:.2f}" if scores else ""
        print(
            f"{name}: {result.counts['audio_visual']} audio-visual segments ({result.count_source}) "
            f"{result.segments['audio_visual']}{summary}"
        )
    report: dict = {"segments": options.segments, "max_segments": options.max_segments}
    report |= {"contiguous": options.contiguous, "linkage": options.linkage}
    report |= {"videos": results, "failures": failures}
    scored = [entry["agreement"] for entry in results.values() if "agreement" in entry]
    if scored:
        report["mean"] = {
            kind: {
                metric: float(np.mean([s[kind][metric] for s in scored])) for metric in ("ari", "boundary_f1")
            }
            for kind in FEATURE_KINDS
        }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "segments.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if results else 1
