"""Checkpoints run no code, never configure a run, never make a loader build more than the file holds,
and every problem with one is a one-line error naming the file (exit 2), in `avsync fit / validate`
as in the tools and `avsync.load`.

Runs are real: `avsync fit` in subprocesses (with torch told to load unsafely through
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`), the other entry points through `avsync.cli.main` in this process;
peak memory is measured in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import avsync
from avsync.api import export as export_checkpoint
from avsync.checkpoints import CheckpointError, load_backbone, save_backbone
from avsync.cli import main as avsync_main
from avsync.model import CAVMAESync

from .conftest import SMALL_BACKBONE, avsync_command, avsync_env, checkpoints_dir, fit_config


class Payload:
    """Unpickling this runs `os.mkdir(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


#: An epoch of 8 steps of 2 clips, streamed: the LR schedule needs the run's length.
STREAM = {"resampled": True, "epoch_length": 16}


def run_avsync(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        avsync_command(*args), env=avsync_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def one_line_error(stderr: str, command: str) -> str:
    """The error line of a refused run; fails unless it is one `avsync COMMAND: error:` line, no traceback.

    Blocks of `--- Logging error ---` are dropped first: in this process a logger may still hold an
    earlier test's captured (closed) stderr, and `logging` reports that with a traceback of its own.
    """
    stderr = re.sub(r"--- Logging error ---\n.*?\nArguments: .*?\n", "", stderr, flags=re.S)
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if line.startswith(f"avsync {command}: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(prepared_shards, tmp_path_factory) -> dict:
    """One real `avsync fit` epoch (8 steps): its config and `last.ckpt`."""
    root = tmp_path_factory.mktemp("checkpoint_safety")
    config = fit_config(root / "fit.yaml", prepared_shards, root / "runs", data=STREAM)
    result = run_avsync("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    last = checkpoints_dir(root / "runs") / "last.ckpt"
    assert last.is_file()
    return {"root": root, "config": config, "last": last, "shards": prepared_shards}


# ------------------------------------------------------------------------------ 1. no code runs
def test_a_code_payload_never_runs_through_fit_validate_or_test_even_with_unsafe_loads_forced(
    trained, tmp_path, reliability
):
    marker = tmp_path / "payload_ran"
    content = torch.load(trained["last"], weights_only=True)
    content["extra"] = Payload(marker)
    runs = tmp_path / "runs"
    config = fit_config(tmp_path / "fit.yaml", trained["shards"], runs, data=STREAM)
    planted = checkpoints_dir(runs) / "last.ckpt"
    planted.parent.mkdir(parents=True)
    torch.save(content, planted)
    unsafe = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    evaluation = ["--data.init_args.val_shards", str(trained["shards"])]
    for command, where in (("fit", "last"), ("validate", str(planted))):  # (PretrainModule has no test)
        extra = evaluation if command != "fit" else []
        result = run_avsync(command, "--config", str(config), "--ckpt_path", where, *extra, env=unsafe)
        assert result.returncode == 2, result.stderr[-3000:]
        line = one_line_error(result.stderr, command)
        assert str(planted) in line and "refused to load" in line and "posix.mkdir" in line
        assert not marker.exists()
    reliability.record(
        "Hostile inputs",
        "a `last.ckpt` with a code payload, torch told to load unsafely "
        "(`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`)",
        "avsync fit --ckpt_path last, avsync validate --ckpt_path FILE (subprocesses)",
        "refused in one line naming the file (exit 2), the payload never runs: every read passes "
        "`weights_only=True` explicitly (torch >= 2.10 lets no variable override it)",
    )


def test_weights_only_cannot_be_switched_off_from_the_command_line(trained, capsys, reliability):
    with pytest.raises(SystemExit) as exit_:
        avsync_main(["fit", "--config", str(trained["config"]), "--weights_only", "false"])
    assert exit_.value.code == 2
    assert "weights_only" in capsys.readouterr().err
    reliability.record(
        "Hostile inputs",
        "`--weights_only false` on the command line",
        "avsync fit",
        "not an option (exit 2): checkpoints are always read weights-only",
    )


# ------------------------------------------------------------------------------ 2. the config wins
def test_a_resume_takes_its_configuration_from_the_config_and_command_line_not_the_checkpoint(
    trained, tmp_path, reliability
):
    planted_module = tmp_path / "modules" / "planted_by_checkpoint.py"
    planted_module.parent.mkdir()
    marker = tmp_path / "module_imported"
    planted_module.write_text(f"import os\nos.mkdir({str(marker)!r})\nclass Planted: pass\n")
    content = torch.load(trained["last"], weights_only=True)
    content["hyper_parameters"].update(
        lr=123.0, max_nonfinite_steps=77, _class_path="planted_by_checkpoint.Planted"
    )
    rigged = tmp_path / "rigged.ckpt"
    torch.save(content, rigged)
    runs = tmp_path / "runs"
    config = fit_config(
        tmp_path / "fit.yaml", trained["shards"], runs, trainer={"max_epochs": 2}, data=STREAM
    )
    configured = yaml.safe_load(config.read_text())["model"]["init_args"].get("max_nonfinite_steps", 10)
    path = os.pathsep.join([str(planted_module.parent), avsync_env()["PYTHONPATH"]])
    result = run_avsync(
        "fit", "--config", str(config), "--ckpt_path", str(rigged), "--model.init_args.lr", "0.0005",
        env={"PYTHONPATH": path},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    saved = yaml.safe_load((runs / "reliability" / "run" / "config.yaml").read_text())["model"]["init_args"]
    assert saved["lr"] == 0.0005 and saved.get("max_nonfinite_steps", 10) == configured
    resumed = torch.load(checkpoints_dir(runs) / "last.ckpt", weights_only=True)
    assert resumed["hyper_parameters"]["lr"] == 0.0005
    assert resumed["hyper_parameters"]["max_nonfinite_steps"] == configured
    assert resumed["global_step"] == 2 * content["global_step"]  # it did resume: one more epoch
    reliability.record(
        "Hostile inputs",
        "a checkpoint whose stored hyper-parameters differ from the config (`lr`, `max_nonfinite_steps`) "
        "and name another module (`_class_path`)",
        "avsync fit --ckpt_path FILE --model.init_args.lr ... (subprocess)",
        "the run resumes with the config's and command line's values; the named module is never imported",
    )


# ------------------------------------------------------------------------------ files that cannot serve
def _truncated(trained, folder: Path) -> Path:
    path = folder / "truncated.ckpt"
    data = trained["last"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _export(trained, folder: Path) -> Path:
    return export_checkpoint(trained["last"], folder / "export.safetensors")


def _export_named_ckpt(trained, folder: Path) -> Path:
    path = folder / "export.ckpt"
    path.write_bytes(_export(trained, folder).read_bytes())
    return path


def _rewritten(change, name: str):
    def make(trained, folder: Path) -> Path:
        content = torch.load(trained["last"], weights_only=True)
        change(content)
        torch.save(content, folder / name)
        return folder / name

    return make


def _drop_training_state(content: dict) -> None:
    for key in ("optimizer_states", "lr_schedulers", "loops"):
        content.pop(key)


def _other_model(content: dict) -> None:
    content["state_dict"] = {
        ("backbone." if k.startswith("backbone.") else "") + k.replace("backbone.", "encoder.", 1): v
        for k, v in content["state_dict"].items()
    }


def _text(trained, folder: Path) -> Path:
    path = folder / "notes.ckpt"
    path.write_text("minutes of the meeting, not a checkpoint\n" * 20)
    return path


RESUME_CASES = [
    ("a truncated checkpoint", _truncated, "not a readable PyTorch checkpoint"),
    ("a text file named `.ckpt`", _text, "not a readable PyTorch checkpoint"),
    ("an avsync safetensors export", _export, "a safetensors file holds weights only"),
    ("a safetensors export renamed `.ckpt`", _export_named_ckpt, "a safetensors file holds weights only"),
    (
        "a checkpoint saved with `save_weights_only`",
        _rewritten(_drop_training_state, "weights.ckpt"),
        "holds no training state (optimizer_states, lr_schedulers, loops missing",
    ),
    (
        "a checkpoint whose `hyper_parameters` is a list",
        _rewritten(lambda c: c.update(hyper_parameters=[1, 2]), "hparams.ckpt"),
        "its hyper_parameters are not a mapping",
    ),
    (
        "a checkpoint whose `state_dict` holds a string",
        _rewritten(lambda c: c["state_dict"].update(note="hello"), "strings.ckpt"),
        "its state_dict is not a mapping of names to tensors",
    ),
    (
        "a checkpoint of another model (other weight names)",
        _rewritten(_other_model, "other.ckpt"),
        "its weights do not fit the configured model",
    ),
    ("a checkpoint path that does not exist", lambda t, f: f / "absent.ckpt", "no such checkpoint file"),
]


@pytest.mark.parametrize("case, make, expected", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_a_resume_file_that_cannot_serve_the_run_is_refused_in_one_line(
    case, make, expected, trained, tmp_path, capsys, reliability
):
    path = make(trained, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        avsync_main(["fit", "--config", str(trained["config"]), "--ckpt_path", str(path)])
    assert exit_.value.code == 2
    line = one_line_error(capsys.readouterr().err, "fit")
    assert str(path) in line and expected in line
    reliability.record(
        "Hostile inputs",
        f"{case} given to resume",
        "avsync fit --ckpt_path FILE",
        f"exit 2, one line: `{expected}`",
    )


# ------------------------------------------------------------------------------ 3. size before building
def _big_config(embed_dim: int) -> dict:
    return {**SMALL_BACKBONE, "embed_dim": embed_dim}


def _tiny_files(folder: Path) -> list[Path]:
    """Three small files that each declare a backbone of width 2048 (about 600 MB of weights)."""
    small = CAVMAESync(**SMALL_BACKBONE)
    lying = folder / "lying.safetensors"  # the small model's tensors under a big config
    save_file(
        {k: v.contiguous() for k, v in small.state_dict().items()},
        str(lying),
        metadata={"avsync_backbone_config": json.dumps(_big_config(2048)), "format_version": "1"},
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CAVMAESync(**_big_config(2048)).state_dict().items()}
    hollow = folder / "hollow.ckpt"  # every tensor of the big model, as a stride-0 view of one value
    torch.save(
        {
            "state_dict": {f"backbone.{k}": torch.zeros(1).expand(shape) for k, shape in shapes.items()},
            "hyper_parameters": {"backbone_config": _big_config(2048)},
        },
        hollow,
    )
    authors = folder / "authors.pth"  # the authors' layout: zero-size tensors and a block numbered 99999
    torch.save(
        {
            "patch_embed_v.proj.weight": torch.zeros(2048, 0, 16, 16),
            "pos_embed_v": torch.zeros(1, 4, 0),
            "pos_embed_a": torch.zeros(1, 4, 0),
            "blocks_a.0.mlp.fc1.weight": torch.zeros(8192, 0),
            "blocks_a.99999.norm1.weight": torch.zeros(0),
            "decoder_embed.weight": torch.zeros(512, 0),
        },
        authors,
    )
    return [lying, hollow, authors]


PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from avsync.cli import main
    codes = [main(["export", path, sys.argv[1] + "/out.safetensors"]) for path in sys.argv[2:]]
    print(codes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def peak_rss_mb(folder: Path, *files: Path) -> tuple[list[int], int, str]:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(folder), *map(str, files)],
        env=avsync_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes, peak = result.stdout.strip().splitlines()[-1].rsplit("] ", 1)
    return json.loads(codes + "]"), int(peak), result.stderr


def test_a_tiny_file_cannot_make_a_tool_build_a_huge_model(tmp_path, reliability):
    small = save_backbone(CAVMAESync(**SMALL_BACKBONE), tmp_path / "small.safetensors")
    files = _tiny_files(tmp_path)
    assert max(path.stat().st_size for path in files) < 500_000
    with torch.device("meta"):
        declared_mb = 4 * sum(p.numel() for p in CAVMAESync(**_big_config(2048)).parameters()) / 2**20
    codes, baseline, _ = peak_rss_mb(tmp_path, small)
    assert codes == [0]
    codes, peak, stderr = peak_rss_mb(tmp_path, *files)
    assert codes == [2, 2, 2], stderr
    errors = [line for line in stderr.splitlines() if line.startswith("avsync export: error:")]
    assert len(errors) == 3 and "Traceback" not in stderr
    assert "lying.safetensors: weights do not fit the backbone" in errors[0]
    assert "hollow.ckpt: its tensors declare" in errors[1]
    assert "authors.pth: backbone config declares more blocks than the file has tensors" in errors[2]
    assert peak - baseline < 150, (peak, baseline, declared_mb)
    reliability.record(
        "Hostile inputs",
        "files of < 0.5 MB declaring a backbone of width 2048 "
        f"({declared_mb:.0f} MB): a lying export config, stride-0 tensor views, the authors' layout "
        "with empty tensors and a block numbered 99999",
        "avsync export (subprocess, peak RSS)",
        f"refused in one line each, before building (the model is built on the meta device first): "
        f"peak RSS {peak} MB against {baseline} MB for exporting the small model",
    )


# ------------------------------------------------------------------------------ 4. bad metadata, every tool
def _metadata(config, version: str = "1") -> dict:
    return {
        "avsync_backbone_config": config if isinstance(config, str) else json.dumps(config),
        "format_version": version,
    }


SMALL_CONFIG = CAVMAESync(**SMALL_BACKBONE).config
METADATA_CASES = [
    (
        "config metadata that is not JSON",
        _metadata("{not json"),
        "backbone config in its metadata is not JSON",
    ),
    ('`format_version` "²"', _metadata(SMALL_CONFIG, "²"), "export format version '²' is not one"),
    ("`embed_dim` -5", _metadata({**SMALL_CONFIG, "embed_dim": -5}), "invalid embed_dim: -5"),
    (
        '`embed_dim` "32" (a string)',
        _metadata({**SMALL_CONFIG, "embed_dim": "32"}),
        "invalid embed_dim: '32'",
    ),
    (
        "`global_token` 1 (not a bool)",
        _metadata({**SMALL_CONFIG, "global_token": 1}),
        "invalid global_token: 1",
    ),
    ("`temperature` NaN", _metadata({**SMALL_CONFIG, "temperature": math.nan}), "invalid temperature: nan"),
    ("a config that is a list", _metadata([1, 2]), "backbone config is a list, not a mapping"),
    ("an unknown config key", _metadata({**SMALL_CONFIG, "depth": 3}), "does not fit this avsync version"),
    (
        "`num_heads` that does not divide `embed_dim`",
        _metadata({**SMALL_CONFIG, "num_heads": 3}),
        "cannot build",
    ),
]


@pytest.fixture(scope="module")
def media(prepared_shards) -> dict:
    videos = sorted((prepared_shards.parent / "synth" / "videos").glob("*.mp4"))
    return {"shards": prepared_shards, "video": videos[0], "synth": prepared_shards.parent / "synth"}


def tool_runs(path: Path, media: dict, out: Path) -> dict[str, list[str]]:
    ckpt = str(path)
    return {
        "export": ["export", ckpt, str(out / "x.safetensors")],
        "embed": ["embed", str(media["video"]), "--ckpt", ckpt, "--out", str(out / "e.npz")],
        "retrieve": ["retrieve", "--ckpt", ckpt, "--shards", str(media["shards"]), "--workers", "0"],
        "localize": ["localize", "--ckpt", ckpt, "--synth", str(media["synth"]), "--out", str(out / "loc")],
        "segment": ["segment", str(media["video"]), "--ckpt", ckpt, "--out", str(out / "seg")],
    }


@pytest.mark.parametrize("case, metadata, expected", METADATA_CASES, ids=[c[0] for c in METADATA_CASES])
def test_bad_export_metadata_is_a_one_line_error_in_every_tool_and_a_checkpoint_error_in_load(
    case, metadata, expected, media, tmp_path, capsys, reliability
):
    path = tmp_path / "bad.safetensors"
    state = {k: v.contiguous() for k, v in CAVMAESync(**SMALL_BACKBONE).state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"{path.name}: .*{re.escape(expected)}"):
        avsync.load(path, device="cpu")
    for tool, argv in tool_runs(path, media, tmp_path).items():
        assert avsync_main(argv) == 2, tool
        line = one_line_error(capsys.readouterr().err, tool)
        assert str(path) in line and expected in line, line
    reliability.record(
        "Hostile inputs",
        f"a safetensors export with {case}",
        "avsync export / embed / retrieve / localize / segment, avsync.load",
        f"CheckpointError naming the file: `{expected}`; exit 2 and one line in every tool",
    )


# ------------------------------------------------------------------------------ neighbours in load_backbone
def _lightning(hyper_parameters, state=None) -> dict:
    model = CAVMAESync(**SMALL_BACKBONE)
    weights = state if state is not None else {f"backbone.{k}": v for k, v in model.state_dict().items()}
    return {"state_dict": weights, "hyper_parameters": hyper_parameters}


LOAD_CASES = [
    (
        "a Lightning checkpoint whose `hyper_parameters` is a list",
        lambda p: torch.save(_lightning([1]), p),
        "hyper_parameters or state_dict is not a mapping",
    ),
    (
        "a Lightning checkpoint whose `backbone_config` is a string",
        lambda p: torch.save(_lightning({"backbone_config": "vitb"}), p),
        "backbone config is a str, not a mapping",
    ),
    (
        "a Lightning checkpoint declaring 10^9 encoder blocks",
        lambda p: torch.save(_lightning({"backbone_config": {**SMALL_BACKBONE, "encoder_depth": 10**9}}), p),
        "declares more blocks than the file has tensors",
    ),
    (
        "a text file named `.ckpt`",
        lambda p: p.write_text("not a checkpoint\n" * 30),
        "not a readable PyTorch checkpoint",
    ),
    (
        "a safetensors file named `.ckpt`",
        lambda p: save_file({"a": torch.zeros(2)}, str(p)),
        "this is a safetensors file, not a PyTorch checkpoint; give it the .safetensors suffix",
    ),
]


@pytest.mark.parametrize("case, write, expected", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_malformed_checkpoints_are_checkpoint_errors_naming_the_file(
    case, write, expected, tmp_path, reliability
):
    path = tmp_path / "model.ckpt"
    write(path)
    with pytest.raises(CheckpointError, match=f"{path.name}: .*{re.escape(expected)}"):
        load_backbone(path)
    reliability.record(
        "Hostile inputs", case, "load_backbone (every tool, avsync.load)", f"CheckpointError: `{expected}`"
    )


def test_a_pytorch_file_named_safetensors_is_a_checkpoint_error(tmp_path, reliability):
    path = tmp_path / "model.safetensors"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_backbone(path)
    reliability.record(
        "Hostile inputs",
        "a PyTorch checkpoint named `.safetensors`",
        "load_backbone (every tool, avsync.load)",
        "CheckpointError: `not a readable safetensors file`",
    )
