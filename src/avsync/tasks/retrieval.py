"""Zero-shot audio-visual retrieval (paper §3.5.1): `RetrievalModule` and `avsync retrieve`.

Each clip contributes its T aligned frame/window pairs; their global tokens are gathered over the
whole test set (all ranks) and ranked by `avsync.evaluation.retrieval`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from avsync.evaluation.retrieval import (
    DIRECTIONS,
    Direction,
    evaluate_all,
    flatten_metrics,
    write_metrics_csv,
    write_metrics_json,
)
from avsync.evaluation.similarity import STRATEGIES, Strategy
from avsync.loading import resolve_backbone
from avsync.model import CAVMAESync
from avsync.tasks.evaluation_trainer import evaluation_trainer

log = logging.getLogger(__name__)


class RetrievalModule(L.LightningModule):
    """Encodes eval-mode batches (`audio (B, T, L, mel)`, `video (B, T, 3, H, W)`) and scores retrieval
    over everything seen in the test epoch.

    Args:
        backbone / backbone_checkpoint (+ authors_kwargs): the model, given or loaded from a file.
        strategies: similarity aggregations over the T x T token pairs (diagonal mean is the paper's).
        directions: `video_to_audio` (V->A) and/or `audio_to_video`.
        top_k: also keep each query's top-k targets (written to `output_dir`).
        output_dir: where `retrieval.json` and `retrieval.csv` go (rank 0); None = log only.
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
        #: `(keys, audio (N, T, D), video (N, T, D))` of the last test epoch, all ranks, each clip once.
        self.embeddings: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self._keys: list[str] = []
        self._audio: list[torch.Tensor] = []
        self._video: list[torch.Tensor] = []

    def on_test_epoch_start(self) -> None:
        self.backbone.eval()
        self._keys, self._audio, self._video = [], [], []

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        if batch["video"].ndim != 5:
            raise ValueError(
                "retrieval needs eval-mode batches carrying all T pairs per clip (eval_mode: eval)"
            )
        embeddings = self.backbone.encode(batch["audio"], batch["video"])
        self._audio.append(embeddings.global_audio.float().cpu())
        self._video.append(embeddings.global_video.float().cpu())
        self._keys.extend(batch["key"])

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        embeddings = self.backbone.encode(batch["audio"], batch["video"])
        return {
            "key": batch["key"],
            "audio": embeddings.global_audio.float(),
            "video": embeddings.global_video.float(),
        }

    def _gathered(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Every rank's clips, each clip once (first occurrence), in rank order."""
        local = (self._keys, torch.cat(self._audio), torch.cat(self._video))
        parts = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        keys, audio, video, seen = [], [], [], set()
        for part_keys, part_audio, part_video in parts:
            for index, key in enumerate(part_keys):
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    audio.append(part_audio[index])
                    video.append(part_video[index])
        return keys, torch.stack(audio), torch.stack(video)

    def on_test_epoch_end(self) -> None:
        if not self._keys:
            raise RuntimeError("the retrieval test set produced no clips")
        keys, audio, video = self._gathered()
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


def main(argv: list[str] | None = None) -> int:
    """`avsync retrieve --ckpt PATH --shards DIR`: retrieval over prepared shards, printed and saved."""
    from avsync.data.alignment import default_alignment
    from avsync.data.datamodule import AVShardDataModule

    parser = argparse.ArgumentParser(prog="avsync retrieve", description=main.__doc__)
    parser.add_argument(
        "--ckpt", required=True, help="PretrainModule checkpoint, safetensors export or authors' file"
    )
    parser.add_argument("--shards", required=True, help="prepared shard directory (or glob / brace pattern)")
    parser.add_argument("--out", help="directory for retrieval.json / retrieval.csv")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    parser.add_argument("--top-k", type=int, default=0, help="also save each query's top-k targets")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    parser.add_argument("--workers", type=int, default=2)
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
    args = parser.parse_args(argv)
    module = RetrievalModule(
        backbone_checkpoint=args.ckpt,
        authors_kwargs=args.authors_kwargs,
        strategies=args.strategies,
        directions=args.directions,
        top_k=args.top_k,
        output_dir=args.out,
    )
    data = AVShardDataModule(
        test_shards=args.shards,
        eval_batch_size=args.batch_size,
        num_workers=args.workers,
        alignment=args.alignment or default_alignment(module.backbone.audio_length),
        image_size=module.backbone.image_size,
        audio_length=module.backbone.audio_length,
    )
    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer = evaluation_trainer(
        accelerator=args.accelerator, devices=args.devices, precision=precision, enable_progress_bar=True
    )
    trainer.test(module, datamodule=data, verbose=False)
    if trainer.global_rank == 0:
        print(format_table(module.results))
        if args.out:
            print(f"wrote {Path(args.out) / 'retrieval.json'} and retrieval.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
