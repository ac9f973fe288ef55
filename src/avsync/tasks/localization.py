"""Sound-prompted segmentation (paper §3.5.3, SPEC §4): where in a frame is the sound coming from?

The heat map of an (image, sound) pair is the cosine similarity of the sound's global audio token with
each visual patch token of the image, laid out on the patch grid (14x14 at ViT-B). The maps are scored
with DenseAV's protocol (`avsync.evaluation.localization`, `docs/localization.md`): normalized with
the whole set's min and max on the grid, then bilinearly upsampled to the masks, which sit on the model
input (`image_size` square, the centre crop of the evaluation transform; see `localization_data.py`).

One run, two ways to start it:

    avsync test --config configs/localization/synth_tiny.yaml --model.init_args.backbone_checkpoint CKPT
    avsync localize --ckpt CKPT --synth data/synth --split test --out results/      # the short form
    avsync localize --ckpt CKPT --manifest ade20k_sound.csv --out results/

Both build a `LocalizationModule` and a `LocalizationDataModule` and run `trainer.test`; the module
writes `metrics.json` (mAP, mIoU, per class, skipped inputs) and `overlays/*.png` (image | heat map |
mask) into its `output_dir`.
"""

from __future__ import annotations

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

from avsync.checkpoints import resolve_backbone
from avsync.config_checks import check_count
from avsync.data.clip import ExtractionOptions
from avsync.evaluation.localization import (
    NUM_IOU_THRESHOLDS,
    LocalizationResult,
    LocalizationScores,
    Normalization,
    check_normalization,
    normalize_maps,
    upsample_maps,
)
from avsync.model import CAVMAESync
from avsync.model.patch_readout import PatchReadout, check_patch_readout, video_patch_features
from avsync.output_paths import check_output_folder
from avsync.tasks.evaluation_trainer import evaluation_trainer
from avsync.tasks.localization_data import (
    LocalizationDataModule,
    PromptSet,
    Rejection,
)
from avsync.tasks.visualize import denormalize_frame
from avsync.tools import Localize, matching

__all__ = [
    "LocalizationDataModule",
    "LocalizationModule",
    "Overlay",
    "control_figure",
    "evaluate_localization",
    "similarity_maps",
    "sound_prompted_maps",
]


def similarity_maps(
    global_audio: torch.Tensor,
    patches_video: torch.Tensor,
    grid: tuple[int, int],
    shared_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine similarity of `global_audio` `(B, D)` with each of `patches_video` `(B, h*w, D)` (row-major
    patches), laid out on the patch grid: `(B, h, w)`. Upsampling happens at scoring time
    (`avsync.evaluation.localization.upsample_maps`), after normalization, as in DenseAV.

    `shared_prompt` `(D,)`: CLIP Surgery's feature surgery. The mean of the *normalized* prompts is
    subtracted from each normalized prompt, which subtracts from every map the mean map over all prompts
    (the cosine is linear in the normalized prompt): what every sound lights up is removed."""
    audio = F.normalize(global_audio.float(), dim=-1)
    if shared_prompt is not None:
        audio = audio - shared_prompt.to(audio)
    patches = F.normalize(patches_video.float(), dim=-1)
    return rearrange(torch.einsum("bd,bnd->bn", audio, patches), "b (h w) -> b h w", h=grid[0], w=grid[1])


@torch.no_grad()
def sound_prompted_maps(
    backbone: CAVMAESync,
    audio: torch.Tensor,
    video: torch.Tensor,
    patch_readout: PatchReadout = "patch_tokens",
    shared_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grid heat maps `(B, h, w)` of normalized audio windows `(B, L, mel)` on frames `(B, 3, S, S)`;
    `patch_readout` chooses the visual features (`avsync.model.patch_readout`; the paper's:
    `patch_tokens`), `shared_prompt` applies the feature surgery of :func:`similarity_maps`."""
    global_audio = backbone.encode(audio=audio).global_audio
    patches = video_patch_features(backbone, video, patch_readout)
    return similarity_maps(global_audio, patches, backbone.video_tokenizer.grid, shared_prompt)


@dataclass
class Overlay:
    """One prompt kept for a picture: the model input frame, its heat map as scored and the mask."""

    key: str
    class_name: str
    frame: torch.Tensor  # (3, S, S) RGB in [0, 1]
    heat_map: torch.Tensor  # (S, S), normalized as the metric does (in [0, 1] unless normalization none)
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

    After the test epoch: `result` (a `LocalizationResult`), `skipped` (refused manifest rows and
    sources that failed to decode), `overlays` (the first `overlays` prompts scored), `test/mAP` and
    `test/mIoU` logged, and with `output_dir` its `metrics.json` and `overlays/` written (rank 0).

    Args:
        backbone / backbone_checkpoint (+ authors_kwargs): the frozen model, given or loaded from a file
            (`avsync.checkpoints.load_backbone`, as retrieval and probing do).
        class_names: names of the class indices the batches carry; default: the data module's.
        patch_readout: the visual features the audio token is compared with (`patch_tokens`, the
            paper's; `global_readout` or `self_attention`: see `avsync.model.patch_readout`).
        prompt_surgery: subtract the mean of all the set's normalized prompts from each prompt (CLIP
            Surgery): what every sound lights up is removed. The maps are then made at the end of the
            test epoch, once the mean over every prompt (all ranks) is known.
        normalization: `dataset` (DenseAV: one min and max over all maps), `per_image` or `none`.
        num_iou_thresholds: thresholds of the best-IoU search (DenseAV: 20).
        overlays: how many prompts to keep for pictures.
        output_dir: where `metrics.json` and `overlays/` go; None = keep the results in memory only.
        backbone_config: builds an untrained backbone of this config (how a saved module reloads).
    """

    def __init__(
        self,
        backbone: CAVMAESync | None = None,
        backbone_checkpoint: str | None = None,
        authors_kwargs: dict | None = None,
        class_names: Sequence[str] | None = None,
        patch_readout: PatchReadout = "patch_tokens",
        prompt_surgery: bool = False,
        normalization: Normalization = "dataset",
        num_iou_thresholds: int = NUM_IOU_THRESHOLDS,
        overlays: int = 16,
        output_dir: str | None = None,
        backbone_config: dict | None = None,
    ) -> None:
        super().__init__()
        check_patch_readout(patch_readout)
        check_normalization(normalization)
        check_count("LocalizationModule", "num_iou_thresholds", num_iou_thresholds, 1)  # ConfigError
        check_count("LocalizationModule", "overlays", overlays, 0)
        output = None if output_dir is None else check_output_folder(output_dir, "output_dir")
        backbone = resolve_backbone(
            backbone, backbone_checkpoint, authors_kwargs, backbone_config=backbone_config
        )
        self.backbone = backbone.eval().requires_grad_(False)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone_config"] = dict(backbone.config)
        self.class_names = None if class_names is None else list(class_names)
        self.patch_readout, self.prompt_surgery = patch_readout, prompt_surgery
        self.normalization = normalization
        self.scores = LocalizationScores(self.class_names, num_iou_thresholds, normalization)
        self.max_overlays = overlays
        self.output_dir = output
        self.result: LocalizationResult | None = None
        self.skipped: list[Rejection] = []
        self.overlays: list[Overlay] = []
        self.prompts_scored = 0
        self._kept: list[dict] = []  # the first prompts, their features (maps are made at epoch end)
        self._deferred: list[tuple[torch.Tensor, ...]] = []  # prompt_surgery: scored at epoch end

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if self.class_names is None:
            if datamodule is None or not hasattr(datamodule, "class_names"):
                raise ValueError("LocalizationModule needs class_names, or a LocalizationDataModule to read")
            self.class_names = list(datamodule.class_names)
        self.scores.class_names = self.class_names

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return sound_prompted_maps(self.backbone, audio, video, self.patch_readout)

    def on_test_epoch_start(self) -> None:
        self.backbone.eval()
        self.scores.reset()
        self.result, self.skipped, self.overlays, self.prompts_scored = None, [], [], 0
        self._kept, self._deferred = [], []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.skipped.extend(Rejection(*rejection) for rejection in batch["skipped"])
        if batch["audio"] is None:
            return
        prompts = F.normalize(self.backbone.encode(audio=batch["audio"]).global_audio.float(), dim=-1)
        patches = video_patch_features(self.backbone, batch["video"], self.patch_readout)
        patches = F.normalize(patches.float(), dim=-1)
        scored = (prompts, patches, batch["mask"], batch["class_index"])
        if self.prompt_surgery:
            self._deferred.append(scored)
        else:
            self._score(*scored)
        self.prompts_scored += len(prompts)
        self._keep_overlays(batch, prompts, patches)

    def _score(self, prompts, patches, masks, classes, shared_prompt=None) -> None:
        maps = similarity_maps(prompts, patches, self.backbone.video_tokenizer.grid, shared_prompt)
        self.scores.update(maps, masks, classes)

    def shared_prompt(self) -> torch.Tensor | None:
        """The mean normalized prompt over every prompt of the test epoch, on all ranks."""
        if not self.prompt_surgery:
            return None
        dim = self.backbone.embed_dim
        total = sum((prompts.sum(0) for prompts, *_ in self._deferred), torch.zeros(dim, device=self.device))
        count = torch.tensor(float(sum(len(prompts) for prompts, *_ in self._deferred)), device=self.device)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return total / count.clamp_min(1)

    def on_test_epoch_end(self) -> None:
        shared_prompt = self.shared_prompt()
        for scored in self._deferred:
            self._score(*scored, shared_prompt)
        self._deferred = []
        limits = self.scores.limits()
        self.result = self.scores.compute()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        self.skipped = list(getattr(datamodule, "rejected", [])) + self.skipped
        self.overlays = [self._overlay(kept, limits, shared_prompt) for kept in self._kept]
        if self.prompts_scored:
            self.log("test/mAP", self.result.mean_ap)
            self.log("test/mIoU", self.result.mean_iou)
        if self.output_dir is not None and self.global_rank == 0:
            self.write_outputs(self.output_dir)

    def report(self) -> dict:
        """`metrics.json`: the result, what was scored and skipped, and the protocol."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        sounds = "each source's own"
        if getattr(datamodule, "mismatched_sounds", False):
            sounds = "the next source's (control)"
        return {
            **self.result.to_json(),
            "prompts": self.prompts_scored,
            "skipped": [rejection.to_json() for rejection in self.skipped],
            "checkpoint": self.hparams.backbone_checkpoint,
            "input": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "protocol": {
                "maps": f"cosine of the global audio token with each patch's {self.patch_readout} features"
                + (", minus the mean over all prompts (prompt surgery)" if self.prompt_surgery else "")
                + ", on the grid",
                "normalization": {
                    "dataset": "one min and one max over all maps (DenseAV), on the patch grid",
                    "per_image": "min-max per map, on the patch grid",
                    "none": "none",
                }[self.normalization],
                "upsampling": "bilinear to the masks, after normalization",
                "masks": "nearest-neighbour resize of the short side, centre crop",
                "ap": "torchmetrics binary_average_precision over each class's pooled pixels",
                "iou_thresholds": self.hparams.num_iou_thresholds,
                "sounds": sounds,
            },
        }

    def write_outputs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "metrics.json").write_text(json.dumps(self.report(), indent=1) + "\n")
        save_overlays(self.overlays, directory / "overlays")

    def _keep_overlays(self, batch: dict, prompts: torch.Tensor, patches: torch.Tensor) -> None:
        room = self.max_overlays - len(self._kept)
        for i, key in enumerate(batch["key"][: max(room, 0)]):
            self._kept.append(
                {
                    "key": key,
                    "class_index": int(batch["class_index"][i]),
                    "frame": denormalize_frame(batch["video"][i].float()).cpu(),
                    "prompt": prompts[i : i + 1],
                    "patches": patches[i : i + 1],
                    "mask": batch["mask"][i].cpu(),
                }
            )

    def _overlay(
        self, kept: dict, limits: tuple[float, float] | None, shared_prompt: torch.Tensor | None
    ) -> Overlay:
        """The kept prompt with its map normalized as scored (the whole set's range for `dataset`)."""
        grid = similarity_maps(
            kept["prompt"], kept["patches"], self.backbone.video_tokenizer.grid, shared_prompt
        ).cpu()
        grid = normalize_maps(grid, self.normalization, limits)
        return Overlay(
            key=kept["key"],
            class_name=self.class_names[kept["class_index"]],
            frame=kept["frame"],
            heat_map=upsample_maps(grid, tuple(kept["mask"].shape))[0],
            mask=kept["mask"],
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


def control_figure(
    matched: Sequence[Overlay], mismatched: Sequence[Overlay], classes: int = 4, min_height: int = 96
) -> Image.Image:
    """One row per class, for the first prompt of each of the first `classes` classes that shows its
    object: image | mask | map prompted with its own sound | map prompted with another clip's sound
    (the `mismatched_sounds` control, whose overlays hold the same images in the same order). Maps that
    follow the sound light the object in the third column only."""
    if [o.key for o in matched] != [o.key for o in mismatched]:
        raise ValueError("the matched and mismatched overlays must be the same prompts, in order")
    rows, seen = [], set()
    for own, other in zip(matched, mismatched, strict=True):
        if own.class_name in seen or not own.mask.any():
            continue
        seen.add(own.class_name)
        frame = own.frame.permute(1, 2, 0).numpy()
        mask = np.repeat(own.mask.numpy()[..., None].astype(np.float32), 3, axis=-1)
        maps = [matplotlib.colormaps["jet"](o.heat_map.numpy())[..., :3] for o in (own, other)]
        gap = np.ones((frame.shape[0], 2, 3), dtype=np.float32)
        panels = [frame, gap, mask, gap, 0.5 * frame + 0.5 * maps[0], gap, 0.5 * frame + 0.5 * maps[1]]
        rows.append(np.concatenate(panels, axis=1))
        rows.append(np.ones((2, rows[-1].shape[1], 3), dtype=np.float32))
        if len(seen) == classes:
            break
    if not rows:
        raise ValueError("no overlay shows an object to compare")
    picture = Image.fromarray((np.concatenate(rows[:-1]) * 255).round().clip(0, 255).astype(np.uint8))
    scale = -(-min_height // matched[0].frame.shape[-1])
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


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
    patch_readout: PatchReadout = "patch_tokens",
    prompt_surgery: bool = False,
    normalization: Normalization = "dataset",
    output_dir: str | None = None,
) -> LocalizationModule:
    """Score `prompts` with `backbone` in a Lightning test run (the run `avsync test --config
    configs/localization/...` makes, from Python); the returned module holds `result`, `skipped` (the
    prompt set's refused rows first) and `overlays`. `options`: how videos are decoded (default:
    `avsync prepare`'s); `trainer_options` override the Trainer's arguments; `mismatched_sounds`: the
    control of `MismatchedSounds` (each source prompted with the next one's sounds); `patch_readout`,
    `prompt_surgery`: the map (`LocalizationModule`)."""
    data = LocalizationDataModule.from_prompts(
        prompts,
        batch_size=batch_size,
        num_workers=num_workers,
        alignment=alignment,
        mismatched_sounds=mismatched_sounds,
    )
    data.options = options or ExtractionOptions()
    module = LocalizationModule(
        backbone,
        class_names=prompts.class_names,
        patch_readout=patch_readout,
        prompt_surgery=prompt_surgery,
        normalization=normalization,
        overlays=overlays,
        output_dir=output_dir,
    )
    evaluation_trainer(**(trainer_options or {})).test(module, datamodule=data, verbose=False)
    return module


def run_localize(options: Localize) -> int:
    """`avsync localize`: the short form of `avsync test --config configs/localization/...`; it builds
    the same `LocalizationModule` and `LocalizationDataModule` and runs `trainer.test` with a progress bar."""
    from avsync.checkpoints import CheckpointError

    try:
        check_output_folder(options.out)  # before the model is read and the inputs scored
        data = LocalizationDataModule(**matching(options, LocalizationDataModule))
        paths = {"backbone_checkpoint": str(options.ckpt), "output_dir": str(options.out)}
        module = LocalizationModule(**matching(options, LocalizationModule, **paths))
        data.prompts  # noqa: B018 - read the manifest here: its errors are reported in one line
    except (CheckpointError, ValueError, OSError) as error:
        print(f"avsync localize: error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no accelerator banner in a report tool
    trainer = evaluation_trainer(
        accelerator=options.accelerator, precision=options.precision, enable_progress_bar=True
    )
    trainer.test(module, datamodule=data, verbose=False)
    for rejection in module.skipped:
        print(f"skipped {rejection.source}: {rejection.reason}", file=sys.stderr)
    if not module.prompts_scored:
        print("avsync localize: nothing could be scored (every input was skipped)", file=sys.stderr)
        return 1
    result = module.result
    print(
        f"mAP {100 * result.mean_ap:.1f}  mIoU {100 * result.mean_iou:.1f}  "
        f"over {module.prompts_scored} prompts, {len(result.per_class)} classes; "
        f"{len(module.skipped)} skipped -> {options.out / 'metrics.json'}"
    )
    return 0
