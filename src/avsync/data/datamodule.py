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
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from avsync.data.alignment import AlignmentMode
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
        alignment: `clip` (avsync default) or `authors` (fixed 1024-frame spectrogram), see SPEC §1.
        audio_mean, audio_std: spectrogram normalization.
        shuffle_buffer: samples in the training shuffle buffer (per worker).
        resampled: draw training shards with replacement and cut epochs to `epoch_length` samples per
            rank (rounded up to whole batches per worker) - the mode for several devices.
        epoch_length: samples per epoch per rank in resampled mode (default: the manifest's clip
            count divided by the number of ranks).
        random_resized_crop, crop_scale, crop_ratio, horizontal_flip: training image augmentation.
        freq_mask, time_mask: maximum widths (mel bins, spectrogram frames) of the training
            SpecAugment masks, 0 = off. noise_std: Gaussian noise added to training windows, 0 = off.
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
        alignment: AlignmentMode = "clip",
        audio_mean: float = AUDIO_MEAN,
        audio_std: float = AUDIO_STD,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        random_resized_crop: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (0.9, 1.1),
        horizontal_flip: bool = True,
        freq_mask: int = 0,
        time_mask: int = 0,
        noise_std: float = 0.0,
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
        if alignment not in ("clip", "authors"):
            raise ValueError(f"alignment must be 'clip' or 'authors', got {alignment!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch sizes must be positive")
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
                self.shards[split] = resolve_shards(spec)
                self._check_frames(split)
        if self.num_classes is None:
            manifest = next((s.manifest for s in self.shards.values() if s.manifest is not None), None)
            if manifest is None:
                raise ValueError("num_classes is not given and no manifest.json was found beside the shards")
            self.num_classes = int(manifest.get("num_classes", len(manifest.get("classes", []))))
        _, world_size = self._rank_and_world()
        if world_size > 1 and "train" in self.shards and not self.resampled:
            log.warning(
                "training on %d ranks without resampled=True: ranks may get different numbers of batches "
                "and DDP can stall; set resampled=True (and epoch_length)",
                world_size,
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
            augmentation = AudioAugmentation(self.freq_mask, self.time_mask, self.noise_std)
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
