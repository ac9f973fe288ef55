"""SIGTERM and SIGUSR1 sent to a running `avsync fit`: it finishes the step, saves `last.ckpt`, exits
with 128 + the signal number, and `--ckpt_path last` continues from the step after."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import torch

from .conftest import avsync_command, avsync_env, checkpoints_dir, fit_config
from .reliability_probes import read_steps

SIGNALLED_AFTER = 3  # steps recorded before the signal is sent


def test_sigterm_and_sigusr1_save_a_checkpoint_and_exit_cleanly_and_the_run_resumes(
    prepared_shards, tmp_path, reliability
):
    runs = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        folder = tmp_path / signum.name
        folder.mkdir()
        config = fit_config(
            folder / "fit.yaml",
            prepared_shards,
            folder / "runs",
            steps_dir=folder / "steps",
            trainer={"max_steps": 1000},
            data={"resampled": True, "epoch_length": 2000},
            checkpoint={"every_n_train_steps": 1000},  # only the signal writes a checkpoint
        )
        process = subprocess.Popen(
            avsync_command("fit", "--config", str(config)), env=avsync_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        runs[signum] = (folder, config, process)

    for signum, (folder, _, process) in runs.items():  # both run at once (2 cores)
        steps = folder / "steps" / "steps-rank0.jsonl"
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if steps.exists() and steps.read_text().count("\n") >= 1 + SIGNALLED_AFTER:
                process.send_signal(signum)
                break
            time.sleep(0.005)

    resumes = {}
    for signum, (folder, config, process) in runs.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 128 + signum, stderr[-3000:]
        assert "Traceback" not in stderr
        stopped_at = read_steps(folder / "steps")[0][-1]["step"]
        last = checkpoints_dir(folder / "runs") / "last.ckpt"
        # the signal lands during a step or while the loader fetches the next batch: both stop at once
        said = rf"{signum.name} received( while fetching the next batch)?: stopped after step {stopped_at}; "
        assert re.search(said + re.escape(f"checkpoint saved to {last}"), stderr), stderr[-3000:]
        assert torch.load(last, weights_only=True)["global_step"] == stopped_at >= SIGNALLED_AFTER
        command = avsync_command(
            "fit", "--config", str(config), "--ckpt_path", "last", f"--trainer.max_steps={stopped_at + 2}"
        )
        resumes[signum] = (
            folder,
            stopped_at,
            subprocess.Popen(command, env=avsync_env(), stderr=subprocess.PIPE),
        )

    for signum, (folder, stopped_at, process) in resumes.items():
        stderr = process.communicate(timeout=120)[1].decode()
        assert process.returncode == 0, stderr[-3000:]
        steps = [r["step"] for r in read_steps(folder / "steps")[0]]
        assert steps[-2:] == [stopped_at + 1, stopped_at + 2]  # picked up at the step after the signal
        reliability.record(
            "Resume",
            f"{signum.name} during training",
            "kill -" + signum.name.removeprefix("SIG") + " to avsync fit (subprocess)",
            f"finishes the step, writes last.ckpt, logs where, exits with status {128 + signum} without a "
            "traceback; --ckpt_path last continues at the next step",
        )
