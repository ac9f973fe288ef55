"""`AVShardDataModule`: shards written by `avsync prepare`, streamed into Lightning.

Batch contract (what the pretraining and evaluation modules rely on), `B` clips per batch:

| key           | `train` shape              | `eval` shape                   |
|---------------|----------------------------|--------------------------------|
| `audio`       | float32 `(B, L, 128)`      | float32 `(B, T, L, 128)`       |
| `video`       | float32 `(B, 3, H, W)`     | float32 `(B, T, 3, H, W)`      |
| `label`       | float32 multi-hot `(B, C)` or int64 `(B,)` (`label_format`) |
| `key`         | list of `B` clip ids (`str`) |                              |
| `frame_index` | int64 `(B,)`               | int64 `(B, T)`                 |

The train split uses the `train_mode` shape (default `train`: one random frame per clip and its
aligned window) with augmentation; val/test/predict use `eval_mode` (default `eval`: all `T` frames
and windows), without augmentation. Normalization, alignment and windows: `transforms.py`; sample
decoding: `samples.py`; streaming and rank/worker splitting: `pipeline.py`; skipped samples:
`skips.py` (counts in `skipped_samples`, logged by the `LogSkippedSamples` callback).

`image_size` and `audio_length`: `avsync fit|validate|test` links them from the model's backbone
(`link_arguments` in `cli.py`); in Python they default to the attached model's backbone, read in
`setup()`; without a trainer they must be given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from avsync.config_checks import ConfigError, check_count, check_number, is_count
from avsync.data.alignment import AlignmentMode, default_alignment
from avsync.data.pipeline import ShardSet, build_pipeline, fixed_mode_batches, resolve_shards
from avsync.data.samples import ClipDecoder, LabelFormat, SampleShape
from avsync.data.skips import CheckedLoader, SkipCounter
from avsync.data.transforms import (
    AUDIO_MEAN,
    AUDIO_STD,
    AudioAugmentation,
    AudioWindows,
    CenterFrame,
    RandomFrame,
    normalize_batch_video,
)

log = logging.getLogger(__name__)
Split = Literal["train", "val", "test", "predict"]


@dataclass(frozen=True)
class TrainingPlan:
    """One training epoch in numbers (`AVShardDataModule.training_plan`).

    `epoch_clips`: clips drawn per epoch over all ranks; `manifest_clips`: what the manifests list;
    `source`: what sets the epoch (`manifest`, `epoch_length`, or `one pass` over the shards without
    resampling, when `steps_per_epoch` is an estimate: `exact` False)."""

    batch_size: int
    world_size: int
    accumulate_grad_batches: int
    epoch_clips: int | None
    manifest_clips: int | None
    source: str
    steps_per_epoch: int | None
    exact: bool

    @property
    def global_batch(self) -> int:
        """Clips per optimizer step, over all ranks."""
        return self.batch_size * self.world_size * self.accumulate_grad_batches

    def batch_terms(self) -> str:
        terms = f"{self.batch_size} per rank x {self.world_size} rank(s)"
        if self.accumulate_grad_batches > 1:
            terms += f" x {self.accumulate_grad_batches} accumulated"
        return terms

    def describe(self, lr: float | None = None) -> str:
        """The start-up line of a fit."""
        listed = "no manifest" if self.manifest_clips is None else f"manifests: {self.manifest_clips:,} clips"
        clips = "unknown" if self.epoch_clips is None else f"{self.epoch_clips:,}"
        steps = "unknown" if self.steps_per_epoch is None else f"{self.steps_per_epoch:,}"
        steps = steps if self.exact else f"about {steps}"
        rate = "" if lr is None else f", learning rate {lr:g}"
        return (
            f"training: global batch {self.global_batch} ({self.batch_terms()}), {clips} clips per epoch "
            f"(set by {self.source}; {listed}), {steps} optimizer steps per epoch{rate}"
        )


class AVShardDataModule(L.LightningDataModule):
    """Streams `avsync prepare` shards as batches of aligned frame/audio-window pairs.

    Args:
        train_shards, val_shards, test_shards, predict_shards: a prepared directory (with
            manifest.json), a glob, a brace pattern, or several joined by `::` (see `pipeline.py`).
        batch_size: clips per training batch (per device). eval_batch_size: for the other splits
            (default: `batch_size`).
        num_workers: DataLoader worker processes per device.
        image_size, audio_length: model input frame side and window length (spectrogram frames);
            None = the attached model's backbone values.
        num_frames: frames per clip `T` (SPEC §1: 16); the shards must store a multiple of it.
        alignment: `clip` (avsync default) or `authors` (fixed 1024-frame spectrogram), see SPEC §1;
            None = the attached model's (`default_alignment` of its window length, set in `setup`).
        audio_mean, audio_std: spectrogram normalization.
        shuffle_buffer: samples in the training shuffle buffer (per worker).
        resampled: draw training shards with replacement and cut epochs to `epoch_length` samples per
            rank (rounded up to whole batches per worker) - the mode for several devices.
        epoch_length: samples per epoch per rank in resampled mode (default: the manifest's clip
            count divided by the number of ranks, so that an epoch is one pass's worth of clips
            whatever the number of devices and nodes).
        recipe_global_batch: the global batch (clips per optimizer step, over all ranks) that the
            model's learning rate was chosen for; a fit whose global batch differs gets a warning
            (the rate is not scaled: see `training_plan`). None: no check.
        random_resized_crop, crop_scale, crop_ratio, horizontal_flip: training image augmentation.
        freq_mask, time_mask: maximum widths (mel bins, spectrogram frames) of the training
            SpecAugment masks, 0 = off. noise_std: Gaussian noise added to training windows, 0 = off.
        time_shift: roll each training window circularly in time by a random amount (CAV-MAE's random
            time shift, `transforms.random_time_shift`).
        label_format: `multi_hot` float `(C,)` or `index` int64 (single-label datasets).
        num_classes: `C`; default: the manifest's class count.
        train_mode, eval_mode: batch shape of the train split and of the other splits.
        seed: seed of shard and sample shuffling (shared by all ranks).
        pin_memory: pin batches for faster host-to-GPU copies (when the run's device is a CUDA GPU;
            without a trainer, when CUDA is available).
        normalize_on_device: send frames as uint8 pixels and normalize them after the copy to the device
            (`on_after_batch_transfer`): a quarter of the bytes to copy, and the workers spared the work.
            None: on GPU runs. Batches read without a trainer, or with it off, keep the float32 contract.
        max_consecutive_skips: samples skipped in a row (in one DataLoader worker) after which the run
            stops with a one-line error instead of skipping on forever (`skips.py`); None = no bound.
            Raise it for shards with longer runs of bad samples.
        min_audio_frames: fewest spectrogram rows (10 ms each) a clip may have; shorter (or empty) ones
            are skipped, as their windows would be padding only. Spectrograms must also be float
            `(S, mel_bins)` with the model's mel bins, and as long as their metadata records.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        image_size: int | None = None,
        audio_length: int | None = None,
        num_frames: int = 16,
        alignment: AlignmentMode | None = "clip",
        audio_mean: float = AUDIO_MEAN,
        audio_std: float = AUDIO_STD,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        recipe_global_batch: int | None = None,
        random_resized_crop: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (0.9, 1.1),
        horizontal_flip: bool = True,
        freq_mask: int = 0,
        time_mask: int = 0,
        noise_std: float = 0.0,
        time_shift: bool = False,
        label_format: LabelFormat = "multi_hot",
        num_classes: int | None = None,
        train_mode: SampleShape = "train",
        eval_mode: SampleShape = "eval",
        seed: int = 0,
        pin_memory: bool = True,
        normalize_on_device: bool | None = None,
        max_consecutive_skips: int | None = 1000,
        min_audio_frames: int = 100,
    ) -> None:
        super().__init__()
        if alignment not in ("clip", "authors", None):
            raise ValueError(f"alignment must be 'clip', 'authors' or None (the model's), got {alignment!r}")
        if alignment is None and audio_length is not None:  # linked from the model (`avsync test`)
            alignment = default_alignment(audio_length)
        _check_settings(type(self).__name__, locals())  # ConfigError, one line naming the key
        self.save_hyperparameters()
        self.shard_specs: dict[Split, str | None] = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
            "predict": predict_shards,
        }
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.num_frames = num_workers, num_frames
        self.image_size, self.audio_length = image_size, audio_length
        self.alignment, self.audio_mean, self.audio_std = alignment, audio_mean, audio_std
        self.shuffle_buffer, self.resampled, self.epoch_length = shuffle_buffer, resampled, epoch_length
        self.random_resized_crop, self.crop_scale, self.crop_ratio = (
            random_resized_crop,
            tuple(crop_scale),
            tuple(crop_ratio),
        )
        self.horizontal_flip = horizontal_flip
        self.freq_mask, self.time_mask, self.noise_std = freq_mask, time_mask, noise_std
        self.time_shift, self.recipe_global_batch = time_shift, recipe_global_batch
        self.label_format, self.num_classes = label_format, num_classes
        self.train_mode, self.eval_mode = train_mode, eval_mode
        self.seed, self.pin_memory = seed, pin_memory
        self.normalize_on_device = normalize_on_device
        self.max_consecutive_skips, self.min_audio_frames = max_consecutive_skips, min_audio_frames
        self.mel_bins = 128  # the attached model's, in setup()
        self.shards: dict[Split, ShardSet] = {}
        self.skip_counters: dict[Split, SkipCounter] = {}

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        self._model_sizes()
        for split, spec in self.shard_specs.items():
            if spec is not None and split not in self.shards:
                self.shards[split] = _resolve(split, spec)
                self._check_frames(split)
        if self.num_classes is None:
            manifest = next((s.manifest for s in self.shards.values() if s.manifest is not None), None)
            if manifest is None:
                raise ValueError("num_classes is not given and no manifest.json was found beside the shards")
            self.num_classes = _manifest_classes(manifest)
        _, world_size = self._rank_and_world()
        if world_size > 1 and "train" in self.shards and not self.resampled:
            log.warning(
                "training on %d ranks without resampled=True: ranks may get different numbers of batches "
                "and DDP can stall; set resampled=True (and epoch_length)",
                world_size,
            )
        trainer = self.trainer
        if stage == "fit" and "train" in self.shards and getattr(trainer, "datamodule", None) is self:
            self._announce_training_plan(trainer)

    def training_plan(self, world_size: int = 1, accumulate_grad_batches: int = 1) -> TrainingPlan:
        """What an epoch of training is on `world_size` ranks: global batch, clips, optimizer steps
        (`setup` first). A `fit` says it at start-up (one line, with the model's learning rate)."""
        if "train" not in self.shards:
            raise ValueError("training_plan needs train_shards (and setup() first)")
        shards, accumulate = self.shards["train"], max(1, accumulate_grad_batches)
        per_step = self.batch_size * world_size
        if self.resampled:
            _, batches = self._epoch_plan("train", 0, world_size, True)
            source = "epoch_length" if self.epoch_length is not None else "manifest"
            return TrainingPlan(
                self.batch_size, world_size, accumulate, batches * per_step, shards.num_clips, source,
                math.ceil(batches / accumulate), exact=True,
            )  # fmt: skip
        clips = shards.num_clips
        steps = None if clips is None else max(1, clips // per_step // accumulate)
        return TrainingPlan(
            self.batch_size, world_size, accumulate, clips, clips, "one pass", steps, exact=False
        )

    def _announce_training_plan(self, trainer) -> None:
        """The start-up line, and the warning when the global batch is not the recipe's: the learning rate
        is kept as configured, not scaled. The paper gives one point (2e-4 at 512) and no rule, and the
        batch is also the contrastive loss's set of negatives, so no scaling rule reproduces the recipe at
        another batch; the per-rank batch that restores it is named instead."""
        plan = self.training_plan(trainer.world_size, trainer.accumulate_grad_batches)
        hparams = getattr(trainer.lightning_module, "hparams", None) or {}
        lr = hparams.get("lr")
        rank_zero_info(plan.describe(lr))
        wanted = self.recipe_global_batch
        if wanted is None or (plan.global_batch == wanted and plan.accumulate_grad_batches == 1):
            return
        rate = "its learning rate" if lr is None else f"its learning rate {lr:g}"
        ranks = plan.world_size
        if wanted % ranks:
            fix = f"choose devices that divide {wanted} (no per-rank batch gives it on {ranks} ranks)"
        else:
            fix = f"set data.init_args.batch_size to {wanted // ranks} ({wanted} / {ranks} ranks)"
            fix += " and trainer.accumulate_grad_batches to 1" if plan.accumulate_grad_batches > 1 else ""
        rank_zero_warn(
            f"global batch {plan.global_batch} ({plan.batch_terms()}) is not the {wanted} clips the recipe "
            f"set {rate} for; the rate is not scaled (the batch is also the contrastive loss's negatives: "
            f"no rule carries the recipe to another batch). To keep the recipe, {fix}; or set "
            f"model.init_args.lr for this batch yourself."
        )

    def _model_sizes(self) -> None:
        backbone = None
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "lightning_module", None) is not None:
            backbone = getattr(trainer.lightning_module, "backbone", None)
        if self.image_size is None and backbone is not None:
            self.image_size = int(backbone.image_size)
        if self.audio_length is None and backbone is not None:
            self.audio_length = int(backbone.audio_length)
        if backbone is not None and hasattr(backbone, "mel_bins"):
            self.mel_bins = int(backbone.mel_bins)
        if self.image_size is None or self.audio_length is None:
            raise ValueError(
                "image_size and audio_length are needed: give them, or attach a model with a `.backbone` "
                "exposing them (setup() reads them from the trainer's LightningModule)"
            )
        if self.alignment is None:
            self.alignment = default_alignment(self.audio_length)

    def _check_frames(self, split: Split) -> None:
        manifest = self.shards[split].manifest
        if manifest is None:
            return
        stored = int(manifest["preprocessing"]["num_frames"])
        if stored % self.num_frames:
            raise ValueError(
                f"{self.shard_specs[split]} stores {stored} frames per clip; "
                f"num_frames={self.num_frames} must divide it"
            )

    def _check_batch_fits(self, world_size: int) -> None:
        """Refuse a training batch that the data or the epoch cannot fill, before any work: a batch is
        gathered sample by sample, so it would hold the whole stream (resampled: an endless one) in
        memory and never come out."""
        shards = self.shards.get("train")
        if shards is None or shards.num_clips is None:
            return  # without a manifest the data's size is unknown (epoch_length: checked at construction)
        if self.resampled and self.epoch_length is None:
            epoch = math.ceil(shards.num_clips / world_size)
            if self.batch_size > epoch:
                raise ConfigError(
                    f"{type(self).__name__}: batch_size={self.batch_size} is larger than an epoch, {epoch} "
                    f"clips per rank (the manifests' {shards.num_clips} over {world_size} rank(s)); lower "
                    "batch_size or set epoch_length"
                )
        elif not self.resampled and self.batch_size > shards.num_clips:
            raise ConfigError(
                f"{type(self).__name__}: batch_size={self.batch_size} is larger than the training data, "
                f"{shards.num_clips} clips in {self.shard_specs['train']}"
            )

    def _device_type(self) -> str:
        """The run's device type (`cuda`, `cpu`, ...); without a trainer, `cuda` where it is available."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def pixels_on_device(self) -> bool:
        """Whether batches carry uint8 frames, normalized on the device (`normalize_on_device`)."""
        if self.trainer is None:
            return False  # read without a trainer: nothing would normalize them
        if self.normalize_on_device is None:
            return self.trainer.strategy.root_device.type != "cpu"
        return self.normalize_on_device

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Frames sent as uint8 are normalized here, on the device, for every task module."""
        return normalize_batch_video(batch)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- loaders -------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        """The validation clips, or no loader at all (validation is skipped) without `val_shards`."""
        return self._loader("val") if self.shard_specs["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def full_pass_dataloader(self, split: Split) -> DataLoader:
        """Every clip of `split` once (this rank's shards), unshuffled, the last batch partial, decoded
        as for evaluation (all T pairs, no augmentation): for one-off passes such as caching features
        of the training clips, which the training loader would shuffle, augment and cut to whole batches."""
        if split == "train" and self.time_shift:
            rank_zero_warn(
                "time_shift=True does not apply to a full pass over the training clips (no augmentation "
                "does; e.g. features cached for a probe): they are read unshifted"
            )
        return self._loader(split, full_pass=True)

    @property
    def skipped_samples(self) -> dict[str, int]:
        """Samples skipped so far on this rank, per split (summed over DataLoader workers)."""
        return {split: counter.count for split, counter in self.skip_counters.items()}

    def decoder(self, split: Split, full_pass: bool = False) -> ClipDecoder:
        """The sample decoder of `split` (train: augmentation and random frames; others, and any split
        in a full pass: neither)."""
        training = split == "train" and not full_pass
        shape = self.train_mode if training else self.eval_mode
        if training:
            image_transform = RandomFrame(
                self.image_size,
                self.random_resized_crop,
                self.crop_scale,
                self.crop_ratio,
                self.horizontal_flip,
            )
            augmentation = AudioAugmentation(self.freq_mask, self.time_mask, self.noise_std, self.time_shift)
        else:
            image_transform, augmentation = CenterFrame(self.image_size), None
        return ClipDecoder(
            shape=shape,
            num_frames=self.num_frames,
            image_size=self.image_size,
            image_transform=image_transform,
            audio_windows=AudioWindows(
                self.num_frames, self.audio_length, self.alignment, self.audio_mean, self.audio_std
            ),
            audio_augmentation=augmentation,
            random_frame=training,
            label_format=self.label_format,
            num_classes=self.num_classes or 0,
            pixels=True,  # `collate` normalizes whole batches
            mel_bins=self.mel_bins,
            min_audio_frames=self.min_audio_frames,
        )

    def pipeline(
        self, split: Split, rank: int | None = None, world_size: int | None = None, full_pass: bool = False
    ):
        """The webdataset pipeline of `split` for one rank (default: this process's rank), yielding
        batches; meant for a DataLoader with this module's `num_workers` (its length assumes them).
        `full_pass`: see :meth:`full_pass_dataloader`."""
        if split not in self.shards:
            if self.shard_specs.get(split) is None:
                raise ValueError(f"no {split}_shards were given")
            self.setup()
        if rank is None or world_size is None:
            rank, world_size = self._rank_and_world()
        training = split == "train" and not full_pass
        batches_per_worker, length = self._epoch_plan(split, rank, world_size, training)
        pipeline = build_pipeline(
            self.shards[split].urls,
            self.decoder(split, full_pass),
            batch_size=self.batch_size if training else self.eval_batch_size,
            handler=self.skip_counters.setdefault(
                split, SkipCounter(split, self.num_workers, self.max_consecutive_skips)
            ),
            rank=rank,
            world_size=world_size,
            shuffle=training,
            shuffle_buffer=self.shuffle_buffer,
            resampled=training and self.resampled,
            batches_per_worker=batches_per_worker,
            partial=not training,
            seed=self.seed,
            normalize_pixels=not self.pixels_on_device,
        )
        return pipeline if length is None else pipeline.with_length(length, silent=True)

    def _epoch_plan(
        self, split: Split, rank: int, world_size: int, training: bool
    ) -> tuple[int | None, int | None]:
        """`(batches per worker, batches per rank)` where they are known exactly.

        Resampled training: the fixed epoch, `epoch_length` samples rounded up to whole batches on every
        worker. Evaluation splits with a manifest: what this rank's shards hold. Fixed-mode training:
        unknown (the shuffled shard order decides how many incomplete batches are dropped).
        """
        shards = self.shards[split]
        workers = max(1, self.num_workers)
        if training:  # the first use of the training batch size (fit's set-up, or its loader)
            self._check_batch_fits(world_size)
        if training and self.resampled:
            samples = self.epoch_length
            if samples is None:
                if shards.num_clips is None:
                    raise ValueError("resampled=True needs epoch_length when the shards have no manifest")
                samples = math.ceil(shards.num_clips / world_size)
            batches_per_worker = max(1, math.ceil(samples / (self.batch_size * workers)))
            return batches_per_worker, batches_per_worker * workers
        if not training and shards.clips_per_shard is not None:
            counts = shards.clips_per_shard
            return None, fixed_mode_batches(
                counts, rank, world_size, self.num_workers, self.eval_batch_size, True
            )
        return None, None

    def _loader(self, split: Split, full_pass: bool = False) -> DataLoader:
        pipeline = self.pipeline(split, full_pass=full_pass)
        return CheckedLoader(  # skips bounded: a split without usable data ends the run (skips.py)
            pipeline,
            skips=self.skip_counters[split],
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and split in ("train", "val") and not full_pass,
            pin_memory=self.pin_memory and self._device_type() == "cuda",
        )


def _check_settings(owner: str, settings: dict) -> None:
    """Refuse, at construction, values no run can use (`ConfigError` naming the key): they used to
    surface as tracebacks deep in a run, or be accepted silently (a negative `epoch_length`)."""
    for name, minimum in [("batch_size", 1), ("num_workers", 0), ("num_frames", 1), ("shuffle_buffer", 0)]:
        check_count(owner, name, settings[name], minimum)
    for name, minimum in [("freq_mask", 0), ("time_mask", 0), ("min_audio_frames", 1)]:
        check_count(owner, name, settings[name], minimum)
    for name in ("eval_batch_size", "image_size", "audio_length", "epoch_length", "num_classes"):
        check_count(owner, name, settings[name], 1, optional=True)
    for name in ("max_consecutive_skips", "recipe_global_batch"):
        check_count(owner, name, settings.get(name), 1, optional=True)
    check_number(owner, "audio_mean", settings["audio_mean"])
    check_number(owner, "audio_std", settings["audio_std"], 0, low_open=True)
    check_number(owner, "noise_std", settings["noise_std"], 0)
    low, high = settings["crop_scale"]
    check_number(owner, "crop_scale", low, 0, 1, low_open=True)
    check_number(owner, "crop_scale", high, low, 1)
    low, high = settings["crop_ratio"]
    check_number(owner, "crop_ratio", low, 0, low_open=True)
    check_number(owner, "crop_ratio", high, low)
    length = settings["epoch_length"]
    if settings["resampled"] and length is not None and settings["batch_size"] > length:
        raise ConfigError(
            f"{owner}: batch_size={settings['batch_size']} is larger than an epoch, epoch_length={length} "
            "clips per rank; lower batch_size or raise epoch_length"
        )


def _manifest_classes(manifest: dict) -> int:
    """The class count of a manifest, checked before it sizes every sample's label vector: a count that
    agrees with the manifest's class list (`avsync prepare` writes both)."""
    classes = manifest.get("classes")
    listed = len(classes) if isinstance(classes, list) else None
    count = manifest.get("num_classes", listed)
    if not is_count(count, 0) or (listed is not None and count != listed):
        raise ConfigError(
            f"the shards' manifest.json has num_classes={count!r} and lists {listed} classes: not a class "
            "count that agrees with its class list; fix the manifest or give num_classes"
        )
    return count


def _resolve(split: str, spec: str) -> ShardSet:
    """`resolve_shards`, where a specification naming no shards is reported as the setting it came from
    (`ConfigError`: one line, exit 2), at set-up rather than when built: a config may name shards that are
    written between the two."""
    try:
        return resolve_shards(spec)
    except FileNotFoundError as error:
        raise ConfigError(f"AVShardDataModule: {split}_shards: {error}") from None
