"""`init_from` maps the released MAE checkpoint as CAV-MAE's `src/adapt_vmae_weights.py` does.

The file here is written key by key in the layout of MAE's released `mae_pretrain_vit_base_full.pth`
(facebookresearch/mae `models_mae.py`: `{"model": state_dict}`), at small widths, every tensor drawn at
random so that a value found in the backbone names the one MAE tensor it came from.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from avsync.checkpoints import MAE_FULL_URL, CheckpointError, init_from_mae
from avsync.model import CAVMAESync
from avsync.tasks.image_mae import ImageMAE

#: 2 modality-specific blocks + 1 joint block, so the MAE ViT has 3 blocks (CAV-MAE: 11 + 1 of 12)
SMALL = dict(
    image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=2,
    decoder_dim=16, decoder_depth=2, decoder_heads=2, num_registers=2,
)  # fmt: skip
PATCH = 16


def mae_positions(dim: int, side: int) -> torch.Tensor:
    """MAE's `get_2d_sincos_pos_embed(dim, side, cls_token=True)` recomputed independently: a zero row for
    the class token, then per patch (row-major) sin/cos of the column, then of the row, in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def code(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    table = torch.cat([code(cols.flatten().double()), code(rows.flatten().double())], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()[None]


def released_mae_layout(
    embed_dim: int = 32, depth: int = 3, decoder_dim: int = 16, decoder_depth: int = 2, image_size: int = 32
) -> dict[str, torch.Tensor]:
    """The state dict of MAE's `MaskedAutoencoderViT` as released, random values, fixed position tables."""
    generator = torch.Generator().manual_seed(1)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def block(prefix: str, dim: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.norm1.weight": draw(dim), f"{prefix}.norm1.bias": draw(dim),
            f"{prefix}.attn.qkv.weight": draw(3 * dim, dim), f"{prefix}.attn.qkv.bias": draw(3 * dim),
            f"{prefix}.attn.proj.weight": draw(dim, dim), f"{prefix}.attn.proj.bias": draw(dim),
            f"{prefix}.norm2.weight": draw(dim), f"{prefix}.norm2.bias": draw(dim),
            f"{prefix}.mlp.fc1.weight": draw(4 * dim, dim), f"{prefix}.mlp.fc1.bias": draw(4 * dim),
            f"{prefix}.mlp.fc2.weight": draw(dim, 4 * dim), f"{prefix}.mlp.fc2.bias": draw(dim),
        }  # fmt: skip

    side = image_size // PATCH
    state = {
        "cls_token": draw(1, 1, embed_dim),
        "pos_embed": mae_positions(embed_dim, side),
        "patch_embed.proj.weight": draw(embed_dim, 3, PATCH, PATCH),
        "patch_embed.proj.bias": draw(embed_dim),
    }
    for index in range(depth):
        state |= block(f"blocks.{index}", embed_dim)
    state |= {
        "norm.weight": draw(embed_dim),
        "norm.bias": draw(embed_dim),
        "decoder_embed.weight": draw(decoder_dim, embed_dim),
        "decoder_embed.bias": draw(decoder_dim),
        "mask_token": draw(1, 1, decoder_dim),
        "decoder_pos_embed": mae_positions(decoder_dim, side),
    }
    for index in range(decoder_depth):
        state |= block(f"decoder_blocks.{index}", decoder_dim)
    state |= {
        "decoder_norm.weight": draw(decoder_dim),
        "decoder_norm.bias": draw(decoder_dim),
        "decoder_pred.weight": draw(PATCH * PATCH * 3, decoder_dim),
        "decoder_pred.bias": draw(PATCH * PATCH * 3),
    }
    return state


@pytest.fixture
def mae_file(tmp_path):
    state = released_mae_layout()
    path = tmp_path / "mae_pretrain_vit_base_full.pth"
    torch.save({"model": state}, path)
    return path, state


def test_the_layout_is_the_one_avsyncs_image_mae_exports():
    """The full-size dry runs (bench, test_pretrain_init) synthesize their file with `ImageMAE`: same keys."""
    exported = ImageMAE(
        image_size=32, embed_dim=32, depth=3, num_heads=2, decoder_dim=16, decoder_depth=2, decoder_heads=2
    ).state_dict()
    ours = released_mae_layout()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_every_mae_tensor_lands_where_adapt_vmae_weights_puts_it(mae_file):
    path, mae = mae_file
    model = CAVMAESync(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_mae(model, path, complete=True)
    own = model.state_dict()

    def same(avsync_key: str, value: torch.Tensor) -> None:
        assert torch.equal(own[avsync_key], value), avsync_key

    # blocks_a.i / blocks_v.i <- blocks.i for i < 11 (here 2)
    for index in range(2):
        for encoder in ("audio_encoder", "video_encoder"):
            same(f"{encoder}.{index}.attn.qkv.weight", mae[f"blocks.{index}.attn.qkv.weight"])
            same(f"{encoder}.{index}.mlp.fc2.bias", mae[f"blocks.{index}.mlp.fc2.bias"])
            same(f"{encoder}.{index}.norm1.weight", mae[f"blocks.{index}.norm1.weight"])
    # blocks_u.0 <- blocks.11 (here 2), its norm1/norm2 also into norm1_a/_v, norm2_a/_v
    same("joint.blocks.0.attn.proj.weight", mae["blocks.2.attn.proj.weight"])
    same("joint.blocks.0.mlp.fc1.bias", mae["blocks.2.mlp.fc1.bias"])
    for stream in ("joint", "audio", "video"):
        same(f"joint.blocks.0.norm1.{stream}.weight", mae["blocks.2.norm1.weight"])
        same(f"joint.blocks.0.norm2.{stream}.bias", mae["blocks.2.norm2.bias"])
    # norm, norm_a, norm_v <- norm
    for norm in ("norm", "norm_audio", "norm_video"):
        same(f"joint.{norm}.weight", mae["norm.weight"])
        same(f"joint.{norm}.bias", mae["norm.bias"])
    # cls_token_a, cls_token_v <- cls_token
    same("global_tokens.audio", mae["cls_token"])
    same("global_tokens.video", mae["cls_token"])
    # patch_embed_v <- patch_embed; patch_embed_a.weight <- the sum over the RGB filters, bias as is
    same("video_tokenizer.patch_embed.proj.weight", mae["patch_embed.proj.weight"])
    same("video_tokenizer.patch_embed.proj.bias", mae["patch_embed.proj.bias"])
    same("audio_tokenizer.patch_embed.proj.weight", torch.sum(mae["patch_embed.proj.weight"], dim=1)[:, None])
    same("audio_tokenizer.patch_embed.proj.bias", mae["patch_embed.proj.bias"])
    # the decoder: embed, mask token, blocks, norm by name; decoder_pred_v <- decoder_pred,
    # decoder_pred_a <- decoder_pred[:256]
    same("decoder.embed.weight", mae["decoder_embed.weight"])
    same("decoder.mask_token", mae["mask_token"])
    same("decoder.blocks.1.mlp.fc1.weight", mae["decoder_blocks.1.mlp.fc1.weight"])
    same("decoder.blocks.0.norm2.weight", mae["decoder_blocks.0.norm2.weight"])
    same("decoder.norm.bias", mae["decoder_norm.bias"])
    same("decoder.predict_video.weight", mae["decoder_pred.weight"])
    same("decoder.predict_audio.weight", mae["decoder_pred.weight"][:256])
    same("decoder.predict_audio.bias", mae["decoder_pred.bias"][:256])
    # pos_embed_v / decoder_pos_embed_v <- MAE's tables: the same sin-cos avsync computes
    assert report.skipped["pos_embed"] == report.skipped["decoder_pos_embed"]
    assert "equal to avsync's" in report.skipped["pos_embed"]
    # what adapt_vmae_weights.py does not fill keeps the model's own initialization
    kept = [k for k in own if torch.equal(own[k], before[k])]
    assert sorted(kept) == sorted(
        ["audio_tokenizer.modality", "video_tokenizer.modality", "decoder.modality_audio"]
        + ["decoder.modality_video", "registers.audio", "registers.video"]
    )


def test_the_paper_recipe_refuses_an_encoder_only_file(tmp_path, mae_file):
    _, mae = mae_file
    encoder_only = {k: v for k, v in mae.items() if not k.startswith(("decoder_", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": encoder_only}, path)
    with pytest.raises(CheckpointError) as refused:
        init_from_mae(CAVMAESync(**SMALL), path, complete=True)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and MAE_FULL_URL in message
    assert "no decoder" in message and "decoder.blocks.0.*" in message and "init_from: none" in message
    # outside the paper's recipe the same file initializes what it has and reports the rest
    report = init_from_mae(CAVMAESync(**SMALL), path)
    assert "decoder.embed.weight" in report.skipped and "audio_encoder.0.attn.qkv.weight" in report.loaded


def test_a_position_table_that_is_not_the_fixed_one_is_refused_by_the_paper_recipe(tmp_path, mae_file):
    _, mae = mae_file
    learned = dict(mae, pos_embed=mae["pos_embed"] + 0.01)
    path = tmp_path / "learned.pth"
    torch.save({"model": learned}, path)
    with pytest.raises(CheckpointError, match="pos_embed is not the fixed sin-cos table"):
        init_from_mae(CAVMAESync(**SMALL), path, complete=True)
    assert "learned positions" in init_from_mae(CAVMAESync(**SMALL), path).skipped["pos_embed"]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_the_init_file_is_read_weights_only(tmp_path, capsys):
    path = tmp_path / "mae.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": {"cls_token": torch.zeros(1, 1, 32)}, "args": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        init_from_mae(CAVMAESync(**SMALL), path, complete=True)
    assert "this must never run" not in capsys.readouterr().out
