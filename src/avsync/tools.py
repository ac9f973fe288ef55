"""The options of the `avsync` tools: one dataclass each, the only place an option is declared.

A tool's dataclass names its flags (fields), their types and checks (annotations), defaults and help (the
`Args:` of its docstring); `avsync.cli` builds the command line from it and passes the filled dataclass
to the function that runs the tool (`RUN`), which reads its fields. Nothing here imports torch, so that
`avsync TOOL --help` and usage errors come back at once.

Fields are `--options` named after the field (`top_k` -> `--top-k`) unless `option()` says otherwise:
`positional`, another `flag`, a `metavar`, `nargs`, or a mutually exclusive `group`. Annotations map to
argparse's conventions, which the documented commands use: `bool` is a switch, `list[X]` takes one or
more values, `Literal` offers choices, `Annotated[T, parse]` checks the value with `parse` (a usage error
naming the flag, exit 2, before any work), a field without default is a required option. (jsonargparse,
which builds the `avsync fit` command line from signatures, writes these as `--top_k`, `--flag true` and
JSON lists, with multi-line errors: every documented command would change.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from avsync.config_checks import describe_count, describe_range, in_range, is_count


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
    """A value check: an integer from `minimum` to `maximum` (None: unbounded)."""

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
    """A value check: a finite number between the bounds (each closed unless `*_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not in_range(value, low, high, low_open, high_open):
            raise argparse.ArgumentTypeError(
                f"must be {describe_range(low, high, low_open, high_open)}, got {text}"
            )
        return value

    return parse


Positive = Annotated[int, count(1)]
NonNegative = Annotated[int, count(0)]
Seconds = Annotated[float, number(0, low_open=True)]  # a finite duration > 0
JSON = Annotated[dict, json.loads]


def option(
    default: Any = MISSING,
    *,
    positional: bool = False,
    flag: str | None = None,
    metavar: str | tuple[str, ...] | None = None,
    nargs: str | int | None = None,
    group: str | None = None,
) -> Any:
    """A field with how it appears on the command line (see the module's docstring)."""
    meta = dict(positional=positional, flag=flag, metavar=metavar, nargs=nargs, group=group)
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


#: `avsync.evaluation.similarity.STRATEGIES`, `avsync.evaluation.retrieval.DIRECTIONS`,
#: `avsync.data.audio.MonoMode`, `avsync.api.model.PRECISIONS`, `avsync.api.outputs.OUTPUT_FORMATS`,
#: `avsync.synth.config.KINDS`, `avsync.search.index.KINDS`: spelled out here so that the command line
#: imports no torch (tests/workflow/test_first_hour.py keeps them equal).
Strategy = Literal["diagonal_mean", "diagonal_max", "block_mean", "block_max"]
Direction = Literal["video_to_audio", "audio_to_video"]
MonoMode = Literal["mean", "first"]
EmbedPrecision = Literal["fp32", "bf16"]
EmbedFormat = Literal["npz", "parquet"]
SynthKind = Literal["tones", "speechlike"]
IndexKind = Literal["compressed", "exact"]
Alignment = Literal["clip", "authors"]
Modality = Literal["audio", "video"]

#: `avsync prepare`'s default shard size cap (bytes) and clips per task of `--engine dask`.
DEFAULT_SHARD_MAX_BYTES = 512 * 2**20
DEFAULT_PARTITION_SIZE = 256


@dataclass(kw_only=True)
class Tool:
    """Base of the tools' options: `RUN` names the function that runs the tool (`module:function`)."""

    RUN: ClassVar[str]
    #: mutually exclusive groups of which one option must be given
    REQUIRED_GROUPS: ClassVar[tuple[str, ...]] = ()
    #: arguments the tool does not know are passed on in the field of this name (the demo's fit options)
    REST: ClassVar[str | None] = None

    def problem(self) -> str | None:
        """A relation between options that does not hold, as a usage error (None: all hold)."""
        return None


def matching(tool: Tool, target: Callable, /, **given: Any) -> dict[str, Any]:
    """The fields of `tool` named like parameters of `target` (a function or class), then `given`: the
    arguments of `target(**matching(...))`, without copying the options one by one."""
    import inspect

    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = {name for name, p in inspect.signature(target).parameters.items() if p.kind in named}
    return {f.name: getattr(tool, f.name) for f in fields(tool) if f.name in parameters} | given


def _durations_in_order(options: Any) -> str | None:
    if options.min_duration > options.max_duration:
        return "--min-duration must not exceed --max-duration"
    return None


@dataclass(kw_only=True)
class Prepare(Tool):
    """Decode videos (or convert a CAV-MAE datafile) into WebDataset shards for avsync (layout:
    docs/shards.md). Rerunning the same command resumes a killed run.

    Args:
        inputs: a directory of videos (searched recursively), a file listing video paths, or a CAV-MAE
            datafile (.json)
        output: output directory
        labels: CSV of clip_id,labels (labels: mids, names or indices, comma-separated)
        classes: class index CSV: index,mid,display_name
        workers: decoding processes, or the workers of --scheduler local
        engine: pool: a process pool on this machine; dask: tasks on a Dask cluster, same output
            (docs/prepare_cluster.md)
        scheduler: with --engine dask: 'local' (a cluster of --workers processes here), a scheduler
            address (tcp://host:8786) or scheduler file
        partition_size: with --engine dask: clips per task (default 256)
        shard_max_bytes: shard size cap (default 512MiB)
        shard_max_clips: clips per shard cap (default: none)
        num_frames: frames per clip
        short_side: max short side of stored frames
        jpeg_quality: JPEG quality of the stored frames
        mono: channel mixdown
        min_duration: seconds
        max_duration: seconds
        max_av_mismatch: max audio/video duration difference, s
        allow_silent: keep clips without audio, flagged silent
        shuffle_seed: seed of the fixed clip order shuffle
        keep_order: keep the input order instead of shuffling
        overwrite: delete this directory's previous shards first
        content_hash: tell changed inputs by a SHA-256 of their bytes, not by size and modification time
            (reads every input once more)
        no_progress: no progress bar
    """

    RUN = "avsync.data.prepare:run_prepare"

    inputs: list[str] = option(positional=True, metavar="INPUT")
    output: str = option(positional=True, metavar="OUT")
    labels: str | None = None
    classes: str | None = None
    workers: NonNegative = field(default_factory=default_workers)
    engine: Literal["pool", "dask"] = "pool"
    scheduler: str = "local"
    partition_size: Positive | None = None
    shard_max_bytes: Annotated[int, parse_size] = DEFAULT_SHARD_MAX_BYTES
    shard_max_clips: Positive | None = None
    # the defaults of `avsync.data.clip.ExtractionOptions` (a test keeps them equal)
    num_frames: Positive = 16
    short_side: Positive = 224
    jpeg_quality: Annotated[int, count(1, 100)] = 90
    mono: MonoMode = "mean"
    min_duration: Seconds = 2.0
    max_duration: Seconds = 60.0
    max_av_mismatch: Annotated[float, number(0)] = 1.0
    allow_silent: bool = False
    shuffle_seed: int = option(0, group="order")
    keep_order: bool = option(False, group="order")
    overwrite: bool = False
    content_hash: bool = False
    no_progress: bool = False

    problem = _durations_in_order


@dataclass(kw_only=True)
class Synth(Tool):
    """Write a synthetic audio-visual set: H.264 + AAC mp4s, labels, events and masks.

    Args:
        out: output folder (a synthetic set already there is replaced; other files there are kept)
        clips: number of clips
        classes: number of classes (1-32)
        seed: same seed and parameters, same set
        kind: tones: the demo's set; speechlike: syllables over noise, moving objects, a distractor,
            busy frames
        duration: clip length in seconds
        fps: frame rate: 10, 12.5, 30000/1001... (default: tones 10, speechlike 8)
        size: frame size, even: SIDE or WxH (default: tones 128, speechlike 320x240)
        sample_rate: audio rate in Hz, an AAC rate (default: tones 16000, speechlike 22050)
        channels: audio channels (default: tones 1, speechlike 2)
        holdout: fraction of clips in splits/test.txt
        events: events per clip
        min_event: shortest event in seconds
        workers: processes (default: every CPU this process may use)
        force: regenerate even if OUT already holds this set
    """

    RUN = "avsync.synth.generate:run_synth"

    out: Path = option(positional=True, metavar="OUT")
    clips: int = option()
    classes: int = option()
    seed: int = 0
    kind: SynthKind = "tones"
    duration: Seconds = 10.0
    fps: str | None = None
    size: str | None = None
    sample_rate: int | None = None
    channels: Literal[1, 2] | None = None
    holdout: float = 0.2
    events: tuple[int, int] = option((2, 4), metavar=("MIN", "MAX"))
    min_event: Seconds = 1.5
    workers: NonNegative | None = None
    force: bool = False


@dataclass(kw_only=True)
class Retrieve(Tool):
    """`avsync retrieve --ckpt PATH --shards DIR`: retrieval over prepared shards, printed and saved; the
    short form of `avsync test --config configs/retrieval/...`.

    Args:
        ckpt: PretrainModule checkpoint, safetensors export or authors' file
        shards: prepared shard directory (or glob / brace pattern)
        out: directory for retrieval.json / retrieval.csv
        strategies: token similarity strategies
        directions: retrieval directions
        top_k: also save each query's top-k targets
        batch_size: clips per batch
        workers: DataLoader worker processes
        alignment: frame/window alignment (default: 'authors' for 1024-frame models such as CAV-MAE,
            else 'clip')
        accelerator: Lightning accelerator: auto, cpu, gpu
        devices: Lightning devices
        precision: e.g. bf16-mixed (default: 32 on CPU, bf16-mixed on GPU)
        authors_kwargs: JSON, e.g. '{"num_heads": 12}' for authors' files
    """

    RUN = "avsync.cli:run_retrieve"

    ckpt: str = option()
    shards: str = option()
    out: str | None = None
    strategies: list[Strategy] = option(list(typing.get_args(Strategy)))
    directions: list[Direction] = option(list(typing.get_args(Direction)))
    top_k: NonNegative = 0
    batch_size: Positive = 8
    workers: NonNegative = 2
    alignment: Alignment | None = None
    accelerator: str = "auto"
    devices: str = "auto"
    precision: str | None = None
    authors_kwargs: JSON = option({})


@dataclass(kw_only=True)
class Localize(Tool):
    """Sound-prompted segmentation: heat maps of where a sound comes from, scored as in DenseAV (per-class
    pixel AP and best IoU over 20 thresholds; mAP and mIoU). The short form of `avsync test --config
    configs/localization/...`.

    Args:
        ckpt: avsync checkpoint (.ckpt / .safetensors) or the authors' one
        manifest: CSV: mask,class and image,audio[,audio_start] or video,frame_time
            (docs/localization.md)
        synth: a synthetic set (avsync synth): every frame with its window
        split: synthetic split: train, test or all
        out: output folder: metrics.json and overlays/
        classes: known class names (text, one per line; or a CSV); others are refused
        audio_start: seconds into each prompt sound where its window starts (default: centred)
        mismatched_sounds: control: prompt each source with the next source's sounds (maps that follow
            the sound score lower; maps that ignore it score the same)
        patch_readout: visual features the sound is compared with (the paper's: patch_tokens; the others
            read the patches out the way the global token is made: docs/localization.md)
        prompt_surgery: subtract the mean of all prompts from each (CLIP Surgery): removes what every
            sound lights up
        normalization: min-max over all maps (DenseAV's protocol) or per map
        overlays: overlay pictures to write
        batch_size: sources per batch (a synthetic clip is 16 prompts)
        num_workers: DataLoader worker processes
        alignment: frame-to-window alignment (SPEC §1)
        accelerator: Lightning accelerator: auto, cpu, gpu
        precision: Lightning precision, e.g. bf16-mixed
    """

    RUN = "avsync.tasks.localization:run_localize"
    REQUIRED_GROUPS = ("source",)

    ckpt: Path = option()
    manifest: str | None = option(None, group="source")
    synth: str | None = option(None, group="source")
    split: str = "test"
    out: Path = option()
    classes: str | None = None
    audio_start: Annotated[float, number(0)] | None = None
    mismatched_sounds: bool = False
    patch_readout: Literal["patch_tokens", "global_readout", "self_attention"] = "patch_tokens"
    prompt_surgery: bool = False
    normalization: Literal["dataset", "per_image"] = "dataset"
    overlays: NonNegative = 16
    batch_size: Positive = 4
    num_workers: NonNegative = option(2, flag="--workers")
    alignment: Alignment = "clip"
    accelerator: str = "auto"
    precision: str = "32-true"


@dataclass(kw_only=True)
class Segment(Tool):
    """Temporal segmentation of videos into audio-visual events (supplementary §11, Fig. 6).

    Args:
        videos: video files
        ckpt: avsync checkpoint (.ckpt / .safetensors) or the authors' one
        out: output folder: one PNG per video and segments.json
        segments: segments per video (default: from --annotations when they give a clip's count, else
            chosen per clip by the silhouette score over 2..--max-segments; the choice is reported)
        max_segments: largest count the automatic choice considers
        annotations: ground truth: a folder of <video stem>.json per-frame labels (or a synth set), or a
            CSV `clip,segments` of segment counts
        linkage: agglomerative clustering linkage
        contiguous: only merge neighbouring frames (segments are runs)
        tolerance: boundary match tolerance in frames
        alignment: frame-to-window alignment (SPEC §1)
        max_duration: longest accepted video in seconds
        device: torch device (default: cuda when available, else cpu)
    """

    RUN = "avsync.tasks.segmentation:run_segment"

    videos: list[Path] = option(positional=True, metavar="VIDEO")
    ckpt: Path = option()
    out: Path = option()
    segments: Positive | None = None
    max_segments: Annotated[int, count(2)] = 8
    annotations: Path | None = None
    linkage: Literal["ward", "complete", "average", "single"] = "ward"
    contiguous: bool = False
    tolerance: NonNegative = 1
    alignment: Alignment = "clip"
    max_duration: Seconds = 60.0
    device: str | None = None


@dataclass(kw_only=True)
class Embed(Tool):
    """Per-time-step audio and video embeddings of video files (layouts: docs/embedding.md). Videos that
    cannot be read are reported and skipped.

    Args:
        videos: video files, or directories searched recursively
        ckpt: Lightning checkpoint, avsync safetensors export or authors' file
        out: output file (.npz, or .parquet); with --shards a directory
        shards: embed prepared shards (a directory with manifest.json, a glob or brace pattern) instead
            of videos, as a Trainer.predict on --devices x --num-nodes; a rerun skips clips already
            written
        devices: with --shards: devices per node
        num_nodes: with --shards: nodes
        clips_per_part: with --shards: clips per part file
        format: output format (default: from the --out suffix, else npz)
        patches: also write the patch tokens (large: T x N x D per clip)
        batch_size: clips per forward pass
        workers: decoding processes
        device: cuda, cuda:1, cpu, or auto
        precision: default: bf16 autocast on a GPU, fp32 on the CPU
        alignment: frame-to-window alignment (default: clip; authors for 1024-frame models, i.e.
            CAV-MAE)
        authors_kwargs: JSON of the authors' constructor arguments for their files, e.g.
            '{"num_heads": 12}'
        num_frames: frame/window pairs per clip
        min_duration: seconds
        max_duration: seconds
        allow_silent: embed videos without audio (the audio is digital silence)
        no_progress: no progress bar
    """

    RUN = "avsync.api.commands:run_embed"

    videos: list[str] = option([], positional=True, metavar="VIDEO", nargs="*")
    ckpt: str = option()
    out: Path = option()
    shards: str | None = None
    devices: Positive = 1
    num_nodes: Positive = 1
    clips_per_part: Positive = 4096
    format: EmbedFormat | None = None
    patches: bool = False
    batch_size: Positive = 8
    workers: NonNegative = field(default_factory=default_workers)
    device: str = "auto"
    precision: EmbedPrecision | None = None
    alignment: Alignment | None = None
    authors_kwargs: JSON = option({})
    num_frames: Positive = 16
    min_duration: Seconds = 2.0
    max_duration: Seconds = 60.0
    allow_silent: bool = False
    no_progress: bool = False

    problem = _durations_in_order


@dataclass(kw_only=True)
class Export(Tool):
    """Write a checkpoint's backbone as safetensors: its weights, and its config as JSON in the file's
    metadata (`avsync_backbone_config`). avsync.load / load_backbone read it back exactly.

    Args:
        checkpoint: Lightning checkpoint, safetensors export or authors' file (with --random-init: a
            config)
        out: the safetensors file to write
        json: also write the config and provenance to OUT.json
        authors_kwargs: JSON of the authors' constructor arguments for their files, e.g.
            '{"num_heads": 12}'
        random_init: CKPT is a pretraining config (YAML file or recipe name): write its backbone
            untrained, the baseline any evaluation can be compared with
        seed: with --random-init: the initialization seed
    """

    RUN = "avsync.api.commands:run_export"

    checkpoint: str = option(positional=True, metavar="CKPT")
    out: Path = option(positional=True, metavar="OUT.safetensors")
    json: bool = False
    authors_kwargs: JSON = option({})
    random_init: bool = False
    seed: int = 0


@dataclass(kw_only=True)
class IndexBuild(Tool):
    """Index an `avsync embed` output (an --shards directory or an npz file; or any npz with
    `audio`/`video` (N, T, D) and `keys` or `ids`) into a directory.

    Args:
        source: `avsync embed` output: --shards directory or .npz
        out: index directory to write
        kind: compressed: PCA + 4-bit scan + 8-bit re-scoring, about 1.1 KB per clip and modality;
            exact: every vector in float32 (T x D x 4 bytes per clip and modality)
        modalities: gallery modalities (default: all)
        pca_dim: compressed: PCA dimensions
        base_dim: compressed: PCA dimensions of the 4-bit scan
        train_clips: compressed: clips the PCA and quantizers learn from
        candidates: compressed: default scan candidates per query, re-scored in 8 bits
        chunk_clips: clips read at a time
        overwrite: replace an index already in --out
        quiet: no progress lines
    """

    RUN = "avsync.search.commands:run_build"

    source: Path = option(positional=True, metavar="EMBEDDINGS")
    out: Path = option()
    kind: IndexKind = "compressed"
    modalities: list[Modality] | None = None
    # the defaults of `avsync.search.compressed.CompressedSettings` (a test keeps them equal)
    pca_dim: Positive = 1024
    base_dim: Positive = 512
    train_clips: Positive = 8192
    candidates: Positive = 2000
    chunk_clips: Positive = 8192
    overwrite: bool = False
    quiet: bool = False


@dataclass(kw_only=True)
class IndexSearch(Tool):
    """The top-k gallery clips for one query: a clip of the index, an audio file or a video file (files
    are embedded with the checkpoint the gallery was embedded with, or --ckpt).

    Args:
        index: index directory (`avsync index build --out`)
        clip: a clip id of the index
        audio: a sound file (any container with audio)
        video: a video file
        modality: which tokens of the query to search with: audio searches the video gallery, video the
            audio gallery (default: audio for --audio, video for --video and --clip)
        top_k: results
        candidates: compressed: scan candidates per query (default: the index's)
        rerank: compressed: re-score the best N exactly from the embeddings the index was built from, so
            that the order and scores are the exact diagonal mean (0: off)
        ckpt: model for file queries (default: the checkpoint recorded in the index)
        device: for file queries: cuda, cpu or auto
        json: print the results as JSON
    """

    RUN = "avsync.search.commands:run_search"
    REQUIRED_GROUPS = ("query",)

    index: Path = option(positional=True, metavar="INDEX")
    clip: str | None = option(None, group="query", metavar="ID")
    audio: Path | None = option(None, group="query", metavar="FILE")
    video: Path | None = option(None, group="query", metavar="FILE")
    modality: Modality | None = None
    top_k: Positive = 10
    candidates: Positive | None = None
    rerank: NonNegative = 0
    ckpt: str | None = None
    device: str = "auto"
    json: bool = False


@dataclass(kw_only=True)
class Config(Tool):
    """Print a shipped training recipe (redirect it to a file to edit it), or list them.

    Args:
        name: recipe name, e.g. pretrain/tiny_cpu (see --list)
        list: list the recipe names and exit
    """

    RUN = "avsync.recipes:run_config"

    name: str | None = option(None, positional=True, nargs="?")
    list: bool = False


@dataclass(kw_only=True)
class App(Tool):
    """A web page (Gradio, `pip install 'avsync[app]'`) that shows where the sound is in a clip frame by
    frame, its audio-visual events, and the clips of an index that sound alike.

    Args:
        ckpt: avsync checkpoint (.ckpt / .safetensors) or the authors' one
        index: an `avsync index build` directory for the search tab (made with the same model)
        videos: folder holding the index's clips as ID.mp4 (or .mkv, .webm ...) for previews
        examples: example clips offered in the page: a folder of videos or a list file
        host: address to serve on (the default serves this machine only)
        port: port
        device: cpu, cuda or auto
        max_seconds: longer clips are cut to their first this many seconds
        max_upload_mib: largest upload in MiB
    """

    RUN = "avsync.app.ui:run_app"

    ckpt: str = option()
    index: str | None = None
    videos: str | None = None
    examples: str | None = None
    host: str = "127.0.0.1"
    port: Annotated[int, count(1, 65535)] = 7860
    device: str = "cpu"
    max_seconds: Annotated[float, number(2.0, 3600.0)] = 20.0
    max_upload_mib: Annotated[int, count(1, 100_000)] = 200


@dataclass(kw_only=True)
class Demo(Tool):
    """Synthesize, prepare, pretrain and evaluate the tiny model on CPU (`avsync.demo` tells the steps).
    Options it does not know are passed to the pretraining run (`avsync fit`).

    Args:
        workdir: data, runs and results
        config: pretraining config: a file or a recipe name
        clips: synthetic clips, 20% held out
        classes: synthetic classes
        epochs: pretraining epochs (default: the config's)
        mae_config: image-MAE stage config: a file or a recipe name
        mae_epochs: image-MAE stage epochs (default: the config's)
        kind: the synthetic set (`avsync synth --kind`); one --workdir per kind
        probe_epochs: linear probe epochs
        seed: random seed of every stage
        workers: processes for synthesis and preparation
    """

    RUN = "avsync.demo:demo"
    REST = "fit_args"

    workdir: Path = Path("shards/demo")
    config: str = "pretrain/tiny_cpu"
    clips: int = 320
    classes: int = 8
    epochs: int | None = None
    mae_config: str = "pretrain/tiny_cpu_mae"
    mae_epochs: int | None = None
    kind: SynthKind = "tones"
    probe_epochs: int = 20
    seed: int = 0
    workers: int = 2
    fit_args: list[str] = option([])  # `REST`: the command line after the known options


#: The tools: name -> (options, or an action's options by action name; one-line summary).
TOOLS: dict[str, tuple[type[Tool] | dict[str, type[Tool]], str]] = {
    "prepare": (Prepare, "raw videos or a CAV-MAE datafile -> WebDataset shards"),
    "synth": (Synth, "synthetic audio-visual clips with ground truth"),
    "retrieve": (Retrieve, "zero-shot audio-visual retrieval (R@1/5/10, median rank)"),
    "localize": (Localize, "sound-prompted segmentation heat maps and metrics"),
    "segment": (Segment, "temporal segmentation of one video into audio-visual events"),
    "embed": (Embed, "videos -> per-time-step embeddings (npz or parquet)"),
    "export": (Export, "a checkpoint -> backbone weights + config as safetensors"),
    "index": ({"build": IndexBuild, "search": IndexSearch}, "build / search a FAISS index of embedded clips"),
    "demo": (Demo, "synthesize, prepare, pretrain and evaluate the tiny model on CPU"),
    "config": (Config, "print a shipped recipe (`avsync config --list` names them)"),
    "app": (App, "a web page: where the sound is, what happens when, clips alike"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, plus the tool's relations between options (`Tool.problem`) as usage errors."""

    tool: type[Tool] | None = None

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if self.tool is not None:
            message = self.tool.problem(argparse.Namespace(**vars(parsed)))
            if message:
                self.error(message)
        return parsed, extras


def _described(tool: type[Tool]) -> tuple[str, dict[str, str]]:
    """The docstring's description and its `Args:` (field -> help)."""
    from docstring_parser import DocstringStyle, parse

    doc = parse(tool.__doc__ or "", style=DocstringStyle.GOOGLE)
    text = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    return " ".join(text.split()), {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def _argument(hint: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a field's annotation (see the module's docstring)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (hint,) = [a for a in arguments if a is not type(None)]
        return _argument(hint, default)
    if origin is Annotated:
        return {"type": hint.__metadata__[0]}
    if origin is Literal:
        return {"type": type(arguments[0]), "choices": arguments}
    if hint is bool:
        return {"action": "store_false" if default else "store_true"}
    if origin in (list, tuple):
        nargs = len(arguments) if origin is tuple and Ellipsis not in arguments else "+"
        return _argument(arguments[0], None) | {"nargs": nargs}
    return {"type": hint}


def add_options(parser: argparse.ArgumentParser, tool: type[Tool]) -> None:
    """Add `tool`'s fields to `parser` (see the module's docstring)."""
    description, helps = _described(tool)
    parser.description, parser.tool = description, tool
    hints = typing.get_type_hints(tool, include_extras=True)
    groups: dict[str, Any] = {}
    for item in fields(tool):
        meta = item.metadata
        if item.name == tool.REST:  # not an option: what follows the known ones
            continue
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        keywords = _argument(hints[item.name], default)
        if meta.get("nargs") is not None:
            keywords["nargs"] = meta["nargs"]
        if meta.get("metavar") is not None:
            keywords["metavar"] = meta["metavar"]
        help_text = helps.get(item.name, "")
        if not (
            default is None
            or isinstance(default, bool)
            or default in (MISSING, [], {})
            or "default" in help_text
        ):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text += f" (default: {shown})"
        keywords["help"] = help_text.replace("%", "%%")
        if meta.get("positional"):
            if default is not MISSING and "nargs" not in keywords:
                keywords["nargs"] = "?"
            if default is not MISSING:
                keywords["default"] = default
            parser.add_argument(item.name, **keywords)
            continue
        if default is MISSING:
            keywords["required"] = True
        else:
            keywords["default"] = default
        target = parser
        if meta.get("group"):
            name = meta["group"]
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group(required=name in tool.REQUIRED_GROUPS)
            target = groups[name]
        flag = meta.get("flag") or "--" + item.name.replace("_", "-")
        target.add_argument(flag, dest=item.name, **keywords)


def build_parser(name: str) -> argparse.ArgumentParser:
    """`avsync NAME`'s parser, built from the tool's options."""
    spec, summary = TOOLS[name]
    parser = _Parser(prog=f"avsync {name}")
    if isinstance(spec, dict):
        parser.description = summary
        actions = parser.add_subparsers(dest="action", required=True, metavar="{" + ",".join(spec) + "}")
        for action, tool in spec.items():
            add_options(actions.add_parser(action, help=_described(tool)[0].split(" (")[0]), tool)
    else:
        add_options(parser, spec)
    return parser


def parse(name: str, argv: list[str]) -> Tool:
    """`avsync NAME argv`'s options (a usage error exits 2, with argparse's message)."""
    spec, _ = TOOLS[name]
    parser = build_parser(name)
    tool = spec if not isinstance(spec, dict) else None
    if tool is not None and tool.REST:
        namespace, rest = parser.parse_known_args(argv)
        setattr(namespace, tool.REST, rest)
    else:
        namespace = parser.parse_args(argv)
    values = vars(namespace)
    if tool is None:
        tool = spec[values.pop("action")]
    return tool(**values)
