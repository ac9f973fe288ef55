"""Fixtures of the embedding-API tests: tiny backbones saved in every format avsync reads, real clips
(`../shared/data/videos`, skipped when absent), and small synthetic clips made by `avsync synth`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from avsync.checkpoints.authors import AUTHORS_FIXED, AUTHORS_RULES, AUTHORS_UNUSED, _translate
from avsync.model import CAVMAESync
from avsync.model.embeddings import sincos_2d
from avsync.synth import synthesize
from avsync.tasks import PretrainModule
from tests.conftest import shared_path

#: A backbone small enough for CPU tests that still reads real spectrograms (128 mel bins).
SMALL = dict(
    image_size=32, audio_length=32, mel_bins=128, embed_dim=32, num_heads=2, encoder_depth=2,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip

REAL_CLIPS = ("00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4")
REFERENCE = ("reference", "cavmae_sync_released_tiny.pt")
#: The authors' constructor arguments of the shrunk reference model (`authors_template`).
AUTHORS_KWARGS = {"num_heads": 4, "decoder_num_heads": 4}


@pytest.fixture(scope="session")
def real_clips() -> list[Path]:
    return [shared_path("data", "videos", name) for name in REAL_CLIPS]


@pytest.fixture(scope="session")
def synth_clips(tmp_path_factory) -> list[Path]:
    """Three 3-s H.264 + AAC clips (64 px)."""
    manifest = synthesize(
        tmp_path_factory.mktemp("synth"), clips=3, classes=2, duration=3.0, size=64, workers=0
    )
    return sorted((manifest.out_dir / "videos").glob("*.mp4"))


@pytest.fixture(scope="session")
def broken_clips(tmp_path_factory, synth_clips) -> list[Path]:
    """A truncated real MP4 and a text file with a video name: what batch jobs meet in the wild."""
    folder = tmp_path_factory.mktemp("broken")
    truncated = folder / "truncated.mp4"
    data = synth_clips[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    not_video = folder / "notes.mp4"
    not_video.write_text("this is not a video\n")
    return [truncated, not_video]


@pytest.fixture(scope="session")
def reference() -> dict:
    return torch.load(shared_path(*REFERENCE), weights_only=True)


def shrink_authors_state(
    state: dict[str, torch.Tensor], *, global_token: bool = True, audio_length: int = 64
):
    """The reference's real authors' state dict cut down to a fast model: 2 + 1 blocks, 32-px frames,
    `audio_length` spectrogram frames; without global and register tokens it is an original CAV-MAE."""
    dim, decoder_dim = state["patch_embed_v.proj.weight"].shape[0], state["decoder_embed.weight"].shape[0]
    small = {}
    for key, value in state.items():
        if key.startswith(("blocks_a.", "blocks_v.")) and int(key.split(".")[1]) >= 2:
            continue
        if not global_token and (key.startswith("cls_token_") or key == "register_tokens"):
            continue
        small[key] = value
    small["pos_embed_v"] = sincos_2d(dim, 2, 2)[None]
    small["decoder_pos_embed_v"] = sincos_2d(decoder_dim, 2, 2)[None]
    small["pos_embed_a"] = sincos_2d(dim, 8, audio_length // 16)[None]
    small["decoder_pos_embed_a"] = sincos_2d(decoder_dim, 8, audio_length // 16)[None]
    return small


@pytest.fixture(scope="session")
def authors_template(reference) -> dict[str, torch.Tensor]:
    return shrink_authors_state(reference["state_dict"])


def as_authors_state(
    state: dict[str, torch.Tensor], template: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """An avsync state dict under the authors' key names of `template` (a real authors' file of the same
    architecture): each template key takes the avsync tensor it translates to."""
    authors = {}
    for key, value in template.items():
        if key in AUTHORS_FIXED or AUTHORS_UNUSED.fullmatch(key):
            authors[key] = value  # fixed sin-cos tables, and norms the authors' blocks carry unused
        elif key == "register_tokens":
            authors[key] = torch.cat([state["registers.audio"], state["registers.video"]])
        else:
            authors[key] = state[_translate(key, AUTHORS_RULES)]
    return authors


def fit_one_step(backbone: CAVMAESync, folder: Path) -> Path:
    """A real Lightning checkpoint: `PretrainModule` after one optimizer step on random pairs."""
    size, length, mel = backbone.image_size, backbone.audio_length, backbone.mel_bins
    batch = [{"audio": torch.randn(length, mel), "video": torch.randn(3, size, size)} for _ in range(4)]
    module = PretrainModule(backbone.train(), log_images_every_n_steps=0, warmup_epochs=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.fit(module, DataLoader(batch, batch_size=4))
    path = folder / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A Lightning checkpoint of the SMALL backbone."""
    return fit_one_step(CAVMAESync(**SMALL), tmp_path_factory.mktemp("small"))
