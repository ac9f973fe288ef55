"""Sound-prompted segmentation (paper §3.5.3, SPEC §4): where in a frame is the sound coming from?

The heat map of an (image, sound) pair is the cosine similarity of the sound's global audio token with
each visual patch token of the image, laid out on the patch grid (14x14 at ViT-B) and bilinearly
upsampled to the model input (`image_size` square, the centre crop of the evaluation transform); masks
are brought onto the same crop (see `localization_data.py`). Scoring follows DenseAV
(`avsync.evaluation.localization`).

    avsync localize --ckpt model.ckpt --manifest ade20k_sound.csv --out results/
    avsync localize --ckpt model.ckpt --synth data/synth --split test --out results/

writes `metrics.json` (mAP, mIoU, per class, skipped inputs) and `overlays/*.png` (image | heat map |
mask).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader

from avsync.data.clip import ExtractionOptions
from avsync.evaluation.localization import (
    NUM_IOU_THRESHOLDS,
    LocalizationResult,
    LocalizationScores,
    normalize_maps,
)
from avsync.model import CAVMAESync
from avsync.tasks.evaluation_trainer import evaluation_trainer
from avsync.tasks.localization_data import (
    MismatchedSounds,
    PromptDataset,
    PromptSet,
    Rejection,
    collate_prompts,
    read_class_list,
    read_manifest,
    synth_prompt_set,
)
from avsync.tasks.visualize import denormalize_frame


def similarity_maps(
    global_audio: torch.Tensor, patches_video: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Cosine similarity of `global_audio` `(B, D)` with each of `patches_video` `(B, h*w, D)` (row-major
    patches), as `(B, h, w)` maps upsampled bilinearly to `size` `(H, W)` -> `(B, H, W)`."""
    audio = F.normalize(global_audio.float(), dim=-1)
    patches = F.normalize(patches_video.float(), dim=-1)
    grid_maps = rearrange(
        torch.einsum("bd,bnd->bn", audio, patches), "b (h w) -> b 1 h w", h=grid[0], w=grid[1]
    )
    return F.interpolate(grid_maps, size=size, mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def sound_prompted_maps(backbone: CAVMAESync, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Heat maps `(B, S, S)` of normalized audio windows `(B, L, mel)` on frames `(B, 3, S, S)`."""
    embeddings = backbone.encode(audio, video)
    size = (backbone.image_size, backbone.image_size)
    return similarity_maps(
        embeddings.global_audio, embeddings.patches_video, backbone.video_tokenizer.grid, size
    )


@dataclass
class Overlay:
    """One prompt kept for a picture: the model input frame, its normalized heat map and the mask."""

    key: str
    class_name: str
    frame: torch.Tensor  # (3, S, S) RGB in [0, 1]
    heat_map: torch.Tensor  # (S, S) in [0, 1]
    mask: torch.Tensor  # (S, S) bool

    def image(self, alpha: float = 0.5, min_height: int = 192) -> Image.Image:
        """image | heat map over the image (jet colours) | mask, side by side, 2-pixel white gaps; small
        model inputs are enlarged (nearest) to at least `min_height` pixels so the maps can be seen."""
        frame = self.frame.permute(1, 2, 0).numpy()
        colours = matplotlib.colormaps["jet"](self.heat_map.numpy())[..., :3]
        blended = (1 - alpha) * frame + alpha * colours
        mask = np.repeat(self.mask.numpy()[..., None].astype(np.float32), 3, axis=-1)
        gap = np.ones((frame.shape[0], 2, 3), dtype=np.float32)
        panels = np.concatenate([frame, gap, blended, gap, mask], axis=1)
        picture = Image.fromarray((panels * 255).round().clip(0, 255).astype(np.uint8))
        scale = -(-min_height // picture.height)
        if scale > 1:
            picture = picture.resize(
                (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
            )
        return picture


class LocalizationModule(L.LightningModule):
    """Scores sound-prompted segmentation in `trainer.test` on batches of `collate_prompts`.

    After the test epoch: `result` (a `LocalizationResult`), `skipped` (sources that failed to decode),
    `overlays` (the first `overlays` prompts scored), and `test/mAP`, `test/mIoU` logged.

    Args:
        backbone: the frozen backbone (or `backbone_config` to build one, when reloading).
        class_names: names of the class indices the batches carry.
        num_iou_thresholds: thresholds of the best-IoU search (DenseAV: 20).
        overlays: how many prompts to keep for pictures.
    """

    def __init__(
        self,
        backbone: CAVMAESync | None = None,
        class_names: Sequence[str] = (),
        num_iou_thresholds: int = NUM_IOU_THRESHOLDS,
        overlays: int = 16,
        backbone_config: dict | None = None,
    ) -> None:
        super().__init__()
        if backbone is None:
            backbone = CAVMAESync(**(backbone_config or {}))
        self.backbone = backbone.eval().requires_grad_(False)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone_config"] = dict(backbone.config)
        self.class_names = list(class_names)
        self.scores = LocalizationScores(self.class_names, num_iou_thresholds)
        self.max_overlays = overlays
        self.result: LocalizationResult | None = None
        self.skipped: list[Rejection] = []
        self.overlays: list[Overlay] = []
        self.prompts_scored = 0

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return sound_prompted_maps(self.backbone, audio, video)

    def on_test_epoch_start(self) -> None:
        self.scores.reset()
        self.result, self.skipped, self.overlays, self.prompts_scored = None, [], [], 0

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.skipped.extend(Rejection(*rejection) for rejection in batch["skipped"])
        if batch["audio"] is None:
            return
        maps = self(batch["audio"], batch["video"])
        self.scores.update(maps, batch["mask"], batch["class_index"])
        self.prompts_scored += len(maps)
        self._keep_overlays(batch, maps)

    def on_test_epoch_end(self) -> None:
        self.result = self.scores.compute()
        if self.prompts_scored:
            self.log("test/mAP", self.result.mean_ap)
            self.log("test/mIoU", self.result.mean_iou)

    def _keep_overlays(self, batch: dict, maps: torch.Tensor) -> None:
        room = self.max_overlays - len(self.overlays)
        if room <= 0:
            return
        heat_maps = normalize_maps(maps[:room]).cpu()
        for i, key in enumerate(batch["key"][:room]):
            self.overlays.append(
                Overlay(
                    key=key,
                    class_name=self.class_names[int(batch["class_index"][i])],
                    frame=denormalize_frame(batch["video"][i].float()).cpu(),
                    heat_map=heat_maps[i],
                    mask=batch["mask"][i].cpu(),
                )
            )


def save_overlays(overlays: Sequence[Overlay], directory: Path) -> list[Path]:
    """Write each overlay as `NNN_<key>_<class>.png` (file-name-safe) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, overlay in enumerate(overlays):
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{overlay.key}_{overlay.class_name}")
        path = directory / f"{number:03d}_{name}.png"
        overlay.image().save(path)
        paths.append(path)
    return paths


def evaluate_localization(
    backbone: CAVMAESync,
    prompts: PromptSet,
    batch_size: int = 4,
    num_workers: int = 0,
    overlays: int = 16,
    alignment: str = "clip",
    options: ExtractionOptions | None = None,
    trainer_options: dict | None = None,
    mismatched_sounds: bool = False,
) -> LocalizationModule:
    """Score `prompts` with `backbone` in a Lightning test run; the returned module holds `result`,
    `skipped` (the prompt set's refused rows first) and `overlays`. `options`: how videos are decoded
    (default: `avsync prepare`'s); `trainer_options` override the Trainer's arguments;
    `mismatched_sounds`: the control of `MismatchedSounds` (each source prompted with the next one's
    sounds)."""
    options = options or ExtractionOptions()
    dataset = PromptDataset(prompts.sources, backbone.image_size, backbone.audio_length, alignment, options)
    if mismatched_sounds:
        dataset = MismatchedSounds(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_prompts)
    module = LocalizationModule(backbone, prompts.class_names, overlays=overlays)
    evaluation_trainer(**(trainer_options or {})).test(module, loader, verbose=False)
    module.skipped = list(prompts.rejected) + module.skipped
    return module


def build_parser() -> argparse.ArgumentParser:
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
        "--manifest", type=Path, help="CSV: mask,class and image,audio[,audio_start] or video,frame_time"
    )
    source.add_argument(
        "--synth", type=Path, help="a synthetic set (avsync synth): every frame with its window"
    )
    add("--split", default="test", help="synthetic split: train, test or all (default: %(default)s)")
    add("--out", required=True, type=Path, help="output folder: metrics.json and overlays/")
    add("--classes", type=Path, help="known class names (text, one per line; or a CSV); others are refused")
    add(
        "--audio-start",
        type=float,
        help="seconds into each prompt sound where its window starts (default: centred)",
    )
    add(
        "--mismatched-sounds",
        action="store_true",
        help="control: prompt each source with the next source's sounds (maps that follow the sound "
        "score lower; maps that ignore it score the same)",
    )
    add("--overlays", type=int, default=16, help="overlay pictures to write (default: %(default)s)")
    add("--batch-size", type=int, default=4, help="sources per batch (a synthetic clip is 16 prompts)")
    add("--workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)")
    add(
        "--alignment", choices=("clip", "authors"), default="clip", help="frame-to-window alignment (SPEC §1)"
    )
    add("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: %(default)s)")
    add("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from avsync.checkpoint_io import CheckpointError
    from avsync.loading import load_backbone

    try:
        backbone = load_backbone(args.ckpt)
        if args.manifest is not None:
            classes = read_class_list(args.classes) if args.classes else None
            prompts = read_manifest(args.manifest, classes, args.audio_start)
        else:
            prompts = synth_prompt_set(args.synth, None if args.split == "all" else args.split)
        if args.mismatched_sounds and len(prompts.sources) < 2:
            raise ValueError("--mismatched-sounds needs at least two sources to swap sounds between")
    except (CheckpointError, ValueError, OSError) as error:
        print(f"avsync localize: error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no accelerator banner in a report tool
    module = evaluate_localization(
        backbone,
        prompts,
        batch_size=args.batch_size,
        num_workers=args.workers,
        overlays=args.overlays,
        alignment=args.alignment,
        trainer_options={"accelerator": args.accelerator, "precision": args.precision},
        mismatched_sounds=args.mismatched_sounds,
    )
    for rejection in module.skipped:
        print(f"skipped {rejection.source}: {rejection.reason}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        **module.result.to_json(),
        "prompts": module.prompts_scored,
        "skipped": [rejection.to_json() for rejection in module.skipped],
        "checkpoint": str(args.ckpt),
        "input": {"manifest": str(args.manifest)}
        if args.manifest
        else {"synth": str(args.synth), "split": args.split},
        "protocol": {
            "maps": "cosine(global audio token, visual patch tokens), bilinear to the centre crop",
            "normalization": "min-max per map",
            "iou_thresholds": module.hparams.num_iou_thresholds,
            "sounds": "the next source's (control)" if args.mismatched_sounds else "each source's own",
        },
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    save_overlays(module.overlays, args.out / "overlays")
    if not module.prompts_scored:
        print("avsync localize: nothing could be scored (every input was skipped)", file=sys.stderr)
        return 1
    result = module.result
    print(
        f"mAP {100 * result.mean_ap:.1f}  mIoU {100 * result.mean_iou:.1f}  "
        f"over {module.prompts_scored} prompts, {len(result.per_class)} classes; "
        f"{len(module.skipped)} skipped -> {args.out / 'metrics.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
