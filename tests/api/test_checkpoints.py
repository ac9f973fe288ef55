"""`avsync.load` and `avsync export` on every checkpoint format: the same model whichever way it was
saved, bit for bit; the released model's numbers; and files that must be refused, with the reasons."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import avsync.api
from avsync.api import load
from avsync.checkpoints import (
    CONFIG_METADATA_KEY,
    FORMAT_VERSION,
    CheckpointError,
    load_backbone,
    save_backbone,
)
from avsync.cli import main as avsync_main
from avsync.model import CAVMAESync
from tests.api.conftest import (
    AUTHORS_KWARGS,
    REFERENCE,
    SMALL,
    as_authors_state,
    fit_one_step,
    shrink_authors_state,
)
from tests.conftest import shared_path


def export_main(argv: list[str]) -> int:
    """`avsync export ARGV`, as the command runs it."""
    return avsync_main(["export", *argv])


def embeddings(model, audio: torch.Tensor, video: torch.Tensor) -> list[torch.Tensor]:
    out = model.embed(audio, video, patches=True)
    return [out.audio, out.video, out.audio_patches, out.video_patches]


def assert_identical(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def every_format(tmp_path_factory, authors_template) -> dict:
    """One set of trained weights saved as a Lightning checkpoint, a safetensors export of it, and an
    authors' file (DataParallel `module.` prefix) of it."""
    folder = tmp_path_factory.mktemp("formats")
    torch.save(authors_template, folder / "template.pt")
    backbone = load_backbone(folder / "template.pt", **AUTHORS_KWARGS)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    lightning = fit_one_step(backbone, folder)
    trained = load_backbone(lightning).state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before), "the fit step changed the weights"
    authors = folder / "authors.pth"
    torch.save({f"module.{k}": v for k, v in as_authors_state(trained, authors_template).items()}, authors)
    exported = folder / "export.safetensors"
    assert export_main([str(lightning), str(exported), "--json"]) == 0
    return {"lightning": lightning, "authors": authors, "safetensors": exported, "folder": folder}


def test_every_format_gives_bitwise_identical_embeddings(every_format):
    audio, video = torch.randn(2, 3, 64, 128), torch.randn(2, 3, 3, 32, 32)
    expected = embeddings(load(every_format["lightning"]), audio, video)
    assert expected[0].shape == (2, 3, 64) and expected[3].shape == (2, 3, 4, 64)
    assert_identical(embeddings(load(every_format["safetensors"]), audio, video), expected)
    assert_identical(embeddings(load(every_format["authors"], **AUTHORS_KWARGS), audio, video), expected)
    # and exports made from the other two formats
    folder = every_format["folder"]
    from_authors, again = folder / "from_authors.safetensors", folder / "again.safetensors"
    kwargs = json.dumps(AUTHORS_KWARGS)
    assert export_main([str(every_format["authors"]), str(from_authors), "--authors-kwargs", kwargs]) == 0
    assert export_main([str(every_format["safetensors"]), str(again)]) == 0
    for path in (from_authors, again):
        assert_identical(embeddings(load(path), audio, video), expected)


def test_a_lightning_checkpoint_exported_and_reloaded_embeds_bit_for_bit(small_checkpoint, tmp_path):
    exported = tmp_path / "small.safetensors"
    assert export_main([str(small_checkpoint), str(exported)]) == 0
    audio, video = torch.randn(4, 32, 128), torch.randn(4, 3, 32, 32)
    assert_identical(
        embeddings(load(exported), audio, video), embeddings(load(small_checkpoint), audio, video)
    )


def test_export_holds_the_config_and_version_and_round_trips_every_tensor(every_format):
    path = every_format["safetensors"]
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    original = load_backbone(every_format["lightning"])
    assert json.loads(metadata[CONFIG_METADATA_KEY]) == original.config
    assert metadata["format_version"] == str(FORMAT_VERSION) and metadata["source"] == "pretrain.ckpt"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar[CONFIG_METADATA_KEY] == original.config and sidecar["format_version"] == FORMAT_VERSION
    stored = load_file(str(path))
    assert stored.keys() == original.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in original.state_dict().items())
    reloaded = load_backbone(path)
    assert reloaded.config == original.config and not reloaded.training


def test_the_released_model_through_avsync_load_reproduces_the_reference_features(reference):
    model = load(shared_path(*REFERENCE), **reference["config"])
    assert model.device.type == "cpu" and model.precision == "fp32" and not model.backbone.training
    out = model.embed(reference["audio"], reference["video"], patches=True)  # 4 pairs as T = 4
    for name, value in [
        ("feat_global_a", out.audio),
        ("feat_global_v", out.video),
        ("feat_patch_v", out.video_patches),
    ]:
        expected = reference[name]
        assert value.shape == expected.shape
        assert ((value - expected).abs().max() / expected.abs().max()).item() < 1e-5, name


def test_an_original_cavmae_file_loads_as_cavmae_and_hears_the_whole_clip(reference, real_clips, tmp_path):
    path = tmp_path / "cavmae.pth"
    torch.save(shrink_authors_state(reference["state_dict"], global_token=False, audio_length=1024), path)
    model = load(path, **AUTHORS_KWARGS)
    config = model.backbone.config
    assert config["global_token"] is False and config["num_registers"] == 0 and config["audio_length"] == 1024
    assert model.alignment == "authors"
    clip = model.embed_video(real_clips[0])
    # every frame is paired with the same (whole-clip) spectrogram, so all audio tokens agree
    assert torch.equal(clip.audio, clip.audio[:1].expand_as(clip.audio))
    assert not torch.equal(clip.video[0], clip.video[1])
    # and that spectrogram is the clip's, padded to the authors' 1024 frames and normalized
    from avsync.data.clip import extract_video_clip
    from avsync.data.transforms import AUDIO_MEAN, AUDIO_STD

    fbank = torch.from_numpy(extract_video_clip(real_clips[0]).fbank).float()
    whole = torch.nn.functional.pad(fbank, (0, 0, 0, 1024 - fbank.shape[0]))
    expected = model.embed(((whole - AUDIO_MEAN) / AUDIO_STD)[None]).audio  # T = 1
    torch.testing.assert_close(clip.audio[0], expected[0])


class CodePayload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['AVSYNC_PAYLOAD']).touch()",))


def test_a_checkpoint_with_a_code_payload_is_refused_and_its_code_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("AVSYNC_PAYLOAD", str(marker))
    path = tmp_path / "evil.ckpt"
    state = CAVMAESync(**SMALL).state_dict()
    torch.save(
        {"state_dict": state, "hyper_parameters": {"backbone_config": SMALL}, "x": CodePayload()}, path
    )
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load"):
        load(path)
    assert export_main([str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists(), "the pickled code ran"
    assert not (tmp_path / "out.safetensors").exists()
    # the same pickle machinery does run it: the check above is not vacuous
    pickle.loads(pickle.dumps(CodePayload()))
    assert marker.exists()


def test_wrong_shapes_and_unknown_keys_are_listed(small_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    state = checkpoint["state_dict"]
    state["backbone.audio_tokenizer.modality"] = torch.zeros(1, 1, 7)
    state["backbone.surprise.weight"] = torch.zeros(3)
    del state["backbone.joint.norm_video.bias"]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(CheckpointError) as caught:
        load(broken)
    message = str(caught.value)
    assert "broken.ckpt" in message
    assert "missing ['joint.norm_video.bias']" in message
    assert "unexpected ['surprise.weight']" in message
    assert "audio_tokenizer.modality: (1, 1, 7) vs (1, 1, 32)" in message
    assert export_main([str(broken), str(tmp_path / "out.safetensors")]) == 2
    assert "surprise.weight" in capsys.readouterr().err


def test_a_safetensors_export_whose_config_does_not_fit_its_weights_is_refused(small_checkpoint, tmp_path):
    path = save_backbone(load_backbone(small_checkpoint), tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    lying = tmp_path / "lying.safetensors"
    config = {**json.loads(metadata[CONFIG_METADATA_KEY]), "embed_dim": 64}
    save_file(
        load_file(str(path)), str(lying), metadata={**metadata, CONFIG_METADATA_KEY: json.dumps(config)}
    )
    with pytest.raises(
        CheckpointError, match=r"lying\.safetensors: weights do not fit.*wrong shapes \['audio_tokenizer"
    ):
        load(lying)
    newer = tmp_path / "newer.safetensors"
    save_file(
        load_file(str(path)), str(newer), metadata={**metadata, "format_version": str(FORMAT_VERSION + 1)}
    )
    with pytest.raises(CheckpointError, match="newer.safetensors: export format version '2'.*upgrade avsync"):
        load(newer)


def test_an_authors_file_with_unknown_keys_or_wrong_shapes_is_refused_with_the_list(
    authors_template, tmp_path
):
    state = dict(authors_template)
    state["blocks_u.0.attn.qkv.weight"] = torch.zeros(5, 64)
    state["head.weight"] = torch.zeros(10, 64)
    path = tmp_path / "authors.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load(path, **AUTHORS_KWARGS)
    message = str(caught.value)
    assert "authors.pth" in message and "unexpected keys ['head.weight']" in message
    assert "blocks_u.0.attn.qkv.weight: (5, 64) vs (192, 64)" in message


def test_export_refuses_an_output_that_load_would_not_recognize(small_checkpoint, tmp_path, capsys):
    assert export_main([str(small_checkpoint), str(tmp_path / "model.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists()
    assert avsync.api.export(small_checkpoint, tmp_path / "m.safetensors").is_file()
