"""The released model's numbers, reproduced: `../shared/reference/cavmae_sync_released_tiny.pt` was made
by running the authors' code; avsync must match it to 1e-5 relative in float32."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from avsync.checkpoints import CheckpointError, load_authors_checkpoint
from avsync.model import CAVMAESync
from tests.conftest import shared_path

TOLERANCE = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(shared_path("reference", "cavmae_sync_released_tiny.pt"), weights_only=True)


@pytest.fixture(scope="module")
def released(fixture) -> CAVMAESync:
    return load_authors_checkpoint(fixture["state_dict"], **fixture["config"]).eval()


def features(model: CAVMAESync, fixture: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model.encode(fixture["audio"], fixture["video"])
    return {
        "feat_global_a": out.global_audio,
        "feat_global_v": out.global_video,
        "feat_patch_a": out.patches_audio,
        "feat_patch_v": out.patches_video,
    }


def test_encode_reproduces_the_released_features(released, fixture):
    for name, value in features(released, fixture).items():
        assert value.shape == fixture[name].shape, name
        assert relative_error(value, fixture[name]) < TOLERANCE, name


@pytest.mark.parametrize("targets", ["raw_pix", "norm_pix"])
def test_pretrain_loss_reproduces_masks_losses_and_reconstructions(fixture, targets):
    model = load_authors_checkpoint(
        fixture["state_dict"], **fixture["config"], norm_pix_loss=targets == "norm_pix"
    ).eval()
    expected = fixture[targets]
    with torch.no_grad():
        out = model.pretrain_loss(fixture["audio"], fixture["video"], fixture["noise_a"], fixture["noise_v"])
    assert torch.equal(out.mask_audio, fixture["mask_a"])
    assert torch.equal(out.mask_video, fixture["mask_v"])
    scalars = {
        "loss": out.loss,
        "loss_mae": out.reconstruction,
        "loss_mae_a": out.reconstruction_audio,
        "loss_mae_v": out.reconstruction_video,
        "loss_c": model.contrastive_weight * out.contrastive,
    }
    for name, value in scalars.items():
        assert relative_error(value, expected[name]) < TOLERANCE, name
    assert out.contrastive_accuracy.item() == pytest.approx(expected["c_acc"].item(), abs=1e-7)
    recon_audio = rearrange(expected["recon_a"], "b f t 1 -> b t f")
    recon_video = rearrange(expected["recon_v"], "b h w c -> b c h w")
    assert relative_error(out.recon_audio, recon_audio) < TOLERANCE
    assert relative_error(out.recon_video, recon_video) < TOLERANCE


@pytest.mark.parametrize(
    "authors_norm, changes, stays",
    [
        ("blocks_u.0.norm1_a", "a", "v"),
        ("blocks_u.0.norm2_v", "v", "a"),
        ("norm_a", "a", "v"),
        ("norm_v", "v", "a"),
    ],
)
def test_each_joint_layernorm_set_drives_its_own_modality(fixture, released, authors_norm, changes, stays):
    """The fixture's LayerNorms are still at their initial values (all ones and zeros), so its numbers
    alone cannot tell the audio and video norm sets apart. Perturbing one set in the authors' file must
    move exactly that modality's features: this fails if the sets were swapped in loading or in use."""
    state = dict(fixture["state_dict"])
    state[f"{authors_norm}.weight"] = state[f"{authors_norm}.weight"] * 1.5
    state[f"{authors_norm}.bias"] = state[f"{authors_norm}.bias"] + 0.25
    perturbed = features(load_authors_checkpoint(state, **fixture["config"]).eval(), fixture)
    reference = features(released, fixture)
    for kind in ("global", "patch"):
        assert relative_error(perturbed[f"feat_{kind}_{changes}"], reference[f"feat_{kind}_{changes}"]) > 1e-2
        assert torch.equal(perturbed[f"feat_{kind}_{stays}"], reference[f"feat_{kind}_{stays}"])


def test_joint_pass_norms_feed_only_the_decoder(fixture, released):
    state = dict(fixture["state_dict"])
    state["blocks_u.0.norm1.weight"] = state["blocks_u.0.norm1.weight"] * 1.5
    model = load_authors_checkpoint(state, **fixture["config"]).eval()
    assert torch.equal(
        features(model, fixture)["feat_global_a"], features(released, fixture)["feat_global_a"]
    )
    with torch.no_grad():
        out = model.pretrain_loss(fixture["audio"], fixture["video"], fixture["noise_a"], fixture["noise_v"])
    assert relative_error(out.reconstruction_audio, fixture["raw_pix"]["loss_mae_a"]) > 1e-4


def test_module_prefix_is_accepted(fixture, released):
    prefixed = {f"module.{k}": v for k, v in fixture["state_dict"].items()}
    model = load_authors_checkpoint(prefixed, **fixture["config"]).eval()
    for (name, a), b in zip(model.state_dict().items(), released.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_loading_from_a_file(tmp_path, fixture, released):
    path = tmp_path / "released.pth"
    torch.save({f"module.{k}": v for k, v in fixture["state_dict"].items()}, path)
    model = load_authors_checkpoint(path, **fixture["config"]).eval()
    assert torch.equal(
        features(model, fixture)["feat_global_a"], features(released, fixture)["feat_global_a"]
    )


def test_missing_and_unexpected_keys_are_listed(fixture):
    state = dict(fixture["state_dict"])
    del state["blocks_v.3.attn.qkv.weight"]
    state["surprise.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as error:
        load_authors_checkpoint(state, **fixture["config"])
    message = str(error.value)
    assert "video_encoder.3.attn.qkv.weight" in message and "surprise.weight" in message


def test_arguments_that_contradict_the_weights_are_refused(fixture):
    config = {**fixture["config"], "num_register_tokens": 4}
    with pytest.raises(CheckpointError, match="num_registers"):
        load_authors_checkpoint(fixture["state_dict"], **config)


def test_positional_tables_must_be_the_fixed_ones(fixture):
    state = dict(fixture["state_dict"])
    state["pos_embed_a"] = state["pos_embed_a"] + 0.1
    with pytest.raises(CheckpointError, match="pos_embed_a"):
        load_authors_checkpoint(state, **fixture["config"])


def test_learned_positional_tables_load_with_the_authors_tr_pos(fixture, released):
    state = dict(fixture["state_dict"])
    generator = torch.Generator().manual_seed(0)
    state["pos_embed_a"] = state["pos_embed_a"] + torch.randn(state["pos_embed_a"].shape, generator=generator)
    with pytest.raises(CheckpointError, match=r"pos_embed_a.*pass tr_pos=True"):
        load_authors_checkpoint(state, **fixture["config"])
    model = load_authors_checkpoint(state, **fixture["config"], tr_pos=True).eval()
    assert torch.equal(model.state_dict()["audio_tokenizer.pos_embed"], state["pos_embed_a"])
    assert model.config["learned_positions"] and "learned_positions" not in released.config
    shifted = features(model, fixture)["feat_global_a"]
    assert relative_error(shifted, features(released, fixture)["feat_global_a"]) > 1e-3  # the table is used


# ------------------------------------------------------------------------------ the authors' classifier
@pytest.fixture(scope="module")
def probe_fixture() -> dict:
    """`cavmae_sync_probe_tiny.pt`: the authors' `CAVMAEFT` (self_attention_cls head) on 2 clips."""
    return torch.load(shared_path("reference", "cavmae_sync_probe_tiny.pt"), weights_only=True)


@pytest.fixture(scope="module")
def classifier(probe_fixture):
    from avsync.checkpoints import load_authors_classifier

    return load_authors_classifier(probe_fixture["state_dict"], **probe_fixture["config"])


def probe_features(classifier, fixture: dict, layer: str) -> torch.Tensor:
    from avsync.tasks.probe.features import FrozenBackbone

    clips = fixture["clips"]
    audio = fixture["audio"].reshape(clips, -1, *fixture["audio"].shape[1:])
    video = fixture["video"].float().reshape(clips, -1, *fixture["video"].shape[1:])
    return FrozenBackbone(classifier.backbone).tokens(audio, video, "audio_visual", "global", layer)


def test_the_probe_reads_the_authors_features_and_reproduces_their_logits(classifier, probe_fixture):
    from avsync.tasks.probe.head import ProbeHead

    features = probe_features(classifier, probe_fixture, "encoder")
    assert features.shape == probe_fixture["features"].shape
    assert relative_error(features, probe_fixture["features"]) < TOLERANCE
    head = ProbeHead(**classifier.head_config).eval()
    head.load_state_dict(classifier.head_state)
    with torch.no_grad():
        logits = head(features)
    assert relative_error(logits, probe_fixture["logits"]) < TOLERANCE
    # after the joint layer and its LayerNorm (avsync's earlier probe features) they are other numbers
    assert relative_error(probe_features(classifier, probe_fixture, "joint"), probe_fixture["features"]) > 0.1


def test_the_probe_module_defaults_to_the_authors_features(classifier, probe_fixture):
    from avsync.tasks.probe import ProbeModule

    module = ProbeModule(backbone=classifier.backbone, num_classes=5)
    assert module.hparams.layer == "encoder"
    module.head.load_state_dict(classifier.head_state)
    clips = probe_fixture["clips"]
    batch = {
        "audio": probe_fixture["audio"].reshape(clips, -1, *probe_fixture["audio"].shape[1:]),
        "video": probe_fixture["video"].float().reshape(clips, -1, *probe_fixture["video"].shape[1:]),
    }
    with torch.no_grad():
        logits = module.eval()(batch)
    assert relative_error(logits, probe_fixture["logits"]) < TOLERANCE


def test_other_classifier_heads_and_modes_are_refused_by_name(probe_fixture):
    from avsync.checkpoints import load_authors_classifier

    state, config = probe_fixture["state_dict"], probe_fixture["config"]
    with pytest.raises(CheckpointError, match="mode='audioonly' is not supported"):
        load_authors_classifier(state, **{**config, "mode": "audioonly"})
    with pytest.raises(CheckpointError, match="only that head is supported"):
        load_authors_classifier(state, **{**config, "aggregate": "concat_mlp"})
    with pytest.raises(CheckpointError, match="missing \\['classifier_head.bias'\\]"):
        load_authors_classifier({k: v for k, v in state.items() if k != "classifier_head.bias"}, **config)
    with pytest.raises(CheckpointError, match="label_dim=7"):
        load_authors_classifier(state, **{**config, "label_dim": 7})
