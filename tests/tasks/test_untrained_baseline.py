"""`avsync export --random-init CONFIG OUT.safetensors`: the untrained twin of a pretraining config, the
baseline the demo compares every evaluation with, as a file any evaluation can load."""

from __future__ import annotations

from pathlib import Path

import torch

from avsync.checkpoints import load_backbone
from avsync.cli import main as avsync_main
from avsync.model import CAVMAESync

TINY = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "tiny_cpu.yaml"


def export_main(argv: list[str]) -> int:
    """`avsync export ARGV`, as the command runs it."""
    return avsync_main(["export", *argv])


def tiny_arguments() -> dict:
    import yaml

    return yaml.safe_load(TINY.read_text())["model"]["init_args"]["backbone"]["init_args"]


def test_random_init_writes_the_seeded_untrained_backbone_of_the_config(tmp_path):
    assert export_main(["--random-init", str(TINY), str(tmp_path / "seed0.safetensors")]) == 0
    assert export_main(["--random-init", str(TINY), str(tmp_path / "seed1.safetensors"), "--seed", "1"]) == 0
    exported = load_backbone(tmp_path / "seed0.safetensors")
    torch.manual_seed(0)
    twin = CAVMAESync(**tiny_arguments())  # as the demo builds its untrained baseline
    assert exported.config == twin.config and exported.config["embed_dim"] == 128
    for (name, a), b in zip(exported.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = load_backbone(tmp_path / "seed1.safetensors").state_dict()
    assert not torch.equal(
        other["audio_encoder.0.attn.qkv.weight"], twin.state_dict()["audio_encoder.0.attn.qkv.weight"]
    )


def test_a_recipe_name_is_accepted(tmp_path):
    assert export_main(["--random-init", "pretrain/tiny_cpu", str(tmp_path / "tiny.safetensors")]) == 0
    assert load_backbone(tmp_path / "tiny.safetensors").config["encoder_depth"] == 3


def test_a_config_without_a_usable_backbone_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    backbone:\n      init_args:\n        embed_dims: 3\n")
    assert export_main(["--random-init", str(bad), str(tmp_path / "x.safetensors")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(bad) in error and "embed_dims" in error
    assert not (tmp_path / "x.safetensors").exists()
