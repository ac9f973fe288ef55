"""`avsync fit` with `--trainer.devices=2` and no torchrun: Lightning's own launcher starts rank 1 by
re-running the command line, which must then be the whole `avsync fit ...` command (it once re-ran a bare
`avsync`, which printed the usage while rank 0 waited for it forever)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from avsync.cli import relaunch_argv
from tests.data.conftest import write_shards

AVSYNC = Path(sys.executable).with_name("avsync")


def test_two_devices_without_torchrun_start_both_ranks_and_train(tmp_path):
    write_shards(tmp_path / "shards", [4, 4], fbank_frames=120)
    command = [
        str(AVSYNC), "fit", "--config", "pretrain/tiny_cpu",
        f"--data.init_args.train_shards={tmp_path / 'shards'}", "--data.init_args.val_shards=null",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.epoch_length=8",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false", "--model.init_args.log_images_every_n_steps=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "MEMBER: 2/2" in log and "usage: avsync" not in log  # rank 1 ran the same command
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 2


def test_called_from_another_program_lightning_sees_only_the_program_name():
    assert relaunch_argv(["/usr/bin/pytest", "-q"], ["fit", "--config", "x.yaml"]) == ["/usr/bin/pytest"]
