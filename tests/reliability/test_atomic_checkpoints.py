"""A run killed with SIGKILL in the middle of writing a checkpoint keeps the previous one usable.

The run (`avsync fit`, a checkpoint after every step, each made slow by 128 MiB of ballast state) is
killed as soon as the next save has started writing (`last.ckpt.partial` appears). Its temporary
directory is put on another filesystem than the checkpoints where the machine has one (/dev/shm):
there, Lightning's own writer would copy into `last.ckpt` and a kill would leave it truncated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from avsync.training.atomic_checkpoint import partial_path

from .conftest import avsync_command, avsync_env, checkpoints_dir, fit_config


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole_and_resumable(
    prepared_shards, tmp_path, reliability
):
    config = fit_config(
        tmp_path / "fit.yaml",
        prepared_shards,
        tmp_path / "runs",
        trainer={"max_steps": 1000},
        data={"resampled": True, "epoch_length": 2000},
        checkpoint={"every_n_train_steps": 1},
        callbacks=[{"class_path": "reliability_probes.Ballast", "init_args": {"megabytes": 128}}],
    )
    last = checkpoints_dir(tmp_path / "runs") / "last.ckpt"
    partial = partial_path(last)
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    other_filesystem = scratch.stat().st_dev != tmp_path.stat().st_dev
    temporary = Path(os.path.realpath(scratch)) / f"avsync-tmp-{os.getpid()}"
    temporary.mkdir()
    run = subprocess.Popen(
        avsync_command("fit", "--config", str(config)),
        env=avsync_env(TMPDIR=str(temporary)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline and not last.exists():
            time.sleep(0.001)  # the first save is complete once last.ckpt exists
        while run.poll() is None and time.monotonic() < deadline and not partial.exists():
            time.sleep(0.001)  # the next save has opened its file
        run.send_signal(signal.SIGKILL)
        stderr = run.communicate(timeout=60)[1].decode()
    finally:
        for leftover in temporary.iterdir():
            leftover.unlink()
        temporary.rmdir()
    assert run.returncode == -signal.SIGKILL, stderr[-3000:]
    assert partial.exists() and partial.stat().st_size < last.stat().st_size, "the kill missed the save"

    saved = torch.load(last, weights_only=True)  # whole, readable without trusting code
    step = saved["global_step"]
    assert step >= 1

    resumed = subprocess.run(
        avsync_command(
            "fit", "--config", str(config), "--ckpt_path", "last", f"--trainer.max_steps={step + 1}"
        ),
        env=avsync_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
    assert torch.load(last, weights_only=True)["global_step"] == step + 1
    assert not partial.exists()  # the leftover was overwritten by the next save, then renamed
    where = "TMPDIR on another filesystem" if other_filesystem else "TMPDIR on the same filesystem"
    reliability.record(
        "Resume",
        "SIGKILL while a checkpoint is being written",
        f"avsync fit with 128 MiB checkpoints, killed mid-write; {where}",
        "last.ckpt still holds the previous complete checkpoint and `--ckpt_path last` resumes from it; "
        "the torn write is only in last.ckpt.partial, which the next save replaces",
    )
