"""`avsync prepare --engine dask` on a real local cluster of 2 worker processes, on real H.264 + AAC
clips with broken inputs among them: the single-machine run's bytes, one failures.jsonl, a killed run
that resumes without decoding finished partitions again, a failed partition that reruns alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import get_task_stream

from avsync.data.journal import JOURNAL_NAME
from avsync.data.parts import PARTS_DIR
from avsync.data.prepare import FAILURES_NAME, MANIFEST_NAME, PrepareError, prepare
from tests.conftest import REPO_ROOT
from tests.data.conftest import write_clip

CAP = 250_000  # about 2 of these clips per shard, so that shards straddle partitions
BROKEN = ("broken.mp4", "notes.mp4", "short.mp4")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """10 decodable clips of different sizes, and 3 inputs that fail in different ways."""
    directory = tmp_path_factory.mktemp("videos")
    for index in range(10):
        write_clip(directory / f"clip{index}.mp4", duration=2.5, fps=10 + index)
    (directory / "broken.mp4").write_bytes(b"\x00" * 4096)
    (directory / "notes.mp4").write_text("meeting notes, not a video\n" * 20)
    write_clip(directory / "short.mp4", duration=1.0)
    return directory


@pytest.fixture(scope="module")
def single_machine(videos, tmp_path_factory) -> dict[str, bytes]:
    """Every file of the process-pool run (the default engine)."""
    out = tmp_path_factory.mktemp("pool") / "out"
    prepare([videos], out, shard_max_bytes=CAP, workers=1, progress=False)
    return _outputs(out)


def _outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _decoded(stream) -> list[int]:
    """The partitions whose decode task ran while `stream` recorded."""
    keys = [re.fullmatch(r"avsync-decode-(\d+)-\w+", str(task["key"])) for task in stream.data]
    return sorted(int(match.group(1)) for match in keys if match)


def test_the_cluster_writes_the_single_machine_bytes_with_every_workers_failures(
    videos, single_machine, dask_client, tmp_path
):
    out = tmp_path / "out"
    with get_task_stream(dask_client) as stream:
        summary = prepare(
            [videos], out, shard_max_bytes=CAP, progress=False, engine="dask", scheduler=dask_client,
            partition_size=3,
        )  # fmt: skip
    assert _outputs(out) == single_machine  # shards, manifest.json and failures.jsonl
    assert summary.clips == 10 and len(summary.shards) >= 4
    assert _decoded(stream) == [0, 1, 2, 3, 4]  # 13 inputs in partitions of 3
    workers = {task["worker"] for task in stream.data if str(task["key"]).startswith("avsync-decode")}
    assert len(workers) == 2, "both workers decode"
    failures = [json.loads(line) for line in (out / FAILURES_NAME).read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failures) == sorted(BROKEN)
    assert not (out / PARTS_DIR).exists() and not (out / JOURNAL_NAME).exists()


def test_a_failed_partition_stops_nothing_else_and_reruns_alone(
    videos, single_machine, dask_client, tmp_path
):
    out = tmp_path / "out"
    blocked = out / PARTS_DIR / "part-000001.tar"
    blocked.mkdir(parents=True)  # partition 1 cannot put its file in place (like a full disk)
    with pytest.raises(PrepareError, match=r"partition 1: IsADirectoryError") as raised:
        prepare(
            [videos], out, shard_max_bytes=CAP, progress=False, engine="dask", scheduler=dask_client,
            partition_size=3,
        )  # fmt: skip
    assert "redo only the 1 partition(s) still to decode" in str(raised.value)
    kept = sorted(p.name for p in (out / PARTS_DIR).glob("part-*.json"))
    # all but 1 decoded; 0 is kept too: its last shard closes only with the first clip of 1
    assert kept == ["part-000000.json", "part-000002.json", "part-000003.json", "part-000004.json"]
    assert not (out / MANIFEST_NAME).exists()

    blocked.rmdir()
    with get_task_stream(dask_client) as stream:
        prepare(
            [videos], out, shard_max_bytes=CAP, progress=False, engine="dask", scheduler=dask_client,
            partition_size=3,
        )  # fmt: skip
    assert _decoded(stream) == [1]
    assert _outputs(out) == single_machine


def test_a_killed_run_resumes_without_decoding_finished_partitions_again(
    videos, single_machine, dask_client, tmp_path
):
    out = tmp_path / "out"
    arguments = [str(videos), str(out), "--shard-max-bytes", str(CAP), "--no-progress"]
    arguments += ["--engine", "dask", "--scheduler", dask_client.scheduler.address, "--partition-size", "1"]
    command = [sys.executable, "-m", "avsync.data.prepare", *arguments]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts, journal = out / PARTS_DIR, out / JOURNAL_NAME
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:  # kill after the first partitions
        if journal.exists() and any(parts.glob("part-*.json")):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / MANIFEST_NAME).exists(), "the kill came too late to test a resume"
    _wait_until_idle(dask_client)  # the killed driver's tasks, still running on the workers, end
    finished = {int(p.stem.split("-")[1]) for p in parts.glob("part-*.json")}
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:] if line.strip()]
    next_input = entries[-1]["next_input"] if entries else 0
    finished |= set(range(next_input))  # partitions of one clip, already in journaled shards
    assert finished and len(finished) < 13

    with get_task_stream(dask_client) as stream:
        prepare(
            [videos], out, shard_max_bytes=CAP, progress=False, engine="dask", scheduler=dask_client,
            partition_size=1,
        )  # fmt: skip
    assert _decoded(stream) == sorted(set(range(13)) - finished)
    assert _outputs(out) == single_machine


def _wait_until_idle(client, timeout: float = 60) -> None:
    """Until the scheduler has forgotten the killed client's tasks and no worker still runs one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        known = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        running = client.run(lambda dask_worker: len(dask_worker.state.executing))
        if known == 0 and not any(running.values()):
            return
        time.sleep(0.05)
    raise AssertionError("the workers are still busy with the killed run's tasks")


def test_a_resume_works_across_engines(videos, single_machine, dask_client, tmp_path):
    """The journal is shared: a Dask run stopped by a failed partition is finished by the pool."""
    out = tmp_path / "out"
    blocked = out / PARTS_DIR / "part-000003.tar"
    blocked.mkdir(parents=True)
    with pytest.raises(PrepareError):
        prepare(
            [videos], out, shard_max_bytes=CAP, progress=False, engine="dask", scheduler=dask_client,
            partition_size=3,
        )  # fmt: skip
    assert (out / JOURNAL_NAME).read_text().count("\n") >= 2, "some shards were journaled"
    blocked.rmdir()
    prepare([videos], out, shard_max_bytes=CAP, workers=1, progress=False)
    assert _outputs(out) == single_machine  # and prepare.parts is gone


def test_the_slurm_script_starts_a_cluster_and_prepares_the_same_shards(videos, single_machine, tmp_path):
    """scripts/slurm/prepare.sbatch as SLURM would run it on one node, with an `srun` that runs its
    command once here: a `dask scheduler`, a `dask worker` of 2 processes, the driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    out = tmp_path / "out"
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "2",
        "INPUTS": str(videos), "OUT": str(out), "SCHEDULER_FILE": str(tmp_path / "scheduler.json"),
        "EXTRA_ARGS": f"--shard-max-bytes {CAP} --partition-size 3",
    }  # fmt: skip
    script = REPO_ROOT / "scripts" / "slurm" / "prepare.sbatch"
    result = subprocess.run(
        ["bash", str(script)], env=environment, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"prepared {out}" in result.stdout
    assert _outputs(out) == single_machine
