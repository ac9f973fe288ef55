"""The paper's pretraining recipe (`configs/pretrain/audioset2m_vitb.yaml`) as shipped, through LightningCLI:
it starts from the MAE weights or refuses to start, and its reconstruction targets are normalized patches.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from avsync.checkpoints import MAE_FULL_URL
from avsync.model.embeddings import patchify_audio, patchify_video
from avsync.objectives import masked_mse
from avsync.tasks.image_mae import ImageMAE

RECIPE = "pretrain/audioset2m_vitb"
#: what a CPU machine must change to build the recipe (nothing the recipe's model or data depend on)
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]
ON_CPU += ["--trainer.logger=false"]


def shard_folders(root) -> None:
    """The recipe's shard folders (empty: nothing here reads a clip), so that only `init_from` is missing."""
    for split in ("train", "eval"):
        (root / "shards" / "audioset2m" / split).mkdir(parents=True)


def recipe_cli(monkeypatch, tmp_path, *overrides: str):
    """The recipe instantiated by avsync's LightningCLI, not run (the trainer attached to the model, as
    `fit` attaches it, so that `setup("fit")` does what the run's start does)."""
    from avsync.cli import avsync_cli_class, register_classes, trainer_defaults
    from avsync.recipes import resolve_config_args

    shard_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI reads `args`, not pytest's command line
    register_classes()
    cli = avsync_cli_class()(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        run=False,
        args=resolve_config_args(["--config", RECIPE, *ON_CPU, *overrides]),
    )
    cli.model.trainer = cli.trainer
    return cli


def test_the_paper_recipe_refuses_to_start_without_the_mae_weights(tmp_path):
    """`avsync fit` with the recipe as shipped (init_from unset): exit 2 and one line that says where to get
    the file and how to point to it, before any data is read."""
    shard_folders(tmp_path)
    finished = subprocess.run(
        [sys.executable, "-m", "avsync.cli", "fit", "--config", RECIPE],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr
    error = [line for line in finished.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith("avsync fit: error: init_from is not set")
    assert MAE_FULL_URL in error[0] and "--model.init_args.init_from=PATH" in error[0]
    assert "init_from: none" in error[0]


def test_init_from_none_is_a_decision_to_start_from_random_weights(monkeypatch, tmp_path, capsys):
    backbone = "--model.init_args.backbone.init_args."
    small = [backbone + "embed_dim=32", backbone + "num_heads=2", backbone + "decoder_dim=16"]
    cli = recipe_cli(monkeypatch, tmp_path, "--model.init_args.init_from=none", *small)
    assert cli.model.hparams.init_required
    before = {k: v.clone() for k, v in cli.model.backbone.state_dict().items()}
    cli.model.setup("fit")
    after = cli.model.backbone.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert "init_from none: the backbone starts from random weights" in capsys.readouterr().out


def test_a_missing_init_file_is_named_with_where_to_get_it(monkeypatch, tmp_path):
    from avsync.checkpoints import CheckpointError

    backbone = "--model.init_args.backbone.init_args."
    small = [backbone + "embed_dim=32", backbone + "num_heads=2", backbone + "decoder_dim=16"]
    cli = recipe_cli(monkeypatch, tmp_path, "--model.init_args.init_from=absent.pth", *small)
    with pytest.raises(CheckpointError, match=r"init_from absent.pth: no such file; download https://"):
        cli.model.setup("fit")


def test_the_shipped_vitb_recipe_starts_from_a_full_size_mae_file_and_trains_on_normalized_pixels(
    monkeypatch, tmp_path
):
    """Full size: an MAE ViT-B/16 with its 8-block decoder in the released key layout (`ImageMAE` writes
    it), read by the recipe's run start; then the recipe's loss is computed on standardized patches."""
    torch.manual_seed(0)
    mae = ImageMAE().state_dict()  # ViT-B/16, 12 blocks, decoder 512 x 8: mae_pretrain_vit_base_full.pth
    path = tmp_path / "mae_pretrain_vit_base_full.pth"
    torch.save({"model": mae}, path)
    cli = recipe_cli(monkeypatch, tmp_path, f"--model.init_args.init_from={path}")
    model = cli.model.backbone
    assert (model.embed_dim, len(model.audio_encoder), len(model.joint.blocks)) == (768, 11, 1)
    cli.model.setup("fit")
    own = model.state_dict()
    assert torch.equal(own["audio_encoder.10.mlp.fc2.weight"], mae["blocks.10.mlp.fc2.weight"])
    assert torch.equal(own["video_encoder.0.attn.qkv.weight"], mae["blocks.0.attn.qkv.weight"])
    assert torch.equal(own["joint.blocks.0.attn.qkv.weight"], mae["blocks.11.attn.qkv.weight"])
    assert torch.equal(own["joint.blocks.0.norm1.audio.weight"], mae["blocks.11.norm1.weight"])
    assert torch.equal(own["joint.norm_video.bias"], mae["norm.bias"])
    assert torch.equal(own["global_tokens.audio"], mae["cls_token"])
    assert torch.equal(own["decoder.blocks.7.mlp.fc2.weight"], mae["decoder_blocks.7.mlp.fc2.weight"])
    assert torch.equal(own["decoder.predict_audio.weight"], mae["decoder_pred.weight"][:256])
    del mae

    # norm_pix_loss: true reaches the loss: the run's reconstruction terms are the MSE to standardized
    # target patches, not to the raw ones
    assert model.norm_pix_loss is True
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(1, model.audio_length, 128, generator=generator) * 3 + 1
    video = torch.randn(1, 3, 224, 224, generator=generator) * 2 - 0.5
    noise = model.draw_noise(1, torch.device("cpu"), generator)
    with torch.no_grad():
        out = model.pretrain_loss(audio, video, *noise)
    predicted_video = patchify_video(out.recon_video, 16)
    predicted_audio = patchify_audio(out.recon_audio, 16)
    target_video, target_audio = patchify_video(video, 16), patchify_audio(audio, 16)
    for term, predicted, target, mask in (
        (out.reconstruction_video, predicted_video, target_video, out.mask_video),
        (out.reconstruction_audio, predicted_audio, target_audio, out.mask_audio),
    ):
        assert torch.allclose(term, masked_mse(predicted, target, mask, True), rtol=1e-5)
        assert not torch.allclose(term, masked_mse(predicted, target, mask, False), rtol=1e-2)
