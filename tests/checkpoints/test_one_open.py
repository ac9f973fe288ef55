"""Each checkpoint file is opened once per use (issue 22): a Lightning `.ckpt`, an avsync `.safetensors`
export, the authors' `.pth`, the MAE file of `init_from`, a run's `--ckpt_path`, and `avsync retrieve`'s
checkpoint. The kernel counts the opens (inotify), whoever makes them: Python, torch's C++ zip reader or
the safetensors Rust library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from avsync.checkpoints import CheckpointError, init_from_mae, load_backbone, save_backbone
from avsync.cli import main as avsync
from avsync.model import CAVMAESync
from avsync.training import AtomicCheckpointIO
from tests.api.conftest import AUTHORS_KWARGS, REFERENCE, SMALL, fit_one_step, shrink_authors_state
from tests.conftest import shared_path
from tests.helpers.opens import count_opens
from tests.model.test_mae_init import SMALL as MAE_SMALL
from tests.model.test_mae_init import released_mae_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory):
    return fit_one_step(CAVMAESync(**SMALL), tmp_path_factory.mktemp("ckpt"))


def test_the_counter_sees_every_open_even_from_native_code(tmp_path):
    """What the tests below rule out: the earlier export read (tensors, then the header again) is 2."""
    path = save_backbone(CAVMAESync(**SMALL), tmp_path / "model.safetensors")
    with count_opens(path) as opens:
        load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            handle.metadata()
    assert opens.count == 2


def test_a_lightning_checkpoint_is_opened_once(lightning_checkpoint):
    with count_opens(lightning_checkpoint) as opens:
        backbone = load_backbone(lightning_checkpoint)
    assert opens.count == 1 and backbone.config["embed_dim"] == SMALL["embed_dim"]


def test_a_safetensors_export_is_opened_once_for_its_weights_and_config(tmp_path):
    original = CAVMAESync(**SMALL)
    path = save_backbone(original, tmp_path / "model.safetensors")
    with count_opens(path) as opens:
        backbone = load_backbone(path)
    assert opens.count == 1
    assert backbone.config == original.config
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in backbone.state_dict().items())


def test_a_damaged_export_is_still_refused_naming_the_file(tmp_path):
    path = save_backbone(CAVMAESync(**SMALL), tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_backbone(path)


def test_an_authors_file_is_opened_once(tmp_path):
    reference = torch.load(shared_path(*REFERENCE), weights_only=True)
    path = tmp_path / "authors.pth"
    torch.save({f"module.{k}": v for k, v in shrink_authors_state(reference["state_dict"]).items()}, path)
    with count_opens(path) as opens:
        backbone = load_backbone(path, **AUTHORS_KWARGS)
    assert opens.count == 1 and backbone.config["num_heads"] == AUTHORS_KWARGS["num_heads"]


def test_a_safetensors_file_named_as_a_pickle_is_recognized_from_the_same_opening(tmp_path):
    path = save_backbone(CAVMAESync(**SMALL), tmp_path / "model.safetensors").rename(tmp_path / "model.pt")
    with count_opens(path) as opens, pytest.raises(CheckpointError, match=r"model\.pt: this is a safe"):
        load_backbone(path)
    assert opens.count == 1


def test_the_mae_file_of_init_from_is_opened_once(tmp_path):
    path = tmp_path / "mae_pretrain_vit_base_full.pth"
    torch.save({"model": released_mae_layout()}, path)
    model = CAVMAESync(**MAE_SMALL)
    before = model.video_encoder[0].attn.qkv.weight.clone()
    with count_opens(path) as opens:
        init_from_mae(model, path, complete=True)  # what `init_from` runs (`PretrainModule.initialize_from`)
    assert opens.count == 1 and not torch.equal(model.video_encoder[0].attn.qkv.weight, before)


def test_a_runs_ckpt_path_is_opened_once_by_the_checkpoint_writer(lightning_checkpoint):
    io = AtomicCheckpointIO()
    with count_opens(lightning_checkpoint) as opens:
        checkpoint = io.load_checkpoint(lightning_checkpoint)
    assert opens.count == 1 and "optimizer_states" in checkpoint


def test_avsync_retrieve_reads_its_checkpoint_once(tmp_path, capsys):
    """Without `--alignment` the model's window chooses it: from the one load of the run, not an extra
    read of the whole checkpoint before it."""
    from tests.data.conftest import write_shards

    write_shards(tmp_path / "shards", [3, 2], fbank_frames=120)
    ckpt = save_backbone(CAVMAESync(**{**SMALL, "mel_bins": 128}), tmp_path / "tiny.safetensors")
    argv = ["retrieve", "--ckpt", str(ckpt), "--shards", str(tmp_path / "shards"), "--out", str(tmp_path)]
    with count_opens(ckpt) as opens:
        code = avsync([*argv, "--accelerator", "cpu", "--workers", "0", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    assert opens.count == 1
    assert json.loads((tmp_path / "retrieval.json").read_text())["metadata"]["clips"] == 5


@pytest.mark.parametrize("audio_length, expected", [(1024, "authors"), (32, "clip")])
def test_without_an_alignment_the_data_module_takes_the_models(audio_length, expected):
    """What lets `avsync retrieve` skip its extra read: the window length linked from the loaded model
    chooses the alignment (`default_alignment`), as the tool chose it from its own read before."""
    from avsync.data.datamodule import AVShardDataModule

    data = AVShardDataModule(test_shards="x", image_size=32, audio_length=audio_length, alignment=None)
    assert data.alignment == expected
    assert AVShardDataModule(test_shards="x", audio_length=audio_length).alignment == "clip"  # as given
