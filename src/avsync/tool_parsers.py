"""The argparse parsers of the `avsync` tools whose modules import torch and Lightning.

They live here, free of heavy imports, so that `avsync TOOL --help` and usage errors come back in a
fraction of a second: `avsync.cli` parses with them before it imports the tool, and the tools build
their parsers from here too, so there is one definition of each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from avsync.config_checks import describe_count, describe_range, in_range, is_count

#: `avsync.evaluation.similarity.STRATEGIES` and `avsync.evaluation.retrieval.DIRECTIONS`, spelled out
#: here so that building the parser imports no torch (a test keeps them equal).
RETRIEVAL_STRATEGIES = ("diagonal_mean", "diagonal_max", "block_mean", "block_max")
RETRIEVAL_DIRECTIONS = ("video_to_audio", "audio_to_video")

#: The defaults of `avsync.data.clip.ExtractionOptions` that `prepare` and `embed` offer as options, spelled
#: out for the same reason (a test keeps them equal).
EXTRACTION_DEFAULTS = dict(
    num_frames=16,
    short_side=224,
    jpeg_quality=90,
    mono="mean",
    min_duration=2.0,
    max_duration=60.0,
    max_av_mismatch=1.0,
)
#: `avsync.data.audio.MonoMode`'s values.
MONO_MODES = ("mean", "first")

#: `avsync.synth.config.KINDS` and the parts of `KIND_DEFAULTS` that `synth --help` shows.
SYNTH_KINDS = ("tones", "speechlike")
SYNTH_KIND_DEFAULTS: dict[str, dict] = {
    "tones": dict(fps="10", size=128, sample_rate=16000, channels=1),
    "speechlike": dict(fps="8", size="320x240", sample_rate=22050, channels=2),
}

#: `avsync.api.model.PRECISIONS` and `avsync.api.outputs.OUTPUT_FORMATS`.
EMBED_PRECISIONS = ("fp32", "bf16")
EMBED_OUTPUT_FORMATS = ("npz", "parquet")
AUTHORS_KWARGS_HELP = "JSON of the authors' constructor arguments for their files, e.g. '{\"num_heads\": 12}'"

#: `avsync prepare`'s default shard size cap (bytes); `avsync.data.prepare` uses this one.
DEFAULT_SHARD_MAX_BYTES = 512 * 2**20
#: Clips per task of `avsync prepare --engine dask`; `avsync.data.dask_prepare` uses this one.
DEFAULT_PARTITION_SIZE = 256


def default_workers() -> int:
    """Decoding processes of `prepare` and `embed` when not given."""
    return max(1, min(4, os.cpu_count() or 1))


def parse_size(text: str) -> int:
    """`"512MiB"`, `"1GB"`, `"200M"`, `"1e9"` -> bytes (KiB/MiB/GiB binary; K/KB/M/MB/G/GB decimal)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 1GB, 200000000)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    try:
        size = float(number) * base ** " KMGT".index(unit.upper() or " ")
    except ValueError:  # "1.2.3"
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 1GB, 200000000)") from None
    if not 1 <= size < 2**63:  # "0", "1e400" (an OverflowError, which argparse would not catch)
        raise argparse.ArgumentTypeError(f"must be a finite size of at least 1 byte, got {text!r}")
    return int(size)


def count(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer from `minimum` to `maximum` (None: unbounded). Anything else is a
    usage error naming the flag (exit 2) before the tool does any work, not a failure deep in it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not is_count(value, minimum, maximum):
            raise argparse.ArgumentTypeError(f"must be {describe_count(minimum, maximum)}, got {value}")
        return value

    return parse


def number(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse `type`: a finite number between the bounds (each closed unless `*_open`), as `count`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not in_range(value, low, high, low_open, high_open):
            words = describe_range(low, high, low_open, high_open)
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value

    return parse


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser that also checks relations between options: `require(test, message)` adds one,
    reported as a usage error when `test(args)` is False."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relations: list[tuple[Callable[[argparse.Namespace], bool], str]] = []

    def require(self, test: Callable[[argparse.Namespace], bool], message: str) -> None:
        self.relations.append((test, message))

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        for test, message in self.relations:
            if not test(parsed):
                self.error(message)
        return parsed, extras


def _durations_in_order(args: argparse.Namespace) -> bool:
    return args.min_duration <= args.max_duration


def retrieve() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync retrieve",
        description="`avsync retrieve --ckpt PATH --shards DIR`: retrieval over prepared shards, printed "
        "and saved.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="PretrainModule checkpoint, safetensors export or authors' file"
    )
    parser.add_argument("--shards", required=True, help="prepared shard directory (or glob / brace pattern)")
    parser.add_argument("--out", help="directory for retrieval.json / retrieval.csv")
    parser.add_argument(
        "--strategies", nargs="+", default=list(RETRIEVAL_STRATEGIES), choices=RETRIEVAL_STRATEGIES
    )
    parser.add_argument(
        "--directions", nargs="+", default=list(RETRIEVAL_DIRECTIONS), choices=RETRIEVAL_DIRECTIONS
    )
    parser.add_argument("--top-k", type=count(0), default=0, help="also save each query's top-k targets")
    parser.add_argument("--batch-size", type=count(1), default=8, help="clips per batch")
    parser.add_argument("--workers", type=count(0), default=2)
    parser.add_argument(
        "--alignment",
        choices=["clip", "authors"],
        default=None,
        help="frame/window alignment (default: 'authors' for 1024-frame models such as CAV-MAE, else 'clip')",
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument(
        "--precision", default=None, help="e.g. bf16-mixed (default: 32 on CPU, bf16-mixed on GPU)"
    )
    parser.add_argument(
        "--authors-kwargs",
        type=json.loads,
        default={},
        help="JSON, e.g. '{\"num_heads\": 12}' for authors' files",
    )
    return parser


def localize() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync localize",
        description="Sound-prompted segmentation: heat maps of where a sound comes from, scored as in "
        "DenseAV (per-class pixel AP and best IoU over 20 thresholds; mAP and mIoU).",
    )
    add = parser.add_argument
    add(
        "--ckpt",
        required=True,
        type=Path,
        help="avsync checkpoint (.ckpt / .safetensors) or the authors' one",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifest",
        type=Path,
        help="CSV: mask,class and image,audio[,audio_start] or video,frame_time (docs/localization.md)",
    )
    source.add_argument(
        "--synth", type=Path, help="a synthetic set (avsync synth): every frame with its window"
    )
    add("--split", default="test", help="synthetic split: train, test or all (default: %(default)s)")
    add("--out", required=True, type=Path, help="output folder: metrics.json and overlays/")
    add("--classes", type=Path, help="known class names (text, one per line; or a CSV); others are refused")
    add(
        "--audio-start",
        type=number(0),
        help="seconds into each prompt sound where its window starts (default: centred)",
    )
    add(
        "--mismatched-sounds",
        action="store_true",
        help="control: prompt each source with the next source's sounds (maps that follow the sound "
        "score lower; maps that ignore it score the same)",
    )
    add(
        "--patch-readout",
        choices=("patch_tokens", "global_readout", "self_attention"),
        default="patch_tokens",
        help="visual features the sound is compared with (default: %(default)s, the paper's; the others "
        "read the patches out the way the global token is made: docs/localization.md)",
    )
    add(
        "--prompt-surgery",
        action="store_true",
        help="subtract the mean of all prompts from each (CLIP Surgery): removes what every sound lights up",
    )
    add(
        "--normalization",
        choices=("dataset", "per_image"),
        default="dataset",
        help="min-max over all maps (DenseAV's protocol) or per map (default: %(default)s)",
    )
    add("--overlays", type=count(0), default=16, help="overlay pictures to write (default: %(default)s)")
    add("--batch-size", type=count(1), default=4, help="sources per batch (a synthetic clip is 16 prompts)")
    add("--workers", type=count(0), default=2, help="DataLoader worker processes (default: %(default)s)")
    add(
        "--alignment", choices=("clip", "authors"), default="clip", help="frame-to-window alignment (SPEC §1)"
    )
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: %(default)s)")
    add("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed (default: %(default)s)")
    return parser


def segment() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync segment",
        description="Temporal segmentation of videos into audio-visual events (supplementary §11, Fig. 6).",
    )
    add = parser.add_argument
    add("videos", nargs="+", type=Path, metavar="VIDEO", help="video files")
    add(
        "--ckpt",
        required=True,
        type=Path,
        help="avsync checkpoint (.ckpt / .safetensors) or the authors' one",
    )
    add("--out", required=True, type=Path, help="output folder: one PNG per video and segments.json")
    add(
        "--segments",
        type=count(1),
        default=None,
        help="segments per video (default: from --annotations when they give a clip's count, else chosen "
        "per clip by the silhouette score over 2..--max-segments; the choice is reported)",
    )
    add(
        "--max-segments",
        type=count(2),
        default=8,
        help="largest count the automatic choice considers (default: %(default)s)",
    )
    add(
        "--annotations",
        type=Path,
        help="ground truth: a folder of <video stem>.json per-frame labels (or a synth set), or a CSV "
        "`clip,segments` of segment counts",
    )
    add("--linkage", choices=("ward", "complete", "average", "single"), default="ward")
    add("--contiguous", action="store_true", help="only merge neighbouring frames (segments are runs)")
    add(
        "--tolerance",
        type=count(0),
        default=1,
        help="boundary match tolerance in frames (default: %(default)s)",
    )
    add(
        "--alignment", choices=("clip", "authors"), default="clip", help="frame-to-window alignment (SPEC §1)"
    )
    add(
        "--max-duration",
        type=number(0, low_open=True),
        default=60.0,
        help="longest accepted video in seconds (default: %(default)s)",
    )
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser


def prepare() -> argparse.ArgumentParser:
    defaults = argparse.Namespace(**EXTRACTION_DEFAULTS)
    parser = ToolParser(
        prog="avsync prepare",
        description="Decode videos (or convert a CAV-MAE datafile) into WebDataset shards for avsync "
        "(layout: docs/shards.md). Rerunning the same command resumes a killed run.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="a directory of videos (searched recursively), a file listing video paths, "
        "or a CAV-MAE datafile (.json)",
    )
    parser.add_argument("output", metavar="OUT", help="output directory")
    parser.add_argument(
        "--labels", help="CSV of clip_id,labels (labels: mids, names or indices, comma-separated)"
    )
    parser.add_argument("--classes", help="class index CSV: index,mid,display_name")
    parser.add_argument(
        "--workers",
        type=count(0),
        default=default_workers(),
        help="decoding processes, or the workers of --scheduler local (default: %(default)s)",
    )
    parser.add_argument(
        "--engine",
        choices=("pool", "dask"),
        default="pool",
        help="pool: a process pool on this machine; dask: tasks on a Dask cluster, same output "
        "(docs/prepare_cluster.md; default: %(default)s)",
    )
    parser.add_argument(
        "--scheduler",
        default="local",
        help="with --engine dask: 'local' (a cluster of --workers processes here), a scheduler address "
        "(tcp://host:8786) or scheduler file (default: %(default)s)",
    )
    parser.add_argument(
        "--partition-size",
        type=count(1),
        default=None,
        help=f"with --engine dask: clips per task (default {DEFAULT_PARTITION_SIZE})",
    )
    parser.add_argument(
        "--shard-max-bytes",
        type=parse_size,
        default=DEFAULT_SHARD_MAX_BYTES,
        help="shard size cap (default 512MiB)",
    )
    parser.add_argument(
        "--shard-max-clips", type=count(1), default=None, help="clips per shard cap (default: none)"
    )
    parser.add_argument(
        "--num-frames",
        type=count(1),
        default=defaults.num_frames,
        help="frames per clip (default: %(default)s)",
    )
    parser.add_argument(
        "--short-side",
        type=count(1),
        default=defaults.short_side,
        help="max short side of stored frames (default: %(default)s)",
    )
    parser.add_argument(
        "--jpeg-quality", type=count(1, 100), default=defaults.jpeg_quality, help="default: %(default)s"
    )
    parser.add_argument(
        "--mono",
        choices=MONO_MODES,
        default=defaults.mono,
        help="channel mixdown (default: %(default)s)",
    )
    parser.add_argument(
        "--min-duration",
        type=number(0, low_open=True),
        default=defaults.min_duration,
        help="seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--max-duration",
        type=number(0, low_open=True),
        default=defaults.max_duration,
        help="seconds (default: %(default)s)",
    )
    parser.require(_durations_in_order, "--min-duration must not exceed --max-duration")
    parser.add_argument(
        "--max-av-mismatch",
        type=number(0),
        default=defaults.max_av_mismatch,
        help="max audio/video duration difference, s (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-silent", action="store_true", help="keep clips without audio, flagged silent"
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the fixed clip order shuffle (default: 0)"
    )
    order.add_argument("--keep-order", action="store_true", help="keep the input order instead of shuffling")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete this directory's previous shards first"
    )
    parser.add_argument(
        "--content-hash",
        action="store_true",
        help="tell changed inputs by a SHA-256 of their bytes, not by size and modification time "
        "(reads every input once more)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _synth_defaults(name: str) -> str:
    return ", ".join(f"{kind} {SYNTH_KIND_DEFAULTS[kind][name]}" for kind in SYNTH_KINDS)


def synth() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync synth",
        description="Write a synthetic audio-visual set: H.264 + AAC mp4s, labels, events and masks.",
    )
    add = parser.add_argument
    add(
        "out",
        type=Path,
        metavar="OUT",
        help="output folder (a synthetic set already there is replaced; other files there are kept)",
    )
    add("--clips", type=int, required=True, help="number of clips")
    add("--classes", type=int, required=True, help="number of classes (1-32)")
    add("--seed", type=int, default=0, help="same seed and parameters, same set (default: %(default)s)")
    add(
        "--kind",
        choices=SYNTH_KINDS,
        default="tones",
        help="tones: the demo's set; speechlike: syllables over noise, moving objects, a distractor, "
        "busy frames (default: %(default)s)",
    )
    add(
        "--duration",
        type=number(0, low_open=True),
        default=10.0,
        help="clip length in seconds (default: %(default)s)",
    )
    add(
        "--fps",
        type=str,
        default=None,
        help="frame rate: 10, 12.5, 30000/1001... (default: " + _synth_defaults("fps") + ")",
    )
    add(
        "--size",
        type=str,
        default=None,
        help="frame size, even: SIDE or WxH (default: " + _synth_defaults("size") + ")",
    )
    add(
        "--sample-rate",
        type=int,
        default=None,
        help="audio rate in Hz, an AAC rate (default: " + _synth_defaults("sample_rate") + ")",
    )
    add(
        "--channels",
        type=int,
        choices=(1, 2),
        default=None,
        help="audio channels (default: " + _synth_defaults("channels") + ")",
    )
    add(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of clips in splits/test.txt (default: %(default)s)",
    )
    add(
        "--events",
        type=int,
        nargs=2,
        default=[2, 4],
        metavar=("MIN", "MAX"),
        help="events per clip (default: 2 4)",
    )
    add(
        "--min-event",
        type=number(0, low_open=True),
        default=1.5,
        help="shortest event in seconds (default: %(default)s)",
    )
    add("--workers", type=count(0), default=None, help="processes (default: every CPU this process may use)")
    add("--force", action="store_true", help="regenerate even if OUT already holds this set")
    return parser


def embed() -> argparse.ArgumentParser:
    defaults = argparse.Namespace(**EXTRACTION_DEFAULTS)
    parser = ToolParser(
        prog="avsync embed",
        description="Per-time-step audio and video embeddings of video files (layouts: docs/embedding.md). "
        "Videos that cannot be read are reported and skipped.",
    )
    add = parser.add_argument
    add("videos", nargs="*", metavar="VIDEO", help="video files, or directories searched recursively")
    add("--ckpt", required=True, help="Lightning checkpoint, avsync safetensors export or authors' file")
    add("--out", required=True, type=Path, help="output file (.npz, or .parquet); with --shards a directory")
    add(
        "--shards",
        help="embed prepared shards (a directory with manifest.json, a glob or brace pattern) instead of "
        "videos, as a Trainer.predict on --devices x --num-nodes; a rerun skips clips already written",
    )
    add("--devices", type=count(1), default=1, help="with --shards: devices per node (default: %(default)s)")
    add("--num-nodes", type=count(1), default=1, help="with --shards: nodes (default: %(default)s)")
    add("--clips-per-part", type=count(1), default=4096, help="with --shards: clips per part file")
    add(
        "--format",
        choices=EMBED_OUTPUT_FORMATS,
        help="output format (default: from the --out suffix, else npz)",
    )
    add("--patches", action="store_true", help="also write the patch tokens (large: T x N x D per clip)")
    add("--batch-size", type=count(1), default=8, help="clips per forward pass (default: %(default)s)")
    add(
        "--workers",
        type=count(0),
        default=default_workers(),
        help="decoding processes (default: %(default)s)",
    )
    add("--device", default="auto", help="cuda, cuda:1, cpu, or auto (default: %(default)s)")
    add("--precision", choices=EMBED_PRECISIONS, help="default: bf16 autocast on a GPU, fp32 on the CPU")
    add(
        "--alignment",
        choices=("clip", "authors"),
        help="frame-to-window alignment (default: clip; authors for 1024-frame models, i.e. CAV-MAE)",
    )
    add("--authors-kwargs", type=json.loads, default={}, help=AUTHORS_KWARGS_HELP)
    add(
        "--num-frames",
        type=count(1),
        default=defaults.num_frames,
        help="frame/window pairs per clip (default: %(default)s)",
    )
    seconds = number(0, low_open=True)
    add("--min-duration", type=seconds, default=defaults.min_duration, help="seconds (default: %(default)s)")
    add("--max-duration", type=seconds, default=defaults.max_duration, help="seconds (default: %(default)s)")
    parser.require(_durations_in_order, "--min-duration must not exceed --max-duration")
    add(
        "--allow-silent",
        action="store_true",
        help="embed videos without audio (the audio is digital silence)",
    )
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def export() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync export",
        description="Write a checkpoint's backbone as safetensors: its weights, and its config as JSON in "
        "the file's metadata (`avsync_backbone_config`). avsync.load / load_backbone read it back exactly.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="Lightning checkpoint, safetensors export or authors' file (with --random-init: a config)",
    )
    parser.add_argument("out", metavar="OUT.safetensors", type=Path)
    parser.add_argument(
        "--json", action="store_true", help="also write the config and provenance to OUT.json"
    )
    parser.add_argument("--authors-kwargs", type=json.loads, default={}, help=AUTHORS_KWARGS_HELP)
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="CKPT is a pretraining config (YAML file or recipe name): write its backbone untrained, the "
        "baseline any evaluation can be compared with",
    )
    parser.add_argument("--seed", type=int, default=0, help="with --random-init: the initialization seed")
    return parser


def config() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync config",
        description="Print a shipped training recipe (redirect it to a file to edit it), or list them.",
    )
    parser.add_argument("name", nargs="?", help="recipe name, e.g. pretrain/tiny_cpu (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipe names and exit")
    return parser


#: `avsync.search.compressed.CompressedSettings`'s defaults and `avsync.search.index.KINDS`, spelled out
#: so that building the parser imports neither FAISS nor torch (a test keeps them equal).
INDEX_KINDS = ("compressed", "exact")
INDEX_DEFAULTS = dict(pca_dim=1024, base_dim=512, train_clips=8192, candidates=2000)


def index() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync index",
        description="Build an index of embedded clips and search it (FAISS; docs/search.md): an audio query "
        "searches the video tokens, a video query the audio tokens, by diagonal-mean similarity.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="{build,search}")
    build = actions.add_parser(
        "build",
        help="index an `avsync embed` output",
        description="Index an `avsync embed` output (an --shards directory or an npz file; or any npz with "
        "`audio`/`video` (N, T, D) and `keys` or `ids`) into a directory.",
    )
    add = build.add_argument
    add("source", metavar="EMBEDDINGS", type=Path, help="`avsync embed` output: --shards directory or .npz")
    add("--out", required=True, type=Path, help="index directory to write")
    add(
        "--kind",
        choices=INDEX_KINDS,
        default="compressed",
        help="compressed: PCA + 4-bit scan + 8-bit re-scoring, about 1.1 KB per clip and modality; exact: "
        "every vector in float32 (T x D x 4 bytes per clip and modality) (default: %(default)s)",
    )
    add("--modalities", nargs="+", choices=("audio", "video"), help="gallery modalities (default: all)")
    add(
        "--pca-dim",
        type=count(1),
        default=INDEX_DEFAULTS["pca_dim"],
        help="compressed: PCA dimensions (default: %(default)s)",
    )
    add(
        "--base-dim",
        type=count(1),
        default=INDEX_DEFAULTS["base_dim"],
        help="compressed: PCA dimensions of the 4-bit scan (default: %(default)s)",
    )
    add(
        "--train-clips",
        type=count(1),
        default=INDEX_DEFAULTS["train_clips"],
        help="compressed: clips the PCA and quantizers learn from (default: %(default)s)",
    )
    add(
        "--candidates",
        type=count(1),
        default=INDEX_DEFAULTS["candidates"],
        help="compressed: default scan candidates per query, re-scored in 8 bits (default: %(default)s)",
    )
    add("--chunk-clips", type=count(1), default=8192, help="clips read at a time (default: %(default)s)")
    add("--overwrite", action="store_true", help="replace an index already in --out")
    add("--quiet", action="store_true", help="no progress lines")
    search = actions.add_parser(
        "search",
        help="the best matches of a clip id, audio file or video file",
        description="The top-k gallery clips for one query: a clip of the index, an audio file or a video "
        "file (files are embedded with the checkpoint the gallery was embedded with, or --ckpt).",
    )
    add = search.add_argument
    add("index", metavar="INDEX", type=Path, help="index directory (`avsync index build --out`)")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--clip", metavar="ID", help="a clip id of the index")
    query.add_argument("--audio", metavar="FILE", type=Path, help="a sound file (any container with audio)")
    query.add_argument("--video", metavar="FILE", type=Path, help="a video file")
    add(
        "--modality",
        choices=("audio", "video"),
        help="which tokens of the query to search with: audio searches the video gallery, video the audio "
        "gallery (default: audio for --audio, video for --video and --clip)",
    )
    add("--top-k", type=count(1), default=10, help="results (default: %(default)s)")
    add("--candidates", type=count(1), help="compressed: scan candidates per query (default: the index's)")
    add(
        "--rerank",
        type=count(0),
        default=0,
        help="compressed: re-score the best N exactly from the embeddings the index was built from, so that "
        "the order and scores are the exact diagonal mean (default: 0, off)",
    )
    add("--ckpt", help="model for file queries (default: the checkpoint recorded in the index)")
    add("--device", default="auto", help="for file queries: cuda, cpu or auto (default: %(default)s)")
    add("--json", action="store_true", help="print the results as JSON")
    return parser


def app() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avsync app",
        description="A web page (Gradio, `pip install 'avsync[app]'`) that shows where the sound is in a "
        "clip frame by frame, its audio-visual events, and the clips of an index that sound alike.",
    )
    add = parser.add_argument
    add("--ckpt", required=True, help="avsync checkpoint (.ckpt / .safetensors) or the authors' one")
    add("--index", help="an `avsync index build` directory for the search tab (made with the same model)")
    add("--videos", help="folder holding the index's clips as ID.mp4 (or .mkv, .webm ...) for previews")
    add("--examples", help="example clips offered in the page: a folder of videos or a list file")
    add("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)")
    add("--port", type=count(1, 65535), default=7860, help="port (default: %(default)s)")
    add("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    add(
        "--max-seconds",
        type=number(2.0, 3600.0),
        default=20.0,
        help="longer clips are cut to their first this many seconds (default: %(default)s)",
    )
    add(
        "--max-upload-mib",
        type=count(1, 100_000),
        default=200,
        help="largest upload in MiB (default: %(default)s)",
    )
    return parser
