"""`avsync demo`: the whole system on embedded synthetic data, on a CPU, in minutes.

1. `avsync synth`: clips whose sounds and objects change together within each clip (cached);
2. `avsync prepare`: train and held-out splits to WebDataset shards (cached);
3. `avsync fit --config configs/pretrain/tiny_cpu_mae.yaml`: an image MAE on the training frames,
   written in the released MAE layout (the paper starts from ImageNet-MAE weights; the demo makes its
   own, since nothing is downloaded);
4. `avsync fit --config configs/pretrain/tiny_cpu.yaml --model.init_args.init_from <mae.pth>`:
   audio-visual pretraining of the tiny preset from those weights. Each run is reused when a finished
   run of the same config, data and settings is there; an interrupted one resumes from its
   `last.ckpt`, written every epoch and on SIGTERM: run the same command again;
5. every downstream task on the held-out clips, for the trained backbone, the same architecture
   untrained, and chance: retrieval, linear probing, sound-prompted segmentation (the paper's map and
   the readouts of `avsync.model.patch_readout`, each with its mismatched-sound control, and pictures
   in `<workdir>/figures`, also in TensorBoard), temporal segmentation (with each clip's true number of
   segments, and with the number chosen from the features). The table is printed and written to
   `<workdir>/results.json`.

Each phase is announced with the time since the start; pretraining shows its progress (a bar in a
terminal, a line every 30 s otherwise).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from avsync.recipes import find_recipe
from avsync.tools import Demo, matching

if TYPE_CHECKING:  # torch and Lightning are imported where they are used: `avsync demo --help` is quick
    from avsync.model import CAVMAESync

DEFAULT_RECIPE = "pretrain/tiny_cpu"  # shipped with the package (`avsync.recipes`): works from any folder
#: Stage 0: the image MAE whose weights start the audio-visual run (the paper starts from ImageNet MAE).
DEFAULT_MAE_RECIPE = "pretrain/tiny_cpu_mae"
MAE_RUN_NAME = "image_mae"
#: What the demo writes at the top of its work folder (with the synthetic set's staging folders).
WORKDIR_ENTRIES = frozenset(
    {
        *("synth", ".synth.synth-partial", ".synth.synth-old", "train", "test", "runs", "cache", "figures"),
        *("train.list", "train.labels.csv", "test.list", "test.labels.csv", "results.json"),
    }
)


@dataclass
class Row:
    """One line of the results table: a metric of one task for trained / untrained / chance."""

    task: str
    metric: str
    trained: float
    untrained: float
    chance: float

    @property
    def margin(self) -> float:
        """How far the trained model is above the better of its two baselines (negative: below)."""
        return self.trained - max(self.untrained, self.chance)

    def cells(self) -> list[str]:
        return [
            self.task,
            self.metric,
            *(f"{100 * v:6.1f}" for v in (self.trained, self.untrained, self.chance)),
            f"{100 * self.margin:+6.1f}",
        ]


@dataclass
class DemoRun:
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)

    def clock(self) -> str:
        """Time since the demo started, `h:mm:ss`."""
        minutes, seconds = divmod(int(time.perf_counter() - self.started), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"

    def table(self) -> str:
        header = ["task", "metric", "trained", "untrained", "chance", "margin"]
        cells = [header, *(row.cells() for row in self.rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in cells
        ]
        lines.insert(1, "-" * len(lines[0]))
        footer = (
            "(all values in %; held-out synthetic clips; margin: trained minus the better baseline;\n"
            " temporal segmentation: 'true count' cuts each clip into its true number of events, known\n"
            " only because the clips are synthetic; 'count chosen' lets the silhouette score choose it)"
        )
        return "\n".join([*lines, footer])

    def to_json(self) -> dict:
        return {
            "rows": [{**row.__dict__, "margin": row.margin} for row in self.rows],
            "timings_s": self.timings,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


class Stopwatch:
    """Announces a phase of the demo, with the time since the demo started, and times it."""

    def __init__(self, run: DemoRun, name: str):
        self.run, self.name = run, name

    def __enter__(self):
        self.started = time.perf_counter()
        print(f"[demo {self.run.clock()}] {self.name} ...", flush=True)

    def __exit__(self, *exc):
        self.run.timings[self.name] = round(time.perf_counter() - self.started, 1)
        outcome = "stopped" if exc[0] is not None else "done"
        print(
            f"[demo {self.run.clock()}] {self.name}: {outcome} in {self.run.timings[self.name]} s", flush=True
        )


# ---------------------------------------------------------------------------------------------- data
def check_workdir(workdir: Path) -> None:
    """Refuse, before any work, a work folder that is a file or that holds what the demo did not write:
    it writes `train.list`, `results.json`, ... there and replaces its own runs of other settings, so a
    folder is taken only when new, empty, an earlier demo's (`synth/synth.json`), or holding nothing
    but the demo's entries (a demo killed early)."""
    from avsync.output_paths import OutputError, check_output_folder

    check_output_folder(workdir, "--workdir")
    if not workdir.is_dir() or (workdir / "synth" / "synth.json").is_file():
        return
    others = sorted(entry.name for entry in workdir.iterdir() if entry.name not in WORKDIR_ENTRIES)
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputError(
            f"--workdir {workdir}: holds files that are not the demo's ({listed}); the demo writes "
            "train.list, results.json, runs/ ... there: give a new or empty folder"
        )


def make_data(workdir: Path, clips: int, classes: int, seed: int, workers: int, kind: str = "tones") -> Path:
    """Synthesize (cached) and prepare the train / test splits (cached); returns the synth directory.
    `kind`: the synthetic generator (`avsync synth --kind`)."""
    from avsync.data.prepare import PrepareError, prepare
    from avsync.synth import synthesize

    synth = synthesize(workdir / "synth", clips, classes, seed=seed, kind=kind, holdout=0.2, workers=workers)
    header, *rows = (synth.out_dir / "labels.csv").read_text().splitlines(keepends=True)
    for split in ("train", "test"):
        listing = workdir / f"{split}.list"
        listing.write_text("".join(f"{synth.video(clip)}\n" for clip in synth.splits[split]))
        # the split's own rows: `prepare` warns about labels of clips it is not given
        members = set(synth.splits[split])
        labels = workdir / f"{split}.labels.csv"
        labels.write_text(header + "".join(row for row in rows if row.split(",", 1)[0] in members))
        options = dict(
            labels=labels,
            classes=synth.out_dir / "classes.csv",
            shard_max_clips=32,
            workers=workers,
            progress=False,
        )
        try:  # reuses finished shards of the same inputs and settings
            summary = prepare([listing], workdir / split, **options)
        except PrepareError:  # shards of an earlier demo with other settings: replace them
            summary = prepare([listing], workdir / split, overwrite=True, **options)
        if summary.failures:
            raise RuntimeError(f"prepare skipped {summary.failures} synthetic clips; see {workdir / split}")
    return synth.out_dir


# ---------------------------------------------------------------------------------------------- training
#: The pretraining run's folder under `<workdir>/runs`: one fixed logger name and version, so that every
#: start of the demo finds the checkpoint of the one before.
RUN_NAME, RUN_VERSION = "pretrain", "demo"
#: Written beside the checkpoints: what the run was made from, and whether it finished.
STATE_FILE = "demo-pretrain.json"
#: Said when a signal stops the pretraining (instead of `avsync fit`'s `--ckpt_path last` advice).
DEMO_RESUME_HINT = "Resume: run the same `avsync demo` (or `make demo`) again; it continues from there."


def pretrain_fingerprint(config: Path, workdir: Path, args: list[str]) -> dict:
    """What decides the pretrained weights: the config's text, the training data (the shards'
    manifests, which hold the fingerprint of their own inputs and settings) and the other settings."""
    data = {split: _sha256((workdir / split / "manifest.json").read_bytes()) for split in ("train", "test")}
    from avsync import __version__

    inputs = {"config": _sha256(config.read_bytes()), "data": data, "args": args, "avsync": __version__}
    return {"fingerprint": _sha256(json.dumps(inputs, sort_keys=True).encode()), "inputs": inputs}


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def demo_callbacks(config: Path, interactive: bool | None = None, interval: float = 30.0) -> list[dict]:
    """The config's callbacks, with `last.ckpt` written after every training epoch (so that a killed run
    loses at most one epoch), a progress display that suits the output (a bar in a terminal, lines in a
    log) and a model summary without Lightning's FLOPs line (0 for avsync's dict batches)."""
    import yaml

    from avsync.training.console import progress_callback

    configured = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("callbacks") or []
    callbacks = [dict(c) for c in (configured if isinstance(configured, list) else [configured])]
    for callback in callbacks:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            # Lightning writes `last.ckpt` at an epoch's end only beside a top-k checkpoint (so keep one),
            # and a resumed run would write `last-v1.ckpt` beside an existing `last.ckpt` (so overwrite it)
            init_args = callback.get("init_args") or {}
            callback["init_args"] = {
                **init_args,
                "save_last": True,
                "save_top_k": init_args.get("save_top_k", 1) or 1,
                "save_on_train_epoch_end": True,
                "enable_version_counter": False,
            }
    bar = progress_callback(interactive, interval)
    return [*callbacks, bar, {"class_path": "avsync.training.console.SummaryWithoutFlops"}]


def pretrain(
    config: Path,
    workdir: Path,
    epochs: int | None,
    extra: list[str],
    progress_interval: float = 30.0,
    run_name: str = RUN_NAME,
    depends_on: tuple[Path, ...] = (),
) -> Path:
    """`avsync fit --config CONFIG` with the demo's data and output folders; returns the last checkpoint.

    A finished run of the same config, data, settings and `depends_on` files (their contents) is reused;
    an interrupted one (killed, or stopped by a signal) resumes from its `last.ckpt`; a run of other
    inputs is replaced. `run_name`: the run's folder under `<workdir>/runs`."""
    import shutil

    from avsync.cli import lightning_cli
    from avsync.training import preemption

    run_dir = workdir / "runs" / run_name / RUN_VERSION
    last = run_dir / "checkpoints" / "last.ckpt"
    settings = [*([f"--trainer.max_epochs={epochs}"] if epochs is not None else []), *extra]
    depends = [f"{path.name}:{_sha256(path.read_bytes())}" for path in depends_on]
    expected = pretrain_fingerprint(config, workdir, settings + depends)
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    finished = Path(state.get("checkpoint") or last)
    if state.get("fingerprint") == expected["fingerprint"] and state.get("finished") and finished.is_file():
        print(f"[demo] pretraining: reusing the finished run {run_dir} (same config, data and settings)")
        return finished
    if run_dir.exists() and state.get("fingerprint") != expected["fingerprint"]:
        print(f"[demo] pretraining: {run_dir} holds a run of other inputs or settings; starting afresh")
        shutil.rmtree(run_dir)
    args = [
        "fit",
        "--config",
        str(config),
        f"--data.init_args.train_shards={workdir / 'train'}",
        f"--data.init_args.val_shards={workdir / 'test'}",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
        f"--trainer.logger.init_args.name={run_name}",
        f"--trainer.logger.init_args.version={RUN_VERSION}",
        f"--trainer.callbacks={json.dumps(demo_callbacks(config, interval=progress_interval))}",
        "--trainer.enable_progress_bar=true",
    ]
    if last.is_file():
        print(f"[demo] pretraining: resuming the interrupted run from {last}", flush=True)
        args.append(f"--ckpt_path={last}")
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({**expected, "finished": False}, indent=2) + "\n")
    preemption.RESUME_HINT = DEMO_RESUME_HINT
    cli = lightning_cli(args + settings)
    checkpoint = cli.trainer.checkpoint_callback.last_model_path if cli.trainer.checkpoint_callback else ""
    if not checkpoint:
        raise RuntimeError(
            "pretraining wrote no checkpoint (the config needs a ModelCheckpoint with save_last)"
        )
    state = {**expected, "finished": True, "checkpoint": str(checkpoint)}
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    return Path(checkpoint)


# ---------------------------------------------------------------------------------------------- tasks
def shard_data(workdir: Path, backbone: CAVMAESync, **options):
    from avsync.data.datamodule import AVShardDataModule

    return AVShardDataModule(
        image_size=backbone.image_size,
        audio_length=backbone.audio_length,
        num_workers=0,
        **options,
    )


def retrieval_rows(workdir: Path, backbones: dict[str, CAVMAESync]) -> list[Row]:
    from avsync.tasks.evaluation_trainer import evaluation_trainer
    from avsync.tasks.retrieval import RetrievalModule

    results = {}
    for name, backbone in backbones.items():
        module = RetrievalModule(backbone, strategies=["diagonal_mean", "block_mean"])
        data = shard_data(workdir, backbone, test_shards=str(workdir / "test"), eval_batch_size=16)
        evaluation_trainer(accelerator="cpu").test(module, datamodule=data, verbose=False)
        results[name] = module.results
    clips = int(json.loads((workdir / "test" / "manifest.json").read_text())["counts"]["clips"])
    rows = []
    for strategy in ("diagonal_mean", "block_mean"):
        for direction, label in (("video_to_audio", "V->A"), ("audio_to_video", "A->V")):
            for k in (1, 5, 10):
                rows.append(
                    Row(
                        f"retrieval {label} {strategy.replace('_', ' ')}",
                        f"R@{k}",
                        results["trained"][direction][strategy].metrics[f"R{k}"],
                        results["untrained"][direction][strategy].metrics[f"R{k}"],
                        min(1.0, k / clips),
                    )
                )
    return rows


def probe_rows(workdir: Path, backbones: dict[str, CAVMAESync], num_classes: int, epochs: int) -> list[Row]:
    import torch

    from avsync.tasks.evaluation_trainer import evaluation_trainer
    from avsync.tasks.probe import ProbeModule
    from avsync.tasks.probe.data import CachedFeatureDataModule

    scores, labels = {}, None
    for name, backbone in backbones.items():
        source = shard_data(
            workdir,
            backbone,
            train_shards=str(workdir / "train"),
            test_shards=str(workdir / "test"),
            batch_size=16,
            train_mode="eval",
            random_resized_crop=False,
            horizontal_flip=False,
        )
        data = CachedFeatureDataModule(source, cache_dir=str(workdir / "cache" / "probe"), batch_size=32)
        torch.manual_seed(0)
        module = ProbeModule(backbone=backbone, num_classes=num_classes, lr=1e-3, warmup_epochs=1, mixup=0.5)
        trainer = evaluation_trainer(accelerator="cpu", max_epochs=epochs)
        trainer.fit(module, datamodule=data)
        scores[name] = trainer.test(module, datamodule=data, verbose=False)[0]["test/mAP"]
        labels = data.splits["test"].labels
    prevalence = labels.float().mean(dim=0)
    chance = float(prevalence[prevalence > 0].mean())  # the AP of uninformative scores is the prevalence
    return [Row("linear probe (16 x [g_a, g_v])", "mAP", scores["trained"], scores["untrained"], chance)]


#: The sound-prompted maps the demo scores: the paper's, and the literature's remedies for maps that
#: ignore the prompt (`avsync.model.patch_readout`, CLIP Surgery's prompt surgery), each with its control.
MAP_VARIANTS: tuple[tuple[str, str, bool], ...] = (
    ("sound-prompted segmentation (paper's map)", "patch_tokens", False),
    ("sound-prompted segmentation, paper's map + prompt surgery", "patch_tokens", True),
    ("sound-prompted segmentation, self-attention readout", "self_attention", False),
    ("sound-prompted segmentation, global readout + prompt surgery", "global_readout", True),
)


def localization_rows(
    synth_dir: Path, backbones: dict[str, CAVMAESync], figures: Path | None = None
) -> list[Row]:
    """mAP and mIoU of each map of `MAP_VARIANTS`, and the same mAP with every clip prompted by the next
    clip's sounds: a control that maps following the sound fail (they score lower) and maps that ignore
    it pass unchanged. The held-out prompts are decoded once for all of them. With `figures`, one
    picture per map: the trained model's image | mask | own sound | next clip's sound, a row per class."""
    import numpy as np
    from torch.utils.data import DataLoader

    from avsync.tasks.evaluation_trainer import evaluation_trainer
    from avsync.tasks.localization import LocalizationModule, control_figure
    from avsync.tasks.localization_data import (
        MismatchedSounds,
        PromptDataset,
        collate_prompts,
        synth_prompt_set,
    )

    prompts = synth_prompt_set(synth_dir, "test")
    geometry = next(iter(backbones.values()))
    decoded = DecodedPrompts(PromptDataset(prompts.sources, geometry.image_size, geometry.audio_length))
    loaders = {
        control: DataLoader(
            MismatchedSounds(decoded) if control else decoded, batch_size=16, collate_fn=collate_prompts
        )
        for control in (False, True)
    }
    frames_per_clip = len(decoded[0]["class_index"]) if len(decoded) else 1
    rows: list[Row] = []
    for task, readout, surgery in MAP_VARIANTS:
        scored = {}
        for name, backbone in backbones.items():
            for control in (False, True):
                module = LocalizationModule(
                    backbone,
                    class_names=prompts.class_names,
                    patch_readout=readout,
                    prompt_surgery=surgery,
                    overlays=frames_per_clip * 8 if name == "trained" and figures is not None else 0,
                )
                evaluation_trainer().test(module, loaders[control], verbose=False)
                scored[name, control] = module
        trained, untrained = scored["trained", False].result, scored["untrained", False].result
        # the AP of an uninformative map is the share of object pixels (0 for a class without any, which
        # scores 0 and stays in the mean, as in DenseAV's protocol)
        chance = float(np.mean([score.positive_rate for score in trained.per_class.values()]))
        control_ap = (scored["trained", True].result.mean_ap, scored["untrained", True].result.mean_ap)
        rows += [
            Row(task, "mAP", trained.mean_ap, untrained.mean_ap, chance),
            Row(task, "mIoU", trained.mean_iou, untrained.mean_iou, chance),
            Row(f"{task}, next clip's sounds (control)", "mAP", *control_ap, chance),
        ]
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            picture = control_figure(scored["trained", False].overlays, scored["trained", True].overlays, 8)
            picture.save(figures / f"localization_{readout}{'_surgery' if surgery else ''}.png")
    return rows


class DecodedPrompts:
    """The held-out prompts decoded once and kept in memory (about 200 kB a frame at the tiny size):
    the demo scores them sixteen times, four maps x two models x matched and control."""

    def __init__(self, prompts) -> None:
        self.sources = prompts.sources
        self.items = [prompts[index] for index in range(len(prompts))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def log_figures(figures: Path, log_dir: Path) -> None:
    """The localization pictures, also in the pretraining run's TensorBoard (`localization/*`)."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for path in sorted(figures.glob("localization_*.png")):
        picture = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image(f"localization/{path.stem}", picture, dataformats="HWC")
    writer.close()


def segmentation_rows(synth_dir: Path, backbones: dict[str, CAVMAESync]) -> list[Row]:
    """ARI with each clip cut into its true number of segments (known to the demo only because the clips
    are synthetic), and with the number chosen from the features (silhouette), as `avsync segment` does
    when it is not told."""
    from avsync.tasks.segmentation import synth_segmentation_aris

    scores = {
        name: synth_segmentation_aris(backbone, synth_dir, "test") for name, backbone in backbones.items()
    }
    task = "temporal segmentation (audio-visual)"
    return [
        Row(f"{task}, true count", "ARI", scores["trained"][0], scores["untrained"][0], 0.0),
        Row(f"{task}, count chosen", "ARI", scores["trained"][1], scores["untrained"][1], 0.0),
    ]


# ---------------------------------------------------------------------------------------------- main
def run_demo(
    workdir: Path,
    config: Path | None = None,
    clips: int = 320,
    classes: int = 8,
    epochs: int | None = None,
    probe_epochs: int = 20,
    seed: int = 0,
    workers: int = 2,
    fit_args: list[str] | None = None,
    mae_config: Path | None = None,
    mae_epochs: int | None = None,
    kind: str = "tones",
) -> DemoRun:
    """The demo in `workdir`. `fit_args` go to the audio-visual `avsync fit`; its `--data.*` and
    `--seed_everything` ones also to the image-MAE stage (`mae_config`, `mae_epochs`), whose weights
    start the audio-visual run through `init_from`, as ImageNet-MAE weights start the paper's."""
    workdir = workdir.resolve()
    check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = DemoRun(workdir)
    fit_args = list(fit_args or [])
    with Stopwatch(run, "synthesize + prepare"):
        synth_dir = make_data(workdir, clips, classes, seed, workers, kind)
    with Stopwatch(run, "image-MAE stage"):
        shared = [arg for arg in fit_args if arg.startswith(("--data.", "--seed_everything"))]
        mae_checkpoint = pretrain(
            mae_config or find_recipe(DEFAULT_MAE_RECIPE), workdir, mae_epochs, shared, run_name=MAE_RUN_NAME
        )
        mae_weights = mae_checkpoint.parent.parent / "mae.pth"  # written by ImageMAEModule in its log folder
    with Stopwatch(run, "pretrain"):
        run.checkpoint = pretrain(
            config or find_recipe(DEFAULT_RECIPE),
            workdir,
            epochs,
            [*fit_args, f"--model.init_args.init_from={mae_weights}"],
            depends_on=(mae_weights,),
        )

    import torch

    from avsync.checkpoints import load_backbone
    from avsync.model import CAVMAESync

    trained = load_backbone(run.checkpoint)
    torch.manual_seed(seed)
    backbones = {"trained": trained, "untrained": CAVMAESync(**trained.config).eval()}
    with Stopwatch(run, "retrieval"):
        run.rows += retrieval_rows(workdir, backbones)
    with Stopwatch(run, "linear probe"):
        run.rows += probe_rows(workdir, backbones, classes, probe_epochs)
    with Stopwatch(run, "sound-prompted segmentation"):
        run.rows += localization_rows(synth_dir, backbones, figures=workdir / "figures")
    with Stopwatch(run, "temporal segmentation"):
        run.rows += segmentation_rows(synth_dir, backbones)
    log_figures(workdir / "figures", run.checkpoint.parent.parent)
    (workdir / "results.json").write_text(json.dumps(run.to_json(), indent=2) + "\n")
    return run


def demo(options: Demo) -> int:
    """`avsync demo`: run the demo and print its table (exit status 2 for an unusable config or workdir)."""
    try:
        config = Path(options.config) if Path(options.config).is_file() else find_recipe(options.config)
        mae = options.mae_config
        mae_config = Path(mae) if Path(mae).is_file() else find_recipe(mae)
    except ValueError as error:
        print(f"avsync demo: error: {error}", file=sys.stderr)
        return 2
    from avsync.output_paths import OutputError

    try:
        check_workdir(options.workdir.resolve())  # before anything is imported or written
    except OutputError as error:
        print(f"avsync demo: error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    run = run_demo(**matching(options, run_demo, config=config, mae_config=mae_config))
    print()
    print(run.table())
    print(f"\nresults: {run.workdir / 'results.json'}; checkpoint: {run.checkpoint}")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in run.timings.items()))
    return 0
