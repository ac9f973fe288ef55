"""Bad values and memory bombs (issue 21, items 2, 3, 13, 14), through the real entry points.

- a shard sample whose metadata claims 10**12 frames: `avsync retrieve` and `avsync fit` (subprocesses,
  their resident memory watched) skip it with its reason, in bounded memory;
- a batch larger than the epoch or the data: refused up front, one line, exit 2;
- config values no run can use: `avsync fit --config` (through `avsync.cli.main`) refuses each in one line
  naming the key, exit 2, before any work; the constructors raise the same `ConfigError` from Python;
- numeric tool flags out of range: a usage error (exit 2) before the tool does any work.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from avsync.checkpoints import save_backbone
from avsync.cli import main as avsync_main
from avsync.config_checks import ConfigError
from avsync.data.datamodule import AVShardDataModule
from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule
from avsync.tasks.localization_data import LocalizationDataModule
from avsync.tasks.probe import ProbeModule
from avsync.tasks.retrieval import RetrievalModule

from .conftest import SMALL_BACKBONE, avsync_command, avsync_env, fit_config

#: Resident memory (MiB) past which a watched subprocess is killed: `avsync retrieve` on these shards peaks
#: at about 1 GiB; a sample's `num_frames: 10**12` used to take it past 2.5 GiB within a minute.
RSS_LIMIT_MIB = 2048
HUGE = 10**12


def watched(command: list[str], timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Run `command`, polling its resident memory; killed past `RSS_LIMIT_MIB`. Returns the result and the
    peak RSS seen (MiB)."""
    process = subprocess.Popen(
        command, env=avsync_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak, started = 0, time.monotonic()
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            rss = next(
                int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS")
            )
        except (OSError, StopIteration):  # exited between poll() and the read
            rss = 0
        peak = max(peak, rss // 1024)
        if peak > RSS_LIMIT_MIB or time.monotonic() - started > timeout:
            process.kill()
            break
        time.sleep(0.1)
    stdout, stderr = process.communicate()
    assert peak <= RSS_LIMIT_MIB, f"{command[3]} grew past {RSS_LIMIT_MIB} MiB (killed)"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak


def claim_frames(shard: Path, frames: int) -> str:
    """Rewrite the first sample of `shard` so that its metadata claims `frames` frames; returns its id."""
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    changed = None
    with tarfile.open(shard, "w") as archive:
        for member, data in members:
            if changed is None and member.name.endswith(".json"):
                metadata = {**json.loads(data), "num_frames": frames}
                changed, data = metadata["id"], json.dumps(metadata).encode()
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return changed


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_backbone(
        CAVMAESync(**SMALL_BACKBONE).eval(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    )


# ------------------------------------------------------------------------------------------ item 2
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="memory is read from /proc (Linux)")
def test_a_sample_claiming_a_trillion_frames_is_skipped_in_bounded_memory(
    prepared_shards, tiny_checkpoint, tmp_path, reliability
):
    shards = tmp_path / "shards"
    shutil.copytree(prepared_shards, shards)
    bad = claim_frames(shards / "shard-000003.tar", HUGE)
    reason = f"metadata says {HUGE} frames, the sample holds 16 frame members"

    out = tmp_path / "retrieval"
    retrieve, retrieve_peak = watched(
        avsync_command(
            "retrieve", "--ckpt", str(tiny_checkpoint), "--shards", str(shards), "--out", str(out),
            "--workers", "0", "--batch-size", "4", "--accelerator", "cpu",
        )
    )  # fmt: skip
    assert retrieve.returncode == 0, retrieve.stderr[-3000:]
    assert f"sample '{bad}' of {shards / 'shard-000003.tar'}: ValueError: {reason}" in retrieve.stderr
    assert "skipped samples in this run: test 1 (1 frame count)" in retrieve.stderr
    assert json.loads((out / "retrieval.json").read_text())["metadata"]["clips"] == 15

    runs = tmp_path / "runs"
    config = fit_config(
        tmp_path / "fit.yaml", shards, runs, trainer={"max_steps": 100}, model={"warmup_steps": 1}
    )  # fixed mode: every clip is read once, the bad one included
    fit, fit_peak = watched(avsync_command("fit", "--config", str(config)))
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert reason in fit.stderr and "skipped samples in this run: train 1 (1 frame count)" in fit.stderr
    print(f"peak RSS (MiB): retrieve {retrieve_peak}, fit {fit_peak}")

    for entry_point, peak, kept in (
        ("avsync retrieve (subprocess)", retrieve_peak, "retrieval scores the other 15 clips"),
        ("avsync fit (subprocess), fixed mode", fit_peak, "the run trains on the other 15 clips"),
    ):
        reliability.record(
            "Hostile inputs",
            "a sample's metadata claiming `num_frames: 10**12` (a multiple of 16)",
            entry_point,
            f"skipped as `frame count`, logged as `{reason}`, before the claim sizes anything (the sample's "
            f"own members bound it); {kept}; peak RSS {peak} MiB (before: 3 GB in 34 s, without end)",
        )


# ------------------------------------------------------------------------------------------ item 3
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="memory is read from /proc (Linux)")
def test_a_batch_larger_than_the_epoch_is_refused_up_front(prepared_shards, tmp_path, reliability):
    data = {"resampled": True, "epoch_length": 8, "batch_size": 1_000_000_000}
    config = fit_config(tmp_path / "fit.yaml", prepared_shards, tmp_path / "runs", data=data)
    started = time.monotonic()
    result, peak = watched(avsync_command("fit", "--config", str(config)), timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    message = (
        "avsync fit: error: AVShardDataModule: batch_size=1000000000 is larger than an epoch, epoch_length=8 "
        "clips per rank; lower batch_size or raise epoch_length"
    )
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()
    print(f"refused in {elapsed:.1f} s, peak RSS {peak} MiB")
    reliability.record(
        "Hostile inputs",
        "`batch_size: 1000000000` with `resampled: true, epoch_length: 8`",
        "avsync fit (subprocess)",
        f"refused before any work, exit 2: `{message.removeprefix('avsync fit: error: ')}`; peak RSS {peak} "
        "MiB (before: 3 GB in 16 s, gathering a batch that never fills)",
    )


@pytest.mark.parametrize(
    "case, data, expected",
    [
        (
            "a batch larger than the data, fixed mode",
            {"batch_size": 17},
            "batch_size=17 is larger than the training data, 16 clips in {shards}",
        ),
        (
            "a batch larger than the manifest's epoch, resampled mode without epoch_length",
            {"batch_size": 17, "resampled": True},
            "batch_size=17 is larger than an epoch, 16 clips per rank (the manifests' 16 over 1 rank(s)); "
            "lower batch_size or set epoch_length",
        ),
    ],
    ids=["fixed", "resampled"],
)
def test_a_batch_larger_than_the_data_is_refused_up_front(
    case, data, expected, prepared_shards, tmp_path, capsys, reliability
):
    config = fit_config(tmp_path / "fit.yaml", prepared_shards, tmp_path / "runs", data=data)
    with pytest.raises(SystemExit) as exit_:
        avsync_main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    message = f"AVShardDataModule: {expected.format(shards=prepared_shards)}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"avsync fit: error: {message}"
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    reliability.record(
        "Hostile inputs",
        case,
        "avsync fit --config",
        f"refused at set-up, before a step, exit 2: `{message}`",
    )


# ------------------------------------------------------------------------------------------ item 13
POSITIVE, NON_NEGATIVE = "must be a positive integer", "must be a non-negative integer"
BAD_CONFIGS = [
    # case, section, value(s), the message after "avsync fit: error: "
    ("batch_size: 0", "data", {"batch_size": 0}, f"AVShardDataModule: batch_size {POSITIVE}, got 0"),
    ("batch_size: -4", "data", {"batch_size": -4}, f"AVShardDataModule: batch_size {POSITIVE}, got -4"),
    ("lr: NaN", "model", {"lr": math.nan}, "PretrainModule: lr must be a finite number > 0, got nan"),
    ("lr: -0.001", "model", {"lr": -0.001}, "PretrainModule: lr must be a finite number > 0, got -0.001"),
    (
        "max_steps: -5", "trainer", {"max_steps": -5},
        "trainer: max_steps must be -1 (no limit) or a non-negative integer, got -5",
    ),
    (
        "embed_dim not divisible by num_heads (36, 8)", "backbone", {"embed_dim": 36, "num_heads": 8},
        "CAVMAESync: embed_dim=36 must divide into num_heads=8 heads and be a multiple of 4 (2-D sin-cos "
        "positions)",
    ),
    (
        "num_workers: -3", "data", {"num_workers": -3},
        f"AVShardDataModule: num_workers {NON_NEGATIVE}, got -3",
    ),
    (
        "mask ratio 1.0", "backbone", {"mask_ratio_video": 1.0},
        "CAVMAESync: mask_ratio_video must be a finite number in [0, 1), got 1.0",
    ),
    (
        "a missing shard path", "data", {"train_shards": "{tmp}/no_such_shards"},
        "AVShardDataModule: train_shards: no shards at '{tmp}/no_such_shards'",
    ),
    (
        "epoch_length: -8 (was accepted silently)", "data", {"resampled": True, "epoch_length": -8},
        f"AVShardDataModule: epoch_length {POSITIVE}, got -8",
    ),
    (
        "shuffle_buffer: -8 (was accepted silently)", "data", {"shuffle_buffer": -8},
        f"AVShardDataModule: shuffle_buffer {NON_NEGATIVE}, got -8",
    ),
    # the same family in the other settings of these constructors and of the Trainer
    (
        "accumulate_grad_batches: 0 (was accepted)", "trainer", {"accumulate_grad_batches": 0},
        f"trainer: accumulate_grad_batches {POSITIVE}, got 0",
    ),
    (
        "limit_train_batches: -1 (Lightning's own check)", "trainer", {"limit_train_batches": -1},
        "trainer: You have passed invalid value -1 for limit_train_batches, it has to be in [0.0, 1.0] or an "
        "int.",
    ),
    (
        "warmup_epochs: -1", "model", {"warmup_epochs": -1.0},
        "PretrainModule: warmup_epochs must be a finite number >= 0, got -1.0",
    ),
    (
        "audio_std: 0", "data", {"audio_std": 0.0},
        "AVShardDataModule: audio_std must be a finite number > 0, got 0.0",
    ),
    (
        "noise_std: NaN", "data", {"noise_std": math.nan},
        "AVShardDataModule: noise_std must be a finite number >= 0, got nan",
    ),
    (
        "image_size not a whole number of patches (40)", "backbone", {"image_size": 40},
        "CAVMAESync: image_size=40 is not a whole number of patch_size=16 patches",
    ),
]  # fmt: skip


@pytest.mark.parametrize("case, section, values, expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_config_value_no_run_can_use_is_refused_in_one_line(
    case, section, values, expected, prepared_shards, tmp_path, capsys, reliability
):
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}
    expected = expected.format(tmp=tmp_path)
    runs = tmp_path / "runs"
    data = {"resampled": True, "epoch_length": 8, **(values if section == "data" else {})}
    trainer = {"max_steps": 2, **(values if section == "trainer" else {})}
    config = fit_config(
        tmp_path / "fit.yaml", prepared_shards, runs, data=data, trainer=trainer,
        model=values if section == "model" else None,
    )  # fmt: skip
    if section == "backbone":
        import yaml

        text = yaml.safe_load(config.read_text())
        text["model"]["init_args"]["backbone"]["init_args"].update(values)
        config.write_text(yaml.safe_dump(text, sort_keys=False))
    with pytest.raises(SystemExit) as exit_:
        avsync_main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert errors == [f"avsync fit: error: {expected}"]
    assert not list(runs.rglob("*.ckpt"))  # before any work: no step, no checkpoint
    if "train_shards" not in values:  # the others are refused before the Trainer exists: no run folder
        assert not runs.exists()
    reliability.record(
        "Hostile inputs",
        f"config `{case}`",
        "avsync fit --config",
        f"refused before any work (exit 2): `{expected}`",
    )


def test_the_constructors_refuse_the_same_values_from_python(prepared_shards, reliability):
    backbone = CAVMAESync(**SMALL_BACKBONE)
    cases = [
        (lambda: AVShardDataModule(train_shards=str(prepared_shards), batch_size=0), "batch_size"),
        (lambda: AVShardDataModule(train_shards=str(prepared_shards), epoch_length=-8), "epoch_length"),
        (
            lambda: AVShardDataModule(train_shards="/no/such", image_size=32, audio_length=64).setup(),
            "train_shards: no shards at '/no/such'",
        ),
        (lambda: CAVMAESync(**{**SMALL_BACKBONE, "mask_ratio_audio": 1.0}), "mask_ratio_audio"),
        (lambda: CAVMAESync(**{**SMALL_BACKBONE, "num_heads": 0}), "num_heads"),
        (lambda: PretrainModule(backbone=backbone, lr=math.nan), "lr"),
        (lambda: PretrainModule(backbone=backbone, betas=(0.9, 1.0)), "betas"),
        (lambda: RetrievalModule(backbone=backbone, top_k=-3), "top_k"),
        (lambda: ProbeModule(backbone=backbone, num_classes=0), "num_classes"),
        (lambda: ProbeModule(backbone=backbone, mixup_alpha=math.inf), "mixup_alpha"),
        (lambda: LocalizationDataModule(synth="x", batch_size=0), "batch_size"),
    ]
    for build, key in cases:
        with pytest.raises(ConfigError, match=key):
            build()
    reliability.record(
        "Hostile inputs",
        "the same bad values given in Python",
        "AVShardDataModule, CAVMAESync, PretrainModule, RetrievalModule, ProbeModule, LocalizationDataModule",
        "each constructor raises `ConfigError` (a ValueError) naming the key, before anything is built or "
        "read (a shard path that names nothing: at `setup`)",
    )


# ------------------------------------------------------------------------------------------ item 14
FINITE_ABOVE_0, FINITE_FROM_0 = "must be a finite number > 0", "must be a finite number >= 0"
BAD_FLAGS = [
    # the tool's command line (placeholders in capitals), the message after "avsync TOOL: error: "
    ("prepare IN OUT --num-frames 0", f"argument --num-frames: {POSITIVE}, got 0"),
    ("prepare IN OUT --short-side 0", f"argument --short-side: {POSITIVE}, got 0"),
    ("prepare IN OUT --jpeg-quality 1000", "argument --jpeg-quality: must be an integer in 1..100, got 1000"),
    ("prepare IN OUT --min-duration 5 --max-duration 3", "--min-duration must not exceed --max-duration"),
    (
        "prepare IN OUT --shard-max-bytes 1e400",
        "argument --shard-max-bytes: must be a finite size of at least 1 byte, got '1e400'",
    ),
    ("retrieve --ckpt C --shards S --batch-size 0", f"argument --batch-size: {POSITIVE}, got 0"),
    ("retrieve --ckpt C --shards S --top-k -3", f"argument --top-k: {NON_NEGATIVE}, got -3"),
    ("embed V --ckpt C --out O --batch-size 0", f"argument --batch-size: {POSITIVE}, got 0"),
    ("embed V --ckpt C --out O --min-duration nan", f"argument --min-duration: {FINITE_ABOVE_0}, got nan"),
    ("embed V --ckpt C --out O --devices 0", f"argument --devices: {POSITIVE}, got 0"),
    ("localize --ckpt C --synth S --out O --batch-size 0", f"argument --batch-size: {POSITIVE}, got 0"),
    (
        "localize --ckpt C --synth S --out O --audio-start -1",
        f"argument --audio-start: {FINITE_FROM_0}, got -1",
    ),
    ("segment V --ckpt C --out O --tolerance -1", f"argument --tolerance: {NON_NEGATIVE}, got -1"),
    ("segment V --ckpt C --out O --max-duration inf", f"argument --max-duration: {FINITE_ABOVE_0}, got inf"),
    ("index build E --out O --pca-dim 0", f"argument --pca-dim: {POSITIVE}, got 0"),
    ("index search I --clip a --top-k 0", f"argument --top-k: {POSITIVE}, got 0"),
    ("index search I --clip a --rerank -1", f"argument --rerank: {NON_NEGATIVE}, got -1"),
    ("synth OUT --clips 2 --classes 2 --workers -2", f"argument --workers: {NON_NEGATIVE}, got -2"),
    ("synth OUT --clips 2 --classes 2 --min-event nan", f"argument --min-event: {FINITE_ABOVE_0}, got nan"),
]
PLACEHOLDERS = ("IN", "OUT", "O", "V", "E", "I", "C", "S")


@pytest.mark.parametrize("command, expected", BAD_FLAGS, ids=[c for c, _ in BAD_FLAGS])
def test_a_tool_flag_out_of_range_is_a_usage_error(command, expected, tmp_path, capsys, reliability):
    tool, *args = [str(tmp_path / word) if word in PLACEHOLDERS else word for word in command.split()]
    with pytest.raises(SystemExit) as exit_:
        avsync_main([tool, *args])
    assert exit_.value.code == 2
    prog = f"avsync {tool} {args[0]}" if tool == "index" else f"avsync {tool}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{prog}: error: {expected}"
    assert not any(tmp_path.iterdir())  # nothing written
    shown = " ".join(word for word in command.split() if word not in PLACEHOLDERS)
    reliability.record(
        "Hostile inputs",
        f"`avsync {shown}`",
        f"avsync {tool}",
        f"a usage error before any work (exit 2): `{expected}`",
    )


def test_retrieve_refuses_a_negative_top_k_before_the_evaluation(
    prepared_shards, tiny_checkpoint, tmp_path, reliability
):
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(
        avsync_command(
            "retrieve", "--ckpt", str(tiny_checkpoint), "--shards", str(prepared_shards), "--out", str(out),
            "--workers", "0", "--accelerator", "cpu", "--top-k", "-3",
        ),
        env=avsync_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "avsync retrieve: error: argument --top-k: must be a non-negative integer, got -3"
    )
    assert "Testing" not in result.stdout + result.stderr and not out.exists()
    print(f"refused in {elapsed:.1f} s")
    reliability.record(
        "Hostile inputs",
        "`avsync retrieve --top-k -3` on real shards and checkpoint",
        "avsync retrieve (subprocess)",
        "a usage error before torch is imported (exit 2), no output folder; before: it failed only after the "
        "whole evaluation",
    )
