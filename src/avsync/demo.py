"""`avsync demo`: the whole system on embedded synthetic data, on a CPU, in minutes.

1. `avsync synth`: clips whose sounds and objects change together within each clip (cached);
2. `avsync prepare`: train and held-out splits to WebDataset shards (cached);
3. `avsync fit --config configs/pretrain/tiny_cpu.yaml`: pretraining the tiny preset;
4. every downstream task on the held-out clips, for the trained backbone, the same architecture
   untrained, and chance: retrieval, linear probing, sound-prompted segmentation, temporal
   segmentation. The table is printed and written to `<workdir>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avsync.model import CAVMAESync
from avsync.tasks.evaluation_trainer import evaluation_trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"


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
        footer = "(all values in %; held-out synthetic clips; margin: trained minus the better baseline)"
        return "\n".join([*lines, footer])

    def to_json(self) -> dict:
        return {
            "rows": [{**row.__dict__, "margin": row.margin} for row in self.rows],
            "timings_s": self.timings,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


class Stopwatch:
    def __init__(self, run: DemoRun, name: str):
        self.run, self.name = run, name

    def __enter__(self):
        self.started = time.perf_counter()
        print(f"[demo] {self.name} ...", flush=True)

    def __exit__(self, *exc):
        self.run.timings[self.name] = round(time.perf_counter() - self.started, 1)
        print(f"[demo] {self.name}: {self.run.timings[self.name]} s", flush=True)


# ---------------------------------------------------------------------------------------------- data
def make_data(workdir: Path, clips: int, classes: int, seed: int, workers: int) -> Path:
    """Synthesize (cached) and prepare the train / test splits (cached); returns the synth directory."""
    from avsync.data.prepare import PrepareError, prepare
    from avsync.data.synth import synthesize

    synth = synthesize(workdir / "synth", clips, classes, seed=seed, holdout=0.2, workers=workers)
    for split in ("train", "test"):
        listing = workdir / f"{split}.list"
        listing.write_text("".join(f"{synth.video(clip)}\n" for clip in synth.splits[split]))
        options = dict(
            labels=synth.out_dir / "labels.csv",
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
def pretrain(config: Path, workdir: Path, epochs: int | None, extra: list[str]) -> Path:
    """`avsync fit --config CONFIG` with the demo's data and output folders; returns the last checkpoint."""
    from avsync.cli import lightning_cli

    args = [
        "fit",
        "--config",
        str(config),
        f"--data.init_args.train_shards={workdir / 'train'}",
        f"--data.init_args.val_shards={workdir / 'test'}",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
        "--trainer.enable_progress_bar=false",
    ]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    cli = lightning_cli(args + extra)
    checkpoint = cli.trainer.checkpoint_callback.last_model_path if cli.trainer.checkpoint_callback else ""
    if not checkpoint:
        raise RuntimeError(
            "pretraining wrote no checkpoint (the config needs a ModelCheckpoint with save_last)"
        )
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


def localization_rows(synth_dir: Path, backbones: dict[str, CAVMAESync]) -> list[Row]:
    """mAP and mIoU, and the same mAP with every clip prompted by the next clip's sounds: a control that
    maps following the sound fail (they score lower) and maps that ignore it pass unchanged."""
    from avsync.tasks.localization import evaluate_localization
    from avsync.tasks.localization_data import synth_prompt_set

    prompts = synth_prompt_set(synth_dir, "test")
    results, controls = {}, {}
    for name, backbone in backbones.items():
        results[name] = evaluate_localization(backbone, prompts, batch_size=16, overlays=0).result
        controls[name] = evaluate_localization(
            backbone, prompts, batch_size=16, overlays=0, mismatched_sounds=True
        ).result
    trained = results["trained"]
    chance = float(
        np.mean([s.positive_rate for n, s in trained.per_class.items() if n not in trained.undefined])
    )
    task = "sound-prompted segmentation"
    return [
        Row(task, "mAP", results["trained"].mean_ap, results["untrained"].mean_ap, chance),
        Row(task, "mIoU", results["trained"].mean_iou, results["untrained"].mean_iou, chance),
        Row(
            f"{task}, next clip's sounds",
            "mAP",
            controls["trained"].mean_ap,
            controls["untrained"].mean_ap,
            chance,
        ),
    ]


def segmentation_rows(synth_dir: Path, backbones: dict[str, CAVMAESync]) -> list[Row]:
    from avsync.tasks.segmentation import synth_segmentation_ari

    scores = {
        name: synth_segmentation_ari(backbone, synth_dir, "test") for name, backbone in backbones.items()
    }
    return [Row("temporal segmentation (audio-visual)", "ARI", scores["trained"], scores["untrained"], 0.0)]


# ---------------------------------------------------------------------------------------------- main
def run_demo(
    workdir: Path,
    config: Path = DEFAULT_CONFIG,
    clips: int = 320,
    classes: int = 8,
    epochs: int | None = None,
    probe_epochs: int = 20,
    seed: int = 0,
    workers: int = 2,
    fit_args: list[str] | None = None,
) -> DemoRun:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run = DemoRun(workdir)
    with Stopwatch(run, "synthesize + prepare"):
        synth_dir = make_data(workdir, clips, classes, seed, workers)
    with Stopwatch(run, "pretrain"):
        run.checkpoint = pretrain(config, workdir, epochs, fit_args or [])

    from avsync.loading import load_backbone

    trained = load_backbone(run.checkpoint)
    torch.manual_seed(seed)
    backbones = {"trained": trained, "untrained": CAVMAESync(**trained.config).eval()}
    with Stopwatch(run, "retrieval"):
        run.rows += retrieval_rows(workdir, backbones)
    with Stopwatch(run, "linear probe"):
        run.rows += probe_rows(workdir, backbones, classes, probe_epochs)
    with Stopwatch(run, "sound-prompted segmentation"):
        run.rows += localization_rows(synth_dir, backbones)
    with Stopwatch(run, "temporal segmentation"):
        run.rows += segmentation_rows(synth_dir, backbones)
    (workdir / "results.json").write_text(json.dumps(run.to_json(), indent=2) + "\n")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="avsync demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("shards/demo"),
        help="data, runs and results (default: %(default)s)",
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="pretraining config (default: the tiny CPU one)"
    )
    parser.add_argument(
        "--clips", type=int, default=320, help="synthetic clips, 20%% held out (default: %(default)s)"
    )
    parser.add_argument("--classes", type=int, default=8, help="synthetic classes (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the config's)")
    parser.add_argument("--probe-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for synthesis and preparation")
    args, fit_args = parser.parse_known_args(argv)
    if not args.config.is_file():
        parser.error(
            f"{args.config}: no such config (run the demo from the repository root, or pass --config)"
        )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    run = run_demo(
        args.workdir,
        args.config,
        args.clips,
        args.classes,
        args.epochs,
        args.probe_epochs,
        args.seed,
        args.workers,
        fit_args,
    )
    print()
    print(run.table())
    print(f"\nresults: {run.workdir / 'results.json'}; checkpoint: {run.checkpoint}")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in run.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
