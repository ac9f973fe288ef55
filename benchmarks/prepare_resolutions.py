"""Benchmark `prepare_resolutions`: `avsync prepare` clips/s per core at 144p, 360p and 720p, the code
before issue 22 (each clip opened twice: once for probe and frames, again for the audio) against the
current one (one container per clip), in the same run.

Each version runs in a child process of its own whose `PYTHONPATH` names its source tree (the earlier
one: commit 7368bef, the last before the redesign, extracted with `git archive`), pinned with this
process to one core, one torch thread. A child prepares, per resolution, a folder of copies of one 10-s
clip with stereo AAC (the real 144p and 720p clips of `../shared/data/videos`, and the 720p one brought
to 360p) with the local engine and one worker, after a warm-up run of one clip. Children alternate
(before, current, current, before, ...) for `rounds` rounds, so drifting load slows both alike; medians
are reported. Clips/s per core is 1 / (CPU seconds per clip): what `prepare` does on one core of a busy
node, and insensitive to other jobs on a shared machine; wall clips/s is given beside it. The shards of
both versions are compared byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.data import REAL_CLIPS, real_clips_dir, transcode
from benchmarks.harness import BEFORE_REDESIGN, source_tree

#: The code before issue 22: a commit (extracted by `source_tree`) or a folder holding `avsync/`.
BEFORE_SRC = BEFORE_REDESIGN
CURRENT_SRC = str(Path(__file__).resolve().parents[1] / "src")

_CHILD = r"""
import hashlib, json, resource, shutil, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import avsync
from avsync.data.prepare import prepare

spec = json.loads(sys.argv[1])
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
result = {"avsync": avsync.__file__}
for label, folders in spec.items():
    prepare([folders["warmup"]], folders["out"], workers=1, progress=False)
    shutil.rmtree(folders["out"])
    cpu_before, started = cpu(), time.perf_counter()
    summary = prepare([folders["inputs"]], folders["out"], workers=1, progress=False)
    wall, used = time.perf_counter() - started, cpu() - cpu_before
    digest = hashlib.sha256()
    for shard in sorted(Path(folders["out"]).glob("shard-*.tar")):
        digest.update(shard.read_bytes())
    shutil.rmtree(folders["out"])
    result[label] = {
        "clips": summary.clips, "wall_s": wall, "cpu_s": used, "shards_sha256": digest.hexdigest()
    }
print(json.dumps(result))
"""


def prepare_resolutions(
    rounds: int = 3, clips: dict | None = None, before: str = BEFORE_SRC, videos: str | None = None
) -> dict:
    """Clips/s per core of `prepare` before and after issue 22 at each resolution (module docstring).
    `clips`: copies per run and resolution."""
    clips = clips or {"144p": 16, "360p": 6, "720p": 2}
    directory = Path(videos) if videos else real_clips_dir()
    if directory is None:
        return {"skipped": "the real clips (../shared/data/videos) are not present"}
    before_src = source_tree(before)
    if before_src is None:
        return {"skipped": f"no source tree of the code before issue 22 ({before}: no such folder or commit)"}
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # the children inherit it
    versions = {"before": str(before_src), "current": CURRENT_SRC}
    runs: dict = {version: {label: [] for label in clips} for version in versions}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        spec, sizes = _inputs(directory, scratch, clips)
        files: dict = {}
        for round_ in range(rounds):
            order = list(versions) if round_ % 2 == 0 else list(reversed(versions))
            for version in order:
                measured = _child(versions[version], spec)
                files[version] = measured.pop("avsync")
                for label in clips:
                    runs[version][label].append(measured[label])
    result: dict = {"core": core, "rounds": rounds, "source": files, "resolutions": {}}
    for label in clips:
        row: dict = {"size": sizes[label], "clips_per_run": clips[label]}
        for version in versions:
            measured = runs[version][label]
            cpu = statistics.median(m["cpu_s"] for m in measured) / clips[label]
            wall = statistics.median(m["wall_s"] for m in measured) / clips[label]
            row[version] = {
                "clips_per_s_per_core": round(1 / cpu, 2), "cpu_s_per_clip": round(cpu, 4),
                "clips_per_s_wall": round(1 / wall, 2),
                "runs_cpu_s": [round(m["cpu_s"], 3) for m in measured],
            }  # fmt: skip
        row["speedup"] = round(
            row["current"]["clips_per_s_per_core"] / row["before"]["clips_per_s_per_core"], 3
        )
        digests = {m["shards_sha256"] for version in versions for m in runs[version][label]}
        row["same_shards"] = len(digests) == 1
        result["resolutions"][label] = row
    return result


def _inputs(directory: Path, scratch: Path, clips: dict) -> tuple[dict, dict]:
    """Per resolution: a one-clip warm-up folder, a folder of `clips[label]` copies, an output path."""
    sources = {
        "144p": directory / REAL_CLIPS["144p"],
        "360p": transcode(directory / REAL_CLIPS["720p"], scratch / "KlsG1EnBEjc_000361_360p.mp4", 360),
        "720p": directory / REAL_CLIPS["720p"],
    }
    spec, sizes = {}, {}
    for label, count in clips.items():
        source = sources[label]
        warmup, inputs = scratch / f"warmup_{label}", scratch / f"inputs_{label}"
        warmup.mkdir()
        inputs.mkdir()
        shutil.copy(source, warmup / source.name)
        for index in range(count):
            shutil.copy(source, inputs / f"{source.stem}_{index:03d}{source.suffix}")
        spec[label] = {"warmup": str(warmup), "inputs": str(inputs), "out": str(scratch / f"out_{label}")}
        sizes[label] = _size(source)
    return spec, sizes


def _size(path: Path) -> str:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return f"{stream.width}x{stream.height}"


def _child(source: str, spec: dict) -> dict:
    """Run the measuring child with `source` first on its path; its JSON result."""
    env = {**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, cwd="/"
    )
    if done.returncode != 0:
        raise RuntimeError(f"prepare child ({source}) failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["avsync"].startswith(source):
        raise RuntimeError(f"the child meant for {source} imported avsync from {result['avsync']}")
    return result
