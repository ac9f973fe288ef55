"""How benchmarks are measured: warm-up, medians of repeated runs, interleaved comparisons, peak memory,
the machine and the software, and one fresh process per benchmark.

Every benchmark runs in its own process (`run_isolated`), so that its peak resident memory is its own and
no allocator or thread-pool state leaks from one benchmark into the next. Comparisons (A against B) are
interleaved run by run (`interleaved_medians`), so that a change in machine load hits both sides alike;
only ratios measured that way, in one process, are reported as ratios.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Timing:
    """Wall-clock seconds of the timed runs (after warm-up) and their median."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def as_dict(self) -> dict:
        return {"median_s": round(self.median, 4), "runs_s": [round(t, 4) for t in self.runs]}


def time_runs(action: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Run `action` `warmup` times untimed, then `repeats` times timed."""
    for _ in range(warmup):
        action()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        runs.append(time.perf_counter() - started)
    return Timing(runs)


def interleaved_medians(
    actions: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time several variants of one job round-robin (A B C A B C ...): drifting machine load then slows
    every variant alike, and the ratios of the medians stay meaningful."""
    for action in actions.values():
        for _ in range(warmup):
            action()
    runs: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            started = time.perf_counter()
            action()
            runs[name].append(time.perf_counter() - started)
    return {name: Timing(times) for name, times in runs.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_to_one_core() -> int:
    """Confine this process to one CPU core and torch to one thread; returns the core."""
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return core


def machine() -> dict:
    """CPU model, cores, memory, the CPU features that decide kernel choice, and the GPU if any."""
    info: dict = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "platform": platform.platform(),
    }
    flags = _cpu_flags()
    info["cpu_features"] = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags
    ]
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def versions() -> dict:
    """Python and the packages whose code is on the measured paths."""
    found = {"python": platform.python_version()}
    for package in (
        "avsync", "torch", "torchvision", "torchaudio", "lightning", "timm", "numpy", "pillow", "av",
        "webdataset", "safetensors",
    ):  # fmt: skip
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    config = torch.__config__.show()
    found["blas"] = "MKL" if "Math Kernel Library" in config else "other"
    found["onednn"] = next(
        (line.split("v", 1)[1].split()[0] for line in config.splitlines() if "MKL-DNN" in line), None
    )
    return found


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _meminfo_kib(field: str) -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class BenchmarkFailed(RuntimeError):
    """A benchmark's process failed; the message holds the end of its error output."""


def run_isolated(name: str, options: dict, threads: int, env: Mapping[str, str] | None = None) -> dict:
    """Run benchmark `name` with `options` in a fresh `python -m benchmarks --child` process on
    `threads` threads; returns its result dict with `peak_rss_mib` (that process's peak) and `wall_s`."""
    command = [sys.executable, "-m", "benchmarks", "--child", name, "--threads", str(threads)]
    command += ["--options", json.dumps(options)]
    started = time.perf_counter()
    repo_root = str(
        Path(__file__).resolve().parent.parent
    )  # `benchmarks` is a top-level folder, not installed
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, environment.get("PYTHONPATH")]))
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if finished.returncode:
        raise BenchmarkFailed(
            f"benchmark {name!r} failed (exit {finished.returncode}):\n{finished.stderr[-4000:]}"
        )
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchmarkFailed(f"benchmark {name!r} printed no result:\n{finished.stdout[-2000:]}")
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


#: The last commit before issue 22's redesign: the "before" side of its same-run comparisons.
BEFORE_REDESIGN = "7368bef"


def source_tree(revision: str = BEFORE_REDESIGN) -> Path | None:
    """The `src/` folder of `revision` (a commit of this repository, extracted once with `git archive`
    into `.cache/`), or `revision` itself when it is a folder holding `avsync/`; None when neither is
    available (a copy without git history): the comparison is then skipped with its reason."""
    if (Path(revision) / "avsync").is_dir():
        return Path(revision)
    repo = Path(__file__).resolve().parent.parent
    target = repo / ".cache" / f"src-{revision}"
    if (target / "src" / "avsync").is_dir():
        return target / "src"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", revision, "src"], capture_output=True, check=False
    )
    if archive.returncode:
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"
