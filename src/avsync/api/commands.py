"""`avsync embed` (video files -> an embeddings file) and `avsync export` (a checkpoint -> safetensors):

- `avsync embed VIDEO_OR_DIR... --ckpt PATH --out FILE.npz [--patches] [--batch-size 8] [--device auto]`
- `avsync export CKPT OUT.safetensors [--json] [--authors-kwargs JSON]`
- `avsync export --random-init CONFIG OUT.safetensors [--seed 0]`: the untrained twin of a pretraining config
"""

from __future__ import annotations

import logging
import sys
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
from avsync.checkpoints import CheckpointError
from avsync.data.clip import ExtractionOptions
from avsync.data.sources import ClipSource, InputError, assign_keys, discover
from avsync.tools import Embed, Export, matching

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


def run_embed(options: Embed) -> int:
    """`avsync embed`: exit status 0 when at least one video was embedded, 1 when none was, 2 for a
    usage error."""
    logging.basicConfig(level=logging.INFO, format="avsync embed: %(message)s")
    if options.shards is not None:
        return embed_shards_command(options)
    progress = not options.no_progress and sys.stderr.isatty()
    try:
        if not options.videos:
            raise InputError("give video files or directories, or --shards")
        output_format = format_of(options.out, options.format)
        if output_format == "parquet":
            require_pyarrow()  # before any work
        paths, failures = video_paths(options.videos)
        if not paths:
            raise InputError(f"no video files in {options.videos}")
        check_embeddings_out(
            options.out, [*options.videos, *paths, *(f.path for f in failures)]
        )  # before work
        extraction = ExtractionOptions(**matching(options, ExtractionOptions))
        model = load(
            options.ckpt,
            options.device,
            options.precision,
            alignment=options.alignment,
            extraction=extraction,
            **options.authors_kwargs,
        )
    except (CheckpointError, InputError, ValueError, ModuleNotFoundError) as error:
        print(f"avsync embed: error: {error}", file=sys.stderr)
        return 2
    for failure in failures:
        log.warning("skipped %s: %s", failure.path, failure.reason)
    run = model.embed_videos(
        paths,
        patches=options.patches,
        batch_size=options.batch_size,
        num_workers=options.workers,
        progress=progress,
    )
    run.failures = failures + run.failures
    if not run.embeddings:
        log.error("none of the %d video(s) could be embedded; nothing written", len(paths))
        return 1
    write_embeddings(run, options.out, model.describe(), patches=options.patches, output_format=output_format)
    log.info(
        "%d video(s) embedded into %s (%s); %d skipped (listed under `failures` in its metadata)",
        len(run.embeddings),
        options.out,
        output_format,
        len(run.failures),
    )
    return 0


def embed_shards_command(options: Embed) -> int:
    """`avsync embed --shards`: exit status 0 when the output holds at least one clip, 1 when it holds
    none, 2 for a usage error."""
    problems = [name for name in ("videos", "patches", "format") if getattr(options, name)]
    device = str(options.device)
    accelerator, devices = device.split(":")[0], options.devices
    if ":" in device:
        accelerator, devices = "cuda", [int(device.split(":")[1])]
    try:
        if problems:
            raise InputError(f"--shards does not go with {', '.join(problems)} (float16 npz parts only)")
        manifest = embed_shards(
            **matching(
                options,
                embed_shards,
                checkpoint=options.ckpt,
                num_workers=options.workers,
                accelerator=accelerator,
                devices=devices,
                progress=not options.no_progress and sys.stderr.isatty(),
            ),
            **options.authors_kwargs,
        )
    except (CheckpointError, InputError, ValueError, FileNotFoundError) as error:
        print(f"avsync embed: error: {error}", file=sys.stderr)
        return 2
    run = manifest["last_run"]
    log.info(
        "%d clips in %s (%d embedded now, %d already written, %d samples skipped as unreadable)",
        manifest["num_clips"],
        options.out,
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


def run_export(options: Export) -> int:
    """`avsync export CKPT OUT.safetensors`: exit status 0 on success, 2 for an unusable input."""
    try:
        check_export_out(options.out, options.checkpoint, options.json)  # before the checkpoint is read
        if options.random_init:
            from avsync.checkpoints import save_backbone

            backbone = random_init_backbone(options.checkpoint, options.seed)
            source = f"random init of {options.checkpoint}, seed {options.seed}"
            path = save_backbone(backbone, options.out, source=source, json_sidecar=options.json)
        else:
            path = export(
                options.checkpoint, options.out, json_sidecar=options.json, **options.authors_kwargs
            )
    except (CheckpointError, ValueError) as error:
        print(f"avsync export: error: {error}", file=sys.stderr)
        return 2
    sidecar = f" and {path.with_suffix('.json')}" if options.json else ""
    print(f"wrote {path}{sidecar}", file=sys.stderr)
    return 0
