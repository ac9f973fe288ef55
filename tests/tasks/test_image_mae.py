"""The MAE stage of the miniature recipe: it learns, it writes the released MAE layout, and
`init_from` reads that file into the audio-visual backbone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from avsync.checkpoints import init_from_mae
from avsync.data.datamodule import AVShardDataModule
from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule
from avsync.tasks.image_mae import ImageMAE, ImageMAEModule

SMALL_MAE = dict(
    image_size=32,
    patch_size=16,
    embed_dim=32,
    depth=3,
    num_heads=2,
    decoder_dim=16,
    decoder_depth=1,
    decoder_heads=2,
)
#: The backbone that SMALL_MAE initializes: 2 encoder blocks + 1 joint block, the same decoder.
SMALL_BACKBONE = dict(
    image_size=32,
    audio_length=32,
    embed_dim=32,
    num_heads=2,
    encoder_depth=2,
    joint_depth=1,
    decoder_dim=16,
    decoder_depth=1,
    decoder_heads=2,
    num_registers=2,
)


def test_parameter_names_are_the_released_mae_layout():
    names = set(ImageMAE(**SMALL_MAE).state_dict())
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.2.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
        "decoder_embed.weight",
        "mask_token",
        "decoder_pos_embed",
        "decoder_blocks.0.norm1.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
    }
    assert expected <= names
    assert not any(name.startswith(("blocks.3.", "decoder_blocks.1.")) for name in names)
    # MAE's fixed position table: a zero slot for the class token, then the 2 x 2 patch grid
    table = ImageMAE(**SMALL_MAE).pos_embed
    assert table.shape == (1, 5, 32) and not table.requires_grad
    assert torch.count_nonzero(table[0, 0]) == 0 and torch.count_nonzero(table[0, 1:]) > 0


def test_export_is_read_by_init_from_into_encoders_joint_layer_and_decoder(tmp_path):
    torch.manual_seed(0)
    module = ImageMAEModule(**SMALL_MAE)
    path = module.export(tmp_path / "mae.pth")
    state = torch.load(path, weights_only=True)["model"]
    assert set(state) == set(module.mae.state_dict())

    backbone = CAVMAESync(**SMALL_BACKBONE)
    report = init_from_mae(backbone, path)
    for modality in ("audio", "video"):
        encoder = getattr(backbone, f"{modality}_encoder")
        for index in range(2):
            assert torch.equal(encoder[index].attn.qkv.weight, state[f"blocks.{index}.attn.qkv.weight"])
            assert torch.equal(encoder[index].mlp.fc1.bias, state[f"blocks.{index}.mlp.fc1.bias"])
    assert torch.equal(backbone.joint.blocks[0].attn.proj.weight, state["blocks.2.attn.proj.weight"])
    for stream in ("joint", "audio", "video"):
        assert torch.equal(backbone.joint.blocks[0].norm1[stream].weight, state["blocks.2.norm1.weight"])
    assert torch.equal(backbone.joint.norm_video.weight, state["norm.weight"])
    assert torch.equal(backbone.decoder.blocks[0].attn.qkv.weight, state["decoder_blocks.0.attn.qkv.weight"])
    assert torch.equal(backbone.decoder.predict_video.weight, state["decoder_pred.weight"])
    assert torch.equal(backbone.video_tokenizer.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.allclose(
        backbone.audio_tokenizer.patch_embed.proj.weight,
        state["patch_embed.proj.weight"].sum(dim=1, keepdim=True),
    )
    assert not [key for key in report.skipped if key.startswith(("blocks.", "decoder_blocks."))]


@pytest.fixture
def shard_data(demo_run):
    def make(image_size: int, audio_length: int) -> AVShardDataModule:
        return AVShardDataModule(
            train_shards=str(demo_run.workdir / "train"),
            image_size=image_size,
            audio_length=audio_length,
            batch_size=8,
            num_workers=0,
            resampled=True,
            epoch_length=64,
        )

    return make


def test_the_stage_learns_on_shards_and_its_file_starts_the_audio_visual_run(shard_data, tmp_path):
    """Stage 0 on real shards lowers the reconstruction loss of a fixed batch and mask (raw pixels) and
    exports; stage 1 with `init_from` begins its training from exactly those weights."""
    torch.manual_seed(0)
    module = ImageMAEModule(
        **SMALL_MAE, lr=3e-3, warmup_epochs=0.1, norm_pix_loss=False, export_path=str(tmp_path / "mae.pth")
    )
    data = shard_data(32, 32)
    data.setup("fit")
    frames = next(iter(data.train_dataloader()))["video"]  # a fixed batch, masked by fixed noise
    noise = torch.rand(len(frames), module.mae.num_patches, generator=torch.Generator().manual_seed(1))

    def held_loss() -> float:
        with torch.no_grad():
            return float(module.mae.eval()(frames, noise, 0.75, False))

    before = held_loss()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=shard_data(32, 32))
    assert trainer.global_step == 40
    # deterministic (fixed batch, fixed mask): a stage whose gradients did not reach the model, or that
    # learned from the kept patches only, would not move it
    assert held_loss() < 0.95 * before
    state = torch.load(tmp_path / "mae.pth", weights_only=True)["model"]

    started = {}

    class WeightsAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            started.update({k: v.clone() for k, v in pl_module.backbone.state_dict().items()})

    pretrain = PretrainModule(
        CAVMAESync(**SMALL_BACKBONE), warmup_epochs=0, init_from=str(tmp_path / "mae.pth")
    )
    stage1 = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[WeightsAtStart()],
    )
    stage1.fit(pretrain, datamodule=shard_data(32, 32))
    assert torch.equal(started["video_encoder.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    assert torch.equal(started["joint.blocks.0.mlp.fc2.weight"], state["blocks.2.mlp.fc2.weight"])
    assert stage1.global_step == 1  # and it trains from there
