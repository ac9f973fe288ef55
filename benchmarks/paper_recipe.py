"""The full-size dry run: the paper's pretraining recipe as shipped, two optimizer steps on CPU.

`configs/pretrain/audioset2m_vitb.yaml` is run by a real `avsync fit` process with only what a CPU
machine and a handful of clips need changed (accelerator, devices, strategy, the shard folders, batch 2,
no data workers, two steps, no validation, the log folder), and with an `init_from` file in the
released MAE key layout (`mae_pretrain_vit_base_full.pth`: ViT-B/16 and its 8-block decoder, written by
`avsync.tasks.image_mae.ImageMAE` at full size, random values). The shards are made the user's way:
`avsync synth`, then `avsync prepare`. The run must read the init file, take both steps and write its
`last.ckpt`; the benchmark reports the step times and the `avsync fit` process's peak resident memory,
and checks the checkpoint (read weights-only) holds two steps of Adam state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.harness import load_average, machine, peak_rss_mib

RECIPE = "pretrain/audioset2m_vitb"


class StepTimer(L.Callback):
    """Writes the wall and CPU time (all threads of the process) of every training step, batch start to
    batch end with the optimizer step, and this process's peak resident memory to `path` (JSON) when
    training ends. CPU time is the figure that survives a machine shared with other jobs."""

    def __init__(self, path: str):
        self.path = path
        self.steps_s: list[float] = []
        self.steps_cpu_s: list[float] = []
        self._started = (0.0, 0.0)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps_s.append(time.perf_counter() - self._started[0])
        self.steps_cpu_s.append(time.process_time() - self._started[1])

    def on_train_end(self, trainer, module) -> None:
        report = {"steps_s": self.steps_s, "steps_cpu_s": self.steps_cpu_s}
        Path(self.path).write_text(json.dumps({**report, "peak_rss_mib_before_checkpoint": peak_rss_mib()}))


def _avsync(*args: str, cwd: Path, threads: int | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `avsync ARGS`; returns the finished process and its own peak resident memory (MiB), read from
    its rusage when it is reaped (RUSAGE_CHILDREN would be the largest of all children so far)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "avsync.cli", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        finished = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    if finished.returncode:
        tail = finished.stderr[-4000:]
        raise RuntimeError(f"avsync {args[0]} failed (exit {finished.returncode}):\n{tail}")
    return finished, usage.ru_maxrss / 1024


def write_mae_file(path: Path) -> dict:
    """MAE ViT-B/16 with its decoder (112 M parameters) in the released layout, `{"model": state}`."""
    from avsync.tasks.image_mae import ImageMAE

    state = ImageMAE().state_dict()  # the defaults are MAE's ViT-B/16 and its 512-wide, 8-block decoder
    torch.save({"model": state}, path)
    return {"tensors": len(state), "parameters_m": round(sum(t.numel() for t in state.values()) / 1e6, 1)}


def dry_run(clips: int = 4, batch_size: int = 2, steps: int = 2, keep: str | None = None) -> dict:
    """Make `clips` clips into shards, write the MAE file, run the recipe for `steps` steps at
    `batch_size` on the CPU (the bench's `--threads`); `keep`: a folder to work in and keep."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        result: dict = {"recipe": RECIPE, "clips": clips, "batch_size": batch_size, "steps": steps}
        started = time.perf_counter()
        _avsync("synth", "clips", "--clips", str(clips), "--classes", "2", "--workers", "1", cwd=root)
        _avsync("prepare", "clips/videos", "shards", "--workers", "1", "--no-progress", cwd=root)
        result["shards_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        result["init_file"] = write_mae_file(root / "mae_pretrain_vit_base_full.pth")
        result["init_file"]["bytes"] = (root / "mae_pretrain_vit_base_full.pth").stat().st_size
        result["init_file_s"] = round(time.perf_counter() - started, 1)

        timer = root / "steps.json"
        overrides = [
            "--model.init_args.init_from=mae_pretrain_vit_base_full.pth",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--trainer.logger.init_args.save_dir=runs",
            "--trainer.callbacks+=benchmarks.paper_recipe.StepTimer",
            f"--trainer.callbacks.init_args.path={timer}",
            "--data.init_args.train_shards=shards", "--data.init_args.val_shards=shards",
            f"--data.init_args.batch_size={batch_size}", "--data.init_args.num_workers=0",
        ]  # fmt: skip
        started = time.perf_counter()
        fit, fit_peak = _avsync("fit", "--config", RECIPE, *overrides, cwd=root, threads=threads)
        result["fit_s"] = round(time.perf_counter() - started, 1)
        output = fit.stdout + fit.stderr
        init_lines = [line for line in output.splitlines() if line.startswith("init_from ")]
        if not init_lines or "initialized" not in init_lines[0]:
            raise RuntimeError(f"the run did not report its MAE initialization:\n{output[-3000:]}")
        result["init_report"] = init_lines[0].split(";")[0]  # "init_from FILE: initialized N tensors"
        timing = json.loads(timer.read_text())
        result["steps_s"] = [round(s, 2) for s in timing["steps_s"]]
        result["steps_cpu_s"] = [round(s, 2) for s in timing["steps_cpu_s"]]
        result["step_s"] = result["steps_s"][-1]  # the first step also allocates Adam's moments
        result["step_cpu_s"] = result["steps_cpu_s"][-1]
        result["samples_per_s"] = round(batch_size / result["step_s"], 3)
        result["load_average_after_fit"] = load_average()
        result["fit_peak_rss_mib"] = round(fit_peak, 1)
        result["fit_peak_rss_mib_before_checkpoint"] = round(timing["peak_rss_mib_before_checkpoint"], 1)
        result["checkpoint"] = _check_checkpoint(root / "runs", steps)
        result["precision"] = _saved_setting(root / "runs", "precision")
    result["threads"] = threads
    result["machine"] = {k: v for k, v in machine().items() if k in ("cpu", "logical_cores", "cpu_features")}
    result["peak_rss_mib"] = result["fit_peak_rss_mib"]  # the `Runs` table's column: the training process
    result["bench_process_peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def _check_checkpoint(runs: Path, steps: int) -> dict:
    """The run's `last.ckpt`, read weights-only (memory-mapped): its step count and Adam's state."""
    found = sorted(runs.rglob("last.ckpt"))
    if not found:
        raise RuntimeError(f"no last.ckpt under {runs}")
    checkpoint = torch.load(found[0], map_location="cpu", weights_only=True, mmap=True)
    if checkpoint["global_step"] != steps:
        raise RuntimeError(f"{found[0]}: global_step {checkpoint['global_step']}, expected {steps}")
    adam = checkpoint["optimizer_states"][0]["state"]
    adam_steps = {float(entry["step"]) for entry in adam.values()}
    if adam_steps != {float(steps)}:
        raise RuntimeError(f"{found[0]}: Adam's step counts are {sorted(adam_steps)}, expected {steps}")
    return {
        "bytes": found[0].stat().st_size,
        "global_step": checkpoint["global_step"],
        "tensors": len(checkpoint["state_dict"]),
        "adam_parameters": len(adam),
    }


def _saved_setting(runs: Path, name: str):
    """A trainer setting as the run's saved config.yaml holds it (what the run used)."""
    import yaml

    found = sorted(runs.rglob("config.yaml"))
    return yaml.safe_load(found[0].read_text())["trainer"].get(name) if found else None
