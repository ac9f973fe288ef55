"""Zero-shot audio-visual retrieval (paper §3.5.1): `RetrievalModule` and `avsync retrieve`.

Each clip contributes its T aligned frame/window pairs; their global tokens are gathered over the
whole test set (all ranks, `ClipEmbeddings`) and ranked by `avsync.evaluation.retrieval`.

A run is `avsync test --config configs/retrieval/<recipe>.yaml` (LightningCLI: this module and an
`AVShardDataModule`); `avsync retrieve --ckpt ... --shards ...` writes its options into the same config
(`retrieval_config`) and runs it through the same LightningCLI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from avsync.checkpoints import resolve_backbone
from avsync.config_checks import check_count
from avsync.evaluation.retrieval import (
    DIRECTIONS,
    ClipEmbeddings,
    Direction,
    evaluate_all,
    flatten_metrics,
    write_all_rankings,
    write_metrics_csv,
    write_metrics_json,
)
from avsync.evaluation.similarity import STRATEGIES, Strategy
from avsync.model import CAVMAESync
from avsync.output_paths import check_output_folder

log = logging.getLogger(__name__)


class RetrievalModule(L.LightningModule):
    """Encodes eval-mode batches (`audio (B, T, L, mel)`, `video (B, T, 3, H, W)`) and scores retrieval
    over everything seen in the test epoch.

    Args:
        backbone / backbone_checkpoint (+ authors_kwargs): the model, given or loaded from a file.
        strategies: similarity aggregations over the T x T token pairs (diagonal mean is the paper's).
        directions: `video_to_audio` (V->A) and/or `audio_to_video`.
        top_k: also keep each query's top-k targets, written (with every query's rank) to
            `output_dir/rankings/{direction}_{strategy}.csv`.
        output_dir: where `retrieval.json`, `retrieval.csv` and the rankings go (rank 0); None = log only.
    """

    def __init__(
        self,
        backbone: CAVMAESync | None = None,
        backbone_checkpoint: str | None = None,
        authors_kwargs: dict | None = None,
        strategies: Sequence[Strategy] = STRATEGIES,
        directions: Sequence[Direction] = DIRECTIONS,
        top_k: int = 0,
        output_dir: str | None = None,
    ):
        super().__init__()
        check_count("RetrievalModule", "top_k", top_k, 0)  # before the evaluation, not after it
        if output_dir:
            check_output_folder(output_dir, "output_dir")  # an existing file: refused before the test epoch
        unknown = [s for s in strategies if s not in STRATEGIES] + [
            d for d in directions if d not in DIRECTIONS
        ]
        if unknown:
            raise ValueError(
                f"unknown strategies/directions {unknown}; choose from {STRATEGIES} and {DIRECTIONS}"
            )
        self.backbone = resolve_backbone(backbone, backbone_checkpoint, authors_kwargs).requires_grad_(False)
        self.save_hyperparameters(ignore=["backbone"])
        self.strategies, self.directions = tuple(strategies), tuple(directions)
        self.results: dict | None = None
        #: `(keys, audio (N, T, D), video (N, T, D))` of the last test epoch: all ranks, each clip once,
        #: sorted by clip id (row i of the rankings is clip keys[i]).
        self.embeddings: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self.clips = ClipEmbeddings()

    def on_test_epoch_start(self) -> None:
        self.backbone.eval()
        self.clips.reset()

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        if batch["video"].ndim != 5:
            raise ValueError(
                "retrieval needs eval-mode batches carrying all T pairs per clip (eval_mode: eval)"
            )
        embeddings = self.backbone.encode(batch["audio"], batch["video"])
        self.clips.update(batch["key"], embeddings.global_audio, embeddings.global_video)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        embeddings = self.backbone.encode(batch["audio"], batch["video"])
        return {
            "key": batch["key"],
            "audio": embeddings.global_audio.float(),
            "video": embeddings.global_video.float(),
        }

    def on_test_epoch_end(self) -> None:
        keys, audio, video = self.clips.compute()  # a collective: every rank calls it
        if not keys:
            raise RuntimeError("the retrieval test set produced no clips")
        self.embeddings = (keys, audio, video)
        results = evaluate_all(audio, video, self.strategies, self.directions, top_k=self.hparams.top_k)
        self.results = results
        for name, value in flatten_metrics(results).items():
            self.log(name, float(value), rank_zero_only=True)
        output_dir = self.hparams.output_dir
        if output_dir and self.global_rank == 0:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_metrics_json(results, Path(output_dir) / "retrieval.json", clips=len(keys))
            write_metrics_csv(results, Path(output_dir) / "retrieval.csv")
            if self.hparams.top_k:
                write_all_rankings(results, output_dir, keys)


def format_table(results: dict) -> str:
    """A plain-text table of R@1/5/10 and median rank per direction and strategy."""
    lines = [f"{'direction':<16}{'strategy':<15}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'MedR':>7}"]
    for direction, by_strategy in results.items():
        for strategy, result in by_strategy.items():
            m = result.metrics
            lines.append(
                f"{direction:<16}{strategy:<15}{100 * m['R1']:>7.1f}{100 * m['R5']:>7.1f}"
                f"{100 * m['R10']:>7.1f}{m['MR']:>7.1f}"
            )
    return "\n".join(lines)


def retrieval_config(
    ckpt: str,
    shards: str,
    *,
    out: str | None = None,
    strategies: Sequence[Strategy] = STRATEGIES,
    directions: Sequence[Direction] = DIRECTIONS,
    top_k: int = 0,
    batch_size: int = 8,
    workers: int = 2,
    alignment: str | None = "clip",
    accelerator: str = "auto",
    devices: str | int = "auto",
    precision: str = "32-true",
    authors_kwargs: dict | None = None,
    root_dir: str | None = None,
) -> dict:
    """The LightningCLI config (`avsync test --config`) of one retrieval run, as the recipes in
    `configs/retrieval/` spell it out; `root_dir` receives the `config.yaml` LightningCLI saves."""
    return {
        "seed_everything": 0,
        "verbose": False,
        "trainer": {
            "accelerator": accelerator,
            "devices": int(devices) if str(devices).isdigit() else devices,
            "precision": precision,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "default_root_dir": root_dir or out,
        },
        "model": {
            "class_path": f"{__name__}.RetrievalModule",
            "init_args": {
                "backbone_checkpoint": str(ckpt),
                "authors_kwargs": authors_kwargs or None,
                "strategies": list(strategies),
                "directions": list(directions),
                "top_k": top_k,
                "output_dir": out,
            },
        },
        "data": {
            "class_path": "avsync.data.datamodule.AVShardDataModule",
            "init_args": {
                "test_shards": str(shards),
                "eval_batch_size": batch_size,
                "num_workers": workers,
                "alignment": alignment,
            },
        },
    }


def is_retrieval_config(path: Path) -> bool:
    """Whether `path` is the config an `avsync retrieve` run saved (it may be replaced)."""
    try:
        return f"{__name__}.RetrievalModule" in path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
