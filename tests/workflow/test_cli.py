"""The `avsync` command as users run it: real subprocesses, real configs, real shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"


def avsync(*args: str, cwd: Path = REPO_ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "avsync.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_training_and_tools():
    result = avsync("--help")
    assert result.returncode == 0
    for command in ("fit", "validate", "prepare", "synth", "retrieve", "localize", "segment", "demo"):
        assert command in result.stdout


def test_unknown_command_is_an_error():
    result = avsync("train")
    assert result.returncode == 2 and "unknown command 'train'" in result.stderr


def test_print_config_shows_the_resolved_recipe():
    result = avsync("fit", "--config", str(TINY), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: avsync.tasks.PretrainModule" in result.stdout
    assert "class_path: avsync.data.datamodule.AVShardDataModule" in result.stdout
    assert "contrastive_weight: 0.1" in result.stdout


def test_a_wrong_config_value_names_the_option():
    result = avsync("fit", "--config", str(TINY), "--model.init_args.optimizer=sgd", "--print_config")
    assert result.returncode != 0
    assert "optimizer" in result.stderr and "sgd" in result.stderr


def test_fit_writes_logs_and_a_checkpoint_and_ckpt_path_resumes(demo_run, tmp_path):
    shards = demo_run.workdir
    common = [
        "--config", str(TINY),
        f"--data.init_args.train_shards={shards / 'train'}",
        f"--data.init_args.val_shards={shards / 'test'}",
        "--data.init_args.epoch_length=32", "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false", "--trainer.check_val_every_n_epoch=1",
    ]  # fmt: skip
    first = avsync("fit", *common, "--trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    version = tmp_path / "runs" / "tiny_cpu" / "version_0"
    assert list(version.glob("events.out.tfevents.*")), "no TensorBoard log"
    last = version / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

    resumed = avsync("fit", *common, "--trainer.max_epochs=2", f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = torch.load(
        tmp_path / "runs" / "tiny_cpu" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert checkpoint["global_step"] == 4
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 4  # the LR schedule continued, not restarted


def test_retrieve_scores_the_held_out_shards(demo_run, tmp_path):
    result = avsync(
        "retrieve", "--ckpt", str(demo_run.checkpoint), "--shards", str(demo_run.workdir / "test"),
        "--out", str(tmp_path), "--workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diagonal_mean" in result.stdout
    metrics = json.loads((tmp_path / "retrieval.json").read_text())
    assert set(metrics["metrics"]) == {"video_to_audio", "audio_to_video"}
    assert metrics["metadata"]["clips"] == 3
