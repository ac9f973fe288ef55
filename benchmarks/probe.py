"""Benchmark 3b: a linear-probing epoch with and without the feature cache, in real Lightning runs.

Without the cache every training step runs the frozen backbone over the batch's clips (`T` = 16 pairs
each); with it (`CachedFeatureDataModule`) the backbone runs once, in the set-up of the first fit, and
every epoch trains the head on features held in memory. Both runs use the same backbone, head, clips,
batch size and precision; the ratio of their epoch times is the point.
"""

from __future__ import annotations

import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from avsync.model import CAVMAESync
from avsync.tasks.probe import ProbeModule
from avsync.tasks.probe.data import CachedFeatureDataModule
from benchmarks.harness import peak_rss_mib


class RandomClips(Dataset):
    """Eval-mode clips of random inputs, the same ones for a given index (made on the fly)."""

    def __init__(self, count: int, frames: int, audio_length: int, image_size: int, num_classes: int):
        self.count, self.frames = count, frames
        self.audio_length, self.image_size, self.num_classes = audio_length, image_size, num_classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {
            "audio": torch.randn(self.frames, self.audio_length, 128, generator=generator),
            "video": torch.randn(self.frames, 3, self.image_size, self.image_size, generator=generator),
            "label": torch.tensor(index % self.num_classes),
            "key": f"clip{index:06d}",
        }


class ClipData(L.LightningDataModule):
    """The clips as a training split (the probe's source; plain attributes identify it to the cache)."""

    def __init__(
        self, clips: int, frames: int, audio_length: int, image_size: int, num_classes: int, batch_size: int
    ):
        super().__init__()
        self.clips, self.frames, self.batch_size = clips, frames, batch_size
        self.audio_length, self.image_size, self.num_classes = audio_length, image_size, num_classes

    def train_dataloader(self) -> DataLoader:
        dataset = RandomClips(self.clips, self.frames, self.audio_length, self.image_size, self.num_classes)
        return DataLoader(dataset, batch_size=self.batch_size)


class EpochTimer(L.Callback):
    """Wall time of every training epoch."""

    def __init__(self):
        self.seconds: list[float] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def _fit(
    module: ProbeModule, data: L.LightningDataModule, epochs: int, precision: str, root: str
) -> tuple[EpochTimer, float]:
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=root, callbacks=[timer],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return timer, time.perf_counter() - started


def probing_epochs(
    preset: str = "vitb",
    clips: int = 8,
    batch_size: int = 4,
    frames: int = 16,
    cached_epochs: int = 5,
    num_classes: int = 309,
    precision: str = "bf16-mixed",
) -> dict:
    torch.manual_seed(0)
    backbone = CAVMAESync.from_preset(preset)
    options = dict(
        task="multiclass", num_classes=num_classes, modality="audio_visual", lr=1e-3, warmup_epochs=0
    )
    clip_data = dict(
        clips=clips, frames=frames, audio_length=backbone.audio_length, image_size=backbone.image_size,
        num_classes=num_classes, batch_size=batch_size,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        uncached, _ = _fit(ProbeModule(backbone, **options), ClipData(**clip_data), 1, precision, root)
        cached_data = CachedFeatureDataModule(
            ClipData(**clip_data), cache_dir=f"{root}/cache", batch_size=batch_size
        )
        cached, fit_seconds = _fit(
            ProbeModule(backbone, **options), cached_data, cached_epochs, precision, root
        )
    epoch_without = uncached.seconds[0]
    later = sorted(cached.seconds[1:] or cached.seconds)  # the first epoch pays for allocator warm-up
    epoch_with = later[len(later) // 2]
    return {
        "preset": preset,
        "clips": clips,
        "batch_size": batch_size,
        "pairs_per_clip": frames,
        "precision": precision,
        "epoch_without_cache_s": round(epoch_without, 3),
        "epoch_with_cache_s": round(epoch_with, 4),
        "cached_epochs_s": [round(s, 4) for s in cached.seconds],
        "cache_build_s": round(fit_seconds - sum(cached.seconds), 2),
        "speedup": round(epoch_without / epoch_with, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
