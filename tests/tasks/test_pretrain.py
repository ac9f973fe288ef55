"""PretrainModule in real Lightning Trainer runs on CPU (in-memory data until shards are used)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, Dataset

from avsync.data.transforms import normalize_pixels
from avsync.kernels import chooses_kernels
from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule
from avsync.tasks.pretrain import in_batch_recall_at_1, warmup_cosine
from avsync.training.kernels import KernelChoice
from avsync.training.throughput import ThroughputMonitor

SMALL = dict(
    image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=1,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip


class PairedClips(Dataset):
    """Clips whose audio and frames share a class-dependent pattern, so that alignment is learnable."""

    def __init__(self, clips: int, frames: int | None = None, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.classes = torch.randint(0, 4, (clips,), generator=generator)
        self.audio_patterns = torch.randn(4, 32, 32, generator=generator)
        self.video_patterns = torch.randn(4, 3, 32, 32, generator=generator)
        self.frames = frames
        self.noise = generator

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> dict:
        c = self.classes[index]
        shape = () if self.frames is None else (self.frames,)
        audio = self.audio_patterns[c].expand(*shape, 32, 32) + 0.1 * torch.randn(*shape, 32, 32)
        video = self.video_patterns[c].expand(*shape, 3, 32, 32) + 0.1 * torch.randn(*shape, 3, 32, 32)
        return {"audio": audio, "video": video, "label": c, "key": f"clip{index}"}


def trainer(tmp_path, **overrides) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    return L.Trainer(**{**options, **overrides})


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    values = [warmup_cosine(step, 4, 20, 0.1) for step in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))
    assert values[-1] == pytest.approx(0.1)


def test_in_batch_recall_uses_the_diagonal_of_each_clip():
    audio = torch.nn.functional.normalize(torch.randn(5, 4, 8), dim=-1)
    assert in_batch_recall_at_1(audio, audio)["video_to_audio"] == 1.0
    shuffled = audio[:, torch.tensor([1, 2, 3, 0])]  # same tokens, other time steps: diagonal breaks
    assert in_batch_recall_at_1(audio, shuffled)["video_to_audio"] < 1.0


def test_fit_logs_every_term_writes_a_checkpoint_and_resumes(tmp_path):
    module = PretrainModule(CAVMAESync(**SMALL), lr=1e-3, warmup_epochs=1, log_images_every_n_steps=2)
    train = DataLoader(PairedClips(32), batch_size=8, shuffle=True)
    val = DataLoader(PairedClips(16, frames=4, seed=1), batch_size=8)
    throughput = ThroughputMonitor(window_size=2)
    run = trainer(
        tmp_path,
        callbacks=[LearningRateMonitor(logging_interval="step"), throughput, KernelChoice()],
        log_every_n_steps=2,
    )
    run.fit(module, train, val)
    metrics = run.callback_metrics
    for name in ("train/reconstruction_audio", "train/contrastive", "val/loss", "val/video_to_audio_R1"):
        assert name in metrics, name
    assert run.global_step == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.logger.log_dir)).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {
        "train/lr",
        "train/device/samples_per_sec",
        "train/contrastive_accuracy",
        "val/audio_to_video_R1",
    } <= scalars
    assert {"reconstruction/frame", "reconstruction/spectrogram"} <= images
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warm-up, then decay
    # samples are counted on every step, the clock read (and the device synchronized) every 2nd
    assert [e.value for e in events.Scalars("train/samples")] == [16.0, 32.0, 48.0, 64.0]
    assert list(throughput._throughputs[RunningStage.TRAINING]._batches) == [6, 8]  # timed: logging steps
    # the run's kernels are chosen by measurement (`avsync fit` adds KernelChoice to every run)
    assert chooses_kernels(module.backbone)

    checkpoint = run.checkpoint_callback.best_model_path or run.checkpoint_callback.last_model_path
    assert checkpoint
    resumed_module = PretrainModule(CAVMAESync(**SMALL), lr=1e-3, warmup_epochs=0.5)
    resumed = trainer(tmp_path / "resume", max_epochs=3)
    resumed.fit(resumed_module, train, val, ckpt_path=checkpoint)
    assert resumed.global_step == 12
    assert resumed.optimizers[0].state_dict()["state"], "optimizer state was restored and stepped"


def test_reloading_a_checkpoint_rebuilds_the_backbone(tmp_path):
    module = PretrainModule(CAVMAESync(**SMALL))
    run = trainer(tmp_path, max_epochs=1)
    run.fit(module, DataLoader(PairedClips(8), batch_size=4))
    path = tmp_path / "model.ckpt"
    run.save_checkpoint(path)
    reloaded = PretrainModule.load_from_checkpoint(path, weights_only=True)
    assert reloaded.backbone.config == module.backbone.config
    for a, b in zip(reloaded.state_dict().values(), module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_pretraining_learns_the_correspondence(tmp_path):
    torch.manual_seed(0)
    module = PretrainModule(CAVMAESync(**SMALL), lr=2e-3, warmup_epochs=1)
    data = PairedClips(64)
    before = module.backbone.pretrain_loss(
        *(torch.stack([data[i][k] for i in range(64)]) for k in ("audio", "video"))
    )
    trainer(tmp_path, max_epochs=40, logger=False, enable_checkpointing=False).fit(
        module, DataLoader(data, batch_size=16, shuffle=True)
    )
    module.eval()
    with torch.no_grad():
        after = module.backbone.pretrain_loss(
            *(torch.stack([data[i][k] for i in range(64)]) for k in ("audio", "video"))
        )
    assert after.reconstruction < 0.8 * before.reconstruction
    assert after.contrastive < before.contrastive - 0.5


def test_warmup_in_steps_when_epochs_have_no_length(tmp_path):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            data = PairedClips(8)
            return iter(DataLoader(data, batch_size=4))

    module = PretrainModule(CAVMAESync(**SMALL), lr=1e-3, warmup_epochs=1)
    run = trainer(tmp_path, max_epochs=-1, max_steps=6, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="give warmup_steps instead"):
        run.fit(module, DataLoader(Stream(), batch_size=None))
    module = PretrainModule(CAVMAESync(**SMALL), lr=1e-3, warmup_steps=3)
    run = trainer(tmp_path, max_epochs=-1, max_steps=6, logger=False, enable_checkpointing=False)
    run.fit(module, DataLoader(Stream(), batch_size=None))
    assert run.global_step == 6
    assert run.lr_scheduler_configs[0].scheduler.last_epoch == 6


class RecordVideo(L.Callback):
    """The `video` of every validation batch as the LightningModule receives it."""

    def __init__(self):
        self.videos = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.videos.append(batch["video"])


def test_frames_sent_as_uint8_are_normalized_on_the_device_like_on_the_host(tmp_path):
    from avsync.data.datamodule import AVShardDataModule

    from ..data.conftest import write_shards

    write_shards(tmp_path / "shards", [3], image_size=(40, 32))
    config = dict(SMALL, mel_bins=128)
    seen = {}
    for on_device in (True, False):
        data = AVShardDataModule(
            val_shards=str(tmp_path / "shards"), batch_size=2, num_workers=0, num_frames=4,
            image_size=32, audio_length=32, normalize_on_device=on_device,
        )  # fmt: skip
        record = RecordVideo()
        run = trainer(tmp_path / str(on_device), logger=False, callbacks=[record])
        run.validate(PretrainModule(CAVMAESync(**config)), datamodule=data, verbose=False)
        assert data.pixels_on_device is on_device
        sent = next(iter(data.val_dataloader()))["video"]
        assert sent.dtype == (torch.uint8 if on_device else torch.float32)
        seen[on_device] = record.videos
        if on_device:
            assert torch.equal(record.videos[0], normalize_pixels(sent))
    assert len(seen[True]) == len(seen[False]) == 2
    for device_side, host_side in zip(seen[True], seen[False], strict=True):
        assert device_side.dtype == torch.float32 and device_side.shape == host_side.shape == (
            device_side.shape[0], 4, 3, 32, 32,
        )  # fmt: skip
        torch.testing.assert_close(device_side, host_side, rtol=0, atol=1e-6)
    # by default, a CPU run normalizes in the loader workers (the float32 batch contract)
    default = AVShardDataModule(val_shards=str(tmp_path / "shards"), image_size=32, audio_length=32)
    trainer(tmp_path / "default", logger=False).validate(
        PretrainModule(CAVMAESync(**config)), datamodule=default, verbose=False
    )
    assert default.pixels_on_device is False
