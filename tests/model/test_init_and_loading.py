"""Initialization from ImageNet MAE ViTs, and refusing unsafe or unusable checkpoint files."""

from __future__ import annotations

import pickle
import re

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from avsync.checkpoints import CheckpointError, init_from_mae, read_weights
from avsync.checkpoints.authors import AUTHORS_FIXED, authors_key, load_authors_checkpoint
from avsync.model import CAVMAESync

SMALL = dict(
    image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=2,
    decoder_dim=16, decoder_depth=2, decoder_heads=2, num_registers=2,
)  # fmt: skip


def mae_checkpoint() -> dict[str, torch.Tensor]:
    """An MAE-layout state dict made from real timm modules: a 3-block ViT plus an MAE decoder."""
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=3, num_heads=2
    )
    state = dict(vit.state_dict())
    decoder = torch.nn.ModuleList(Block(16, 2, qkv_bias=True) for _ in range(2))
    state |= {f"decoder_blocks.{k}": v for k, v in decoder.state_dict().items()}
    state |= {
        "decoder_embed.weight": torch.randn(16, 32),
        "decoder_embed.bias": torch.randn(16),
        "mask_token": torch.randn(1, 1, 16),
        "decoder_pos_embed": torch.randn(1, 5, 16),
        "decoder_norm.weight": torch.randn(16),
        "decoder_norm.bias": torch.randn(16),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, 16),
        "decoder_pred.bias": torch.randn(16 * 16 * 3),
    }
    return {"model": state}


def test_mae_blocks_go_to_both_encoders_then_the_joint_layer(tmp_path):
    checkpoint = mae_checkpoint()
    path = tmp_path / "mae.pth"
    torch.save(checkpoint, path)
    state = checkpoint["model"]
    model = CAVMAESync(**SMALL)
    report = init_from_mae(model, path)
    own = model.state_dict()
    for index in range(2):
        for encoder in ("audio_encoder", "video_encoder"):
            assert torch.equal(
                own[f"{encoder}.{index}.attn.qkv.weight"], state[f"blocks.{index}.attn.qkv.weight"]
            )
    assert torch.equal(own["joint.blocks.0.mlp.fc1.weight"], state["blocks.2.mlp.fc1.weight"])
    for stream in ("joint", "audio", "video"):
        assert torch.equal(own[f"joint.blocks.0.norm1.{stream}.weight"], state["blocks.2.norm1.weight"])
    assert torch.equal(own["decoder.blocks.1.attn.proj.weight"], state["decoder_blocks.1.attn.proj.weight"])
    assert torch.equal(own["decoder.predict_video.weight"], state["decoder_pred.weight"])
    assert torch.equal(
        own["audio_tokenizer.patch_embed.proj.weight"],
        state["patch_embed.proj.weight"].sum(dim=1, keepdim=True),
    )
    # as adapt_vmae_weights.py: the class token starts both global tokens, the RGB head's first rows the
    # audio head (tests/model/test_mae_init.py checks the whole mapping on the released layout)
    assert torch.equal(own["global_tokens.audio"], state["cls_token"])
    assert torch.equal(own["decoder.predict_audio.weight"], state["decoder_pred.weight"][:256])
    assert "head.weight" in report.skipped and "registers.audio" in report.skipped
    assert "learned positions" in report.skipped["pos_embed"]  # timm's table is not the fixed one


def test_mae_init_reports_shape_mismatches_instead_of_loading_them():
    model = CAVMAESync(**{**SMALL, "embed_dim": 64})
    with pytest.raises(CheckpointError, match=r"shapes do not match.*blocks.0.attn.qkv.weight"):
        init_from_mae(model, mae_checkpoint())


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_a_code_payload_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"weights": torch.zeros(2), "payload": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_weights(path)
    assert "this must never run" not in capsys.readouterr().out


def test_unreadable_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_weights(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_weights(garbage)


# ------------------------------------------------------------------------------ the authors' files
AUTHORS_SMALL = {**SMALL, "mel_bins": 128}  # the authors' audio grid is always 128 mel bins
HEADS = {"num_heads": 2, "decoder_num_heads": 2}  # what the weights cannot reveal


def authors_state(model: CAVMAESync) -> dict[str, torch.Tensor]:
    """`model`'s weights under the authors' key names, as their `CAVMAE` class would save them."""
    state = {authors_key(k): v for k, v in model.state_dict().items() if not k.startswith("registers.")}
    if model.registers.count:
        state["register_tokens"] = torch.cat([model.registers.audio, model.registers.video])
    tables = {avsync: authors for authors, avsync in AUTHORS_FIXED.items()}
    state |= {tables[name]: buffer for name, buffer in model.named_buffers() if name in tables}
    return state


def test_authors_names_round_trip():
    model = CAVMAESync(**AUTHORS_SMALL)
    loaded = load_authors_checkpoint(authors_state(model), **HEADS)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_missing_encoder_block_is_named_as_the_file_names_it():
    state = authors_state(CAVMAESync(**AUTHORS_SMALL))
    state = {k: v for k, v in state.items() if not k.startswith("blocks_a.1.")}
    with pytest.raises(CheckpointError) as error:
        load_authors_checkpoint(state, **HEADS)
    message = str(error.value)
    assert "missing blocks_a.1.* (avsync audio_encoder.1.*)" in message
    assert "unexpected" not in message and "blocks_v" not in message


def test_errors_name_the_format_being_loaded():
    sync = authors_state(CAVMAESync(**AUTHORS_SMALL))
    cavmae = authors_state(CAVMAESync(**{**AUTHORS_SMALL, "num_registers": 0, "global_token": False}))
    assert "cls_token_a" not in cavmae and "register_tokens" not in cavmae
    for state, name in ((sync, "CAV-MAE Sync"), (cavmae, "CAV-MAE")):
        del state["decoder_norm.weight"]
        with pytest.raises(CheckpointError, match=rf"cannot load as {name}: missing decoder_norm.weight"):
            load_authors_checkpoint(state, **HEADS)


@pytest.mark.parametrize("switch", ["keep_register_tokens", "global_local_losses"])
def test_authors_switches_avsync_does_not_implement_are_refused(switch):
    state = authors_state(CAVMAESync(**AUTHORS_SMALL))
    load_authors_checkpoint(state, **HEADS, **{switch: False})  # the released setting: accepted
    with pytest.raises(CheckpointError, match=rf"{switch}=True is not supported"):
        load_authors_checkpoint(state, **HEADS, **{switch: True})


# ------------------------------------------------------------------------------ initialization
# The authors' rules (`CAVMAE.initialize_weights` / `_init_weights` and `CAVMAEFT`'s, in their
# `src/models/cav_mae_sync.py`): each parameter's distribution, checked on one seeded draw.
INIT_MODEL = dict(
    image_size=64, audio_length=64, mel_bins=64, embed_dim=256, num_heads=4, encoder_depth=1,
    decoder_dim=128, decoder_depth=1, decoder_heads=4, num_registers=8, contrastive_head_depth=1,
)  # fmt: skip
NORMAL_002 = re.compile(
    r"global_tokens\.(audio|video)|.*tokenizer\.modality|decoder\.(modality_\w+|mask_token)|cls"
)


def authors_rule(name: str, parameter: torch.Tensor, module: torch.nn.Module) -> tuple[str, float]:
    """`(kind, scale)` of the authors' initialization of one parameter of `module` (its owner)."""
    if NORMAL_002.fullmatch(name):
        return "normal", 0.02  # normal_(std=.02), cls_token_a / _v re-drawn after their randn
    if re.fullmatch(r"registers\.(audio|video)", name):
        return "normal", 1.0  # register_tokens: randn, never re-drawn
    if isinstance(module, torch.nn.LayerNorm):
        return "constant", 1.0 if name.endswith("weight") else 0.0
    if isinstance(module, torch.nn.Linear):
        if name.endswith("bias"):
            return "constant", 0.0
        return "uniform", (6 / sum(parameter.shape)) ** 0.5  # xavier_uniform_
    if isinstance(module, torch.nn.Conv2d):  # patch embeddings: xavier as a linear, PyTorch's default bias
        fan_in = parameter.numel() // parameter.shape[0] if name.endswith("weight") else None
        if fan_in is not None:
            return "uniform", (6 / (parameter.shape[0] + fan_in)) ** 0.5
        return "uniform", module.weight[0].numel() ** -0.5
    raise AssertionError(f"no rule for {name}: a new parameter needs its authors' initialization here")


def check_authors_init(model: torch.nn.Module) -> list[str]:
    """Every parameter against its rule; returns what differs (empty = all follow the authors)."""
    owners = {
        f"{prefix}.{name}" if prefix else name: module
        for prefix, module in model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
    }
    wrong = []
    for name, parameter in model.named_parameters():
        kind, scale = authors_rule(name, parameter, owners[name])
        values = parameter.detach().double().flatten()
        if kind == "constant":
            ok = bool((values == scale).all())
        elif kind == "normal":  # std within 15 %, mean within 4 standard errors of 0
            ok = (
                abs(values.std().item() / scale - 1) < 0.15
                and abs(values.mean().item()) < 4 * scale / len(values) ** 0.5
            )
        else:  # uniform(-scale, scale): inside the bound, and filling it (std = scale / sqrt(3))
            ok = values.abs().max().item() <= scale and abs(values.std().item() * 3**0.5 / scale - 1) < 0.15
        if not ok:
            wrong.append(f"{name}: {kind} {scale:.4g}, got std {values.std().item():.4g}")
    return wrong


def test_every_backbone_parameter_is_initialized_as_the_authors_do():
    torch.manual_seed(0)
    model = CAVMAESync(**INIT_MODEL)
    assert check_authors_init(model) == []
    assert model.global_tokens.audio.std().item() == pytest.approx(0.02, rel=0.15)  # not randn's 1
    assert model.registers.audio.std().item() == pytest.approx(1.0, rel=0.15)  # randn, as theirs


def test_the_probe_head_is_initialized_as_the_authors_classifier():
    from avsync.tasks.probe.head import ProbeHead

    torch.manual_seed(0)
    head = ProbeHead(width=512, num_classes=10, depth=2, num_heads=4)
    assert check_authors_init(head) == []
    assert head.cls.std().item() == pytest.approx(0.02, rel=0.15)  # cls_cls_token: normal_(std=.02), not 0


def test_the_global_token_scale_leaves_every_other_initial_weight_alone():
    """The tokens are a scaled randn: a seeded model differs only in them from one drawn at std 1."""
    from avsync.model import global_token

    torch.manual_seed(0)
    authors = CAVMAESync(**SMALL).state_dict()
    default = global_token.GlobalTokens.__init__.__defaults__
    global_token.GlobalTokens.__init__.__defaults__ = (True, 1.0)
    try:
        torch.manual_seed(0)
        unit = CAVMAESync(**SMALL).state_dict()
    finally:
        global_token.GlobalTokens.__init__.__defaults__ = default
    for name, value in authors.items():
        if name.startswith("global_tokens."):
            torch.testing.assert_close(value, unit[name] * 0.02)
        else:
            assert torch.equal(value, unit[name]), name
