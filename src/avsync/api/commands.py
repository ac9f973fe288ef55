"""`avsync embed` (video files -> an embeddings file) and `avsync export` (a checkpoint -> safetensors):

- `avsync embed VIDEO_OR_DIR... --ckpt PATH --out FILE.npz [--patches] [--batch-size 8] [--device auto]`
- `avsync export CKPT OUT.safetensors [--json] [--authors-kwargs JSON]`
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from avsync.api.model import PRECISIONS, export, load
from avsync.api.outputs import OUTPUT_FORMATS, format_of, require_pyarrow, write_embeddings
from avsync.api.videos import Failure
from avsync.checkpoint_io import CheckpointError
from avsync.data.clip import ExtractionOptions
from avsync.data.prepare import default_workers
from avsync.data.sources import InputError, discover

log = logging.getLogger("avsync.api")
AUTHORS_KWARGS_HELP = "JSON of the authors' constructor arguments for their files, e.g. '{\"num_heads\": 12}'"


def video_paths(inputs: list[str]) -> tuple[list[str], list[Failure]]:
    """The videos named on a command line: files as given (each one tried, whatever its extension),
    directories searched recursively as `prepare` does. A clip id (file name without extension) seen
    before is skipped and reported, so that the output's keys stay unique; the first is kept."""
    paths, failures, first_path = [], [], {}
    for item in inputs:
        candidates = [item]
        if Path(item).is_dir():
            found = discover([item])
            candidates = [source.path for source in found.sources]
            failures += [Failure(d["path"], d["reason"]) for d in found.duplicates]
        for path in candidates:
            key = Path(path).stem
            if key in first_path:
                failures.append(
                    Failure(path, f"duplicate clip id {key!r} of {first_path[key]}; the first is kept")
                )
                continue
            first_path[key] = path
            paths.append(path)
    return paths, failures


def build_embed_parser() -> argparse.ArgumentParser:
    defaults = ExtractionOptions()
    parser = argparse.ArgumentParser(
        prog="avsync embed",
        description="Per-time-step audio and video embeddings of video files (layouts: docs/embedding.md). "
        "Videos that cannot be read are reported and skipped.",
    )
    add = parser.add_argument
    add("videos", nargs="+", metavar="VIDEO", help="video files, or directories searched recursively")
    add("--ckpt", required=True, help="Lightning checkpoint, avsync safetensors export or authors' file")
    add("--out", required=True, type=Path, help="output file (.npz, or .parquet)")
    add("--format", choices=OUTPUT_FORMATS, help="output format (default: from the --out suffix, else npz)")
    add("--patches", action="store_true", help="also write the patch tokens (large: T x N x D per clip)")
    add("--batch-size", type=int, default=8, help="clips per forward pass (default: %(default)s)")
    add("--workers", type=int, default=default_workers(), help="decoding processes (default: %(default)s)")
    add("--device", default="auto", help="cuda, cuda:1, cpu, or auto (default: %(default)s)")
    add("--precision", choices=PRECISIONS, help="default: bf16 autocast on a GPU, fp32 on the CPU")
    add(
        "--alignment",
        choices=("clip", "authors"),
        help="frame-to-window alignment (default: clip; authors for 1024-frame models, i.e. CAV-MAE)",
    )
    add("--authors-kwargs", type=json.loads, default={}, help=AUTHORS_KWARGS_HELP)
    add(
        "--num-frames",
        type=int,
        default=defaults.num_frames,
        help="frame/window pairs per clip (default: %(default)s)",
    )
    add("--min-duration", type=float, default=defaults.min_duration, help="seconds (default: %(default)s)")
    add("--max-duration", type=float, default=defaults.max_duration, help="seconds (default: %(default)s)")
    add(
        "--allow-silent",
        action="store_true",
        help="embed videos without audio (the audio is digital silence)",
    )
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def embed_main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when at least one video was embedded, 1 when none was, 2 for a usage error."""
    args = build_embed_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="avsync embed: %(message)s")
    try:
        output_format = format_of(args.out, args.format)
        if output_format == "parquet":
            require_pyarrow()  # before any work
        paths, failures = video_paths(args.videos)
        if not paths:
            raise InputError(f"no video files in {args.videos}")
        extraction = replace(
            ExtractionOptions(),
            num_frames=args.num_frames,
            min_duration=args.min_duration,
            max_duration=args.max_duration,
            allow_silent=args.allow_silent,
        )
        model = load(
            args.ckpt,
            args.device,
            args.precision,
            alignment=args.alignment,
            extraction=extraction,
            **args.authors_kwargs,
        )
    except (CheckpointError, InputError, ValueError, ModuleNotFoundError) as error:
        print(f"avsync embed: error: {error}", file=sys.stderr)
        return 2
    for failure in failures:
        log.warning("skipped %s: %s", failure.path, failure.reason)
    run = model.embed_videos(
        paths,
        patches=args.patches,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    run.failures = failures + run.failures
    if not run.embeddings:
        log.error("none of the %d video(s) could be embedded; nothing written", len(paths))
        return 1
    write_embeddings(run, args.out, model.describe(), patches=args.patches, output_format=output_format)
    log.info(
        "%d video(s) embedded into %s (%s); %d skipped (listed under `failures` in its metadata)",
        len(run.embeddings),
        args.out,
        output_format,
        len(run.failures),
    )
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """`avsync export CKPT OUT.safetensors`: exit status 0 on success, 2 for an unusable input."""
    parser = argparse.ArgumentParser(
        prog="avsync export",
        description="Write a checkpoint's backbone as safetensors: its weights, and its config as JSON in "
        "the file's metadata (`avsync_backbone_config`). avsync.load / load_backbone read it back exactly.",
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="Lightning checkpoint, safetensors export or authors' file"
    )
    parser.add_argument("out", metavar="OUT.safetensors", type=Path)
    parser.add_argument(
        "--json", action="store_true", help="also write the config and provenance to OUT.json"
    )
    parser.add_argument("--authors-kwargs", type=json.loads, default={}, help=AUTHORS_KWARGS_HELP)
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, json_sidecar=args.json, **args.authors_kwargs)
    except (CheckpointError, ValueError) as error:
        print(f"avsync export: error: {error}", file=sys.stderr)
        return 2
    sidecar = f" and {path.with_suffix('.json')}" if args.json else ""
    print(f"wrote {path}{sidecar}", file=sys.stderr)
    return 0
