"""`avsync embed` (video files -> an embeddings file) and `avsync export` (a checkpoint -> safetensors):

- `avsync embed VIDEO_OR_DIR... --ckpt PATH --out FILE.npz [--patches] [--batch-size 8] [--device auto]`
- `avsync export CKPT OUT.safetensors [--json] [--authors-kwargs JSON]`
- `avsync export --random-init CONFIG OUT.safetensors [--seed 0]`: the untrained twin of a pretraining config
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from avsync.api.model import check_export_out, export, load
from avsync.api.outputs import (
    check_embeddings_out,
    embed_shards,
    format_of,
    require_pyarrow,
    write_embeddings,
)
from avsync.api.videos import Failure
from avsync.checkpoint_io import CheckpointError
from avsync.data.clip import ExtractionOptions
from avsync.data.sources import ClipSource, InputError, assign_keys, discover
from avsync.tool_parsers import embed as build_embed_parser
from avsync.tool_parsers import export as build_export_parser

log = logging.getLogger("avsync.api")


def video_paths(inputs: list[str]) -> tuple[list[str], list[Failure]]:
    """The videos named on a command line: files as given (each one tried, whatever its extension),
    directories searched recursively as `prepare` does. Only the same file named twice, or a byte-identical
    copy under the same clip id, is skipped and reported (the first is kept); files that merely share a
    clip id are all embedded, under distinct keys (`avsync.api.videos.unique_keys`)."""
    sources, failures = [], []
    for item in inputs:
        if Path(item).is_dir():
            found = discover([item])
            sources += found.sources
            failures += [Failure(d["path"], d["reason"]) for d in found.duplicates]
        else:
            sources.append(ClipSource(clip_id=Path(item).stem, path=item, origin=item))
    kept, dropped, _ = assign_keys(sources)
    failures += [Failure(d["path"], d["reason"]) for d in dropped]
    return [source.path for source in kept], failures


def embed_main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when at least one video was embedded, 1 when none was, 2 for a usage error."""
    args = build_embed_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="avsync embed: %(message)s")
    if args.shards is not None:
        return embed_shards_main(args)
    try:
        if not args.videos:
            raise InputError("give video files or directories, or --shards")
        output_format = format_of(args.out, args.format)
        if output_format == "parquet":
            require_pyarrow()  # before any work
        paths, failures = video_paths(args.videos)
        if not paths:
            raise InputError(f"no video files in {args.videos}")
        check_embeddings_out(args.out, [*args.videos, *paths, *(f.path for f in failures)])  # before work
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


def embed_shards_main(args: argparse.Namespace) -> int:
    """`avsync embed --shards`: exit status 0 when the output holds at least one clip, 1 when it holds
    none, 2 for a usage error."""
    problems = [name for name in ("videos", "patches", "format") if getattr(args, name)]
    device = str(args.device)
    accelerator, devices = device.split(":")[0], args.devices
    if ":" in device:
        accelerator, devices = "cuda", [int(device.split(":")[1])]
    try:
        if problems:
            raise InputError(f"--shards does not go with {', '.join(problems)} (float16 npz parts only)")
        manifest = embed_shards(
            args.shards,
            args.ckpt,
            args.out,
            batch_size=args.batch_size,
            num_workers=args.workers,
            accelerator=accelerator,
            devices=devices,
            num_nodes=args.num_nodes,
            precision=args.precision,
            alignment=args.alignment,
            num_frames=args.num_frames,
            clips_per_part=args.clips_per_part,
            progress=not args.no_progress and sys.stderr.isatty(),
            **args.authors_kwargs,
        )
    except (CheckpointError, InputError, ValueError, FileNotFoundError) as error:
        print(f"avsync embed: error: {error}", file=sys.stderr)
        return 2
    run = manifest["last_run"]
    log.info(
        "%d clips in %s (%d embedded now, %d already written, %d samples skipped as unreadable)",
        manifest["num_clips"],
        args.out,
        run["embedded"],
        run["already_written"],
        run["skipped_samples"],
    )
    return 0 if manifest["num_clips"] else 1


def random_init_backbone(config: str, seed: int = 0):
    """The backbone a pretraining config (`avsync fit --config`: a YAML file or a recipe name) trains,
    untrained: `torch.manual_seed(seed)` then `CAVMAESync(**its arguments)`, as the demo's baseline is
    made. The arguments come from `model.init_args.backbone.init_args` or `...backbone_config`."""
    import torch
    import yaml

    from avsync.model import CAVMAESync

    path = Path(config)
    if not path.exists():
        from avsync.recipes import find_recipe

        path = find_recipe(config)  # ValueError naming the recipes when there is none
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not a readable YAML config ({error})") from None
    model = recipe.get("model") if isinstance(recipe, dict) else None
    init = model.get("init_args", {}) if isinstance(model, dict) else None
    if not isinstance(init, dict):
        raise ValueError(f"{path}: no `model.init_args` section; give a pretraining config")
    backbone = init.get("backbone")
    arguments = backbone.get("init_args", {}) if isinstance(backbone, dict) else init.get("backbone_config")
    if not isinstance(arguments or {}, dict):
        raise ValueError(f"{path}: the backbone's arguments are not a mapping")
    torch.manual_seed(seed)
    try:
        return CAVMAESync(**(arguments or {})).eval()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: the backbone's arguments do not build a CAVMAESync: {error}") from None


def export_main(argv: list[str] | None = None) -> int:
    """`avsync export CKPT OUT.safetensors`: exit status 0 on success, 2 for an unusable input."""
    args = build_export_parser().parse_args(argv)
    try:
        check_export_out(args.out, args.checkpoint, args.json)  # before the checkpoint is read
        if args.random_init:
            from avsync.loading import save_backbone

            backbone = random_init_backbone(args.checkpoint, args.seed)
            source = f"random init of {args.checkpoint}, seed {args.seed}"
            path = save_backbone(backbone, args.out, source=source, json_sidecar=args.json)
        else:
            path = export(args.checkpoint, args.out, json_sidecar=args.json, **args.authors_kwargs)
    except (CheckpointError, ValueError) as error:
        print(f"avsync export: error: {error}", file=sys.stderr)
        return 2
    sidecar = f" and {path.with_suffix('.json')}" if args.json else ""
    print(f"wrote {path}{sidecar}", file=sys.stderr)
    return 0
