"""PretrainModule in real Lightning Trainer runs on CPU (in-memory data until shards are used)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule
from avsync.tasks.pretrain import in_batch_recall_at_1, warmup_cosine

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
    module = PretrainModule(CAVMAESync(**SMALL), lr=1e-3, warmup_epochs=0.5, log_images_every_n_steps=2)
    train = DataLoader(PairedClips(32), batch_size=8, shuffle=True)
    val = DataLoader(PairedClips(16, frames=4, seed=1), batch_size=8)
    run = trainer(tmp_path)
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
        "train/samples_per_s",
        "train/contrastive_accuracy",
        "val/audio_to_video_R1",
    } <= scalars
    assert {"reconstruction/frame", "reconstruction/spectrogram"} <= images
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warm-up, then decay

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
