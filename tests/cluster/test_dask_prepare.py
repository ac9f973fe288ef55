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
import yaml
from distributed import get_task_stream

from avsync.data.journal import JOURNAL_NAME
from avsync.data.parts import PARTS_DIR
from avsync.data.prepare import FAILURES_NAME, MANIFEST_NAME, PrepareError, prepare
from avsync.recipes import find_recipe
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
    command once here: a `dask scheduler`, a `dask worker` of 2 processes, the driver. The script is
    made ready the way the README says a user makes it theirs: by editing the lines it marks, only."""
    bin_dir = stand_in_srun(tmp_path)
    out = tmp_path / "out"
    script = user_copy(
        SLURM_DIR / "prepare.sbatch",
        tmp_path / "prepare.sbatch",
        {
            "#SBATCH --partition=": "#SBATCH --partition=cpu",
            "#SBATCH --account=": "#SBATCH --account=lab",
            "source ": f"source {Path(sys.prefix) / 'bin' / 'activate'}",
            "INPUTS=": f"INPUTS={videos}",
            "OUT=": f"OUT={out}",
        },
    )
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),  # avsync and dask: from the activation
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "2",
        "SCHEDULER_FILE": str(tmp_path / "scheduler.json"),
        "EXTRA_ARGS": f"--shard-max-bytes {CAP} --partition-size 3",
    }  # fmt: skip
    for name in ("INPUTS", "OUT", "VIRTUAL_ENV"):
        environment.pop(name, None)
    result = subprocess.run(
        ["bash", str(script)], env=environment, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"prepared {out}" in result.stdout
    assert _outputs(out) == single_machine


# ------------------------------------------------------------------------------ the SLURM scripts
SLURM_DIR = REPO_ROOT / "scripts" / "slurm"
SITE_START, SITE_END = "# >>> your site", "# <<< your site"
#: Settings that belong to a cluster, not to avsync: they may appear only inside the marked lines.
SITE_SETTINGS = re.compile(
    r"^#SBATCH\s+(--partition|-p\b|--account|-A\b|--qos|--constraint|--time|-t\b|--cpus-per-task|-c\b)"
    r"|^\s*(source|\.)\s|module\s+load|conda\s+activate|(?<![\w${}.:/-])/(?!tmp\b|dev/null\b)[A-Za-z]"
)


def stand_in_srun(tmp_path: Path, log: Path | None = None) -> Path:
    """A directory with an `srun` that runs its command once here (after its options), or, given `log`,
    only writes its arguments there, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    run = (
        'printf "%s\\n" "$@" > ' + str(log)
        if log
        else 'while [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec "$@"'
    )
    srun.write_text(f"#!/bin/bash\n{run}\n")
    srun.chmod(0o755)
    return bin_dir


def site_lines(text: str) -> set[int]:
    """Indices of the lines between each `>>> your site` and its `<<< your site` mark."""
    inside, lines = False, set()
    for index, line in enumerate(text.splitlines()):
        if line.startswith(SITE_START):
            assert not inside, f"line {index + 1}: a block opens inside another"
            inside = True
        elif line.startswith(SITE_END):
            assert inside, f"line {index + 1}: a block closes that was not opened"
            inside = False
        elif inside:
            lines.add(index)
    assert not inside, "a block is not closed"
    return lines


def user_copy(script: Path, copy: Path, edits: dict[str, str]) -> Path:
    """`script` as a user edits it: each marked line that starts with a key of `edits` replaced by its
    value. Every key must name exactly one line, and that line must be a marked one."""
    lines = script.read_text().splitlines()
    marked = site_lines(script.read_text())
    for start, replacement in edits.items():
        (index,) = [i for i, line in enumerate(lines) if line.lstrip().startswith(start)]
        assert index in marked, f"{script.name}:{index + 1} ({lines[index]!r}) is not among the marked lines"
        lines[index] = replacement
    copy.write_text("\n".join(lines) + "\n")
    return copy


def recipe_shards(name: str) -> dict[str, str]:
    init_args = yaml.safe_load(find_recipe(name).read_text())["data"]["init_args"]
    return {key: init_args[key] for key in ("train_shards", "val_shards") if key in init_args}


@pytest.mark.parametrize("name", ["prepare.sbatch", "pretrain.sbatch"])
def test_a_slurm_script_keeps_everything_site_specific_in_its_marked_lines(name):
    """Partition, account, time limit, cores, the environment's activation and the data paths are in the
    marked blocks (one for #SBATCH lines, one for the shell), and nothing site-specific is outside them:
    no other cluster setting, activation or absolute path, so that editing the marks is all a user does."""
    text = (SLURM_DIR / name).read_text()
    lines = text.splitlines()
    marked = site_lines(text)
    assert text.count(SITE_START) == 2 and text.count(SITE_END) == 2
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line and not line.startswith("#"))
    for i in marked:
        if lines[i].startswith("#SBATCH"):
            assert i < first_command, (
                f"{name}:{i + 1}: SLURM reads #SBATCH lines only before the first command"
            )
    inside = [lines[i] for i in sorted(marked)]
    for setting in ("#SBATCH --partition=", "#SBATCH --account=", "source ", "#SBATCH --time="):
        assert any(line.startswith(setting) for line in inside), f"{name}: no marked {setting!r} line"
    for index, line in enumerate(lines):
        if index in marked or (line.startswith("#") and not line.startswith("#SBATCH")):
            continue  # the user's lines, and comments (whose examples name paths)
        assert not SITE_SETTINGS.search(line), f"{name}:{index + 1}: site-specific, yet not marked: {line!r}"


def test_the_slurm_scripts_and_the_readme_use_the_recipes_shard_paths():
    """prepare.sbatch writes, and pretrain.sbatch passes, the folders the pretraining recipe reads; the
    README's AudioSet-2M examples write them too (they once wrote shards/as2m, which no recipe reads)."""
    shards = recipe_shards("pretrain/audioset2m_vitb")
    assert shards == {"train_shards": "shards/audioset2m/train", "val_shards": "shards/audioset2m/eval"}
    prepare_text = (SLURM_DIR / "prepare.sbatch").read_text()
    assert re.search(r"^OUT=\$\{OUT:-(\S+)\}", prepare_text, re.M)[1] == shards["train_shards"]
    pretrain_text = (SLURM_DIR / "pretrain.sbatch").read_text()
    base = re.search(r"^SHARDS=\$\{SHARDS:-(\S+)\}", pretrain_text, re.M)[1]
    assert {"train_shards": f"{base}/train", "val_shards": f"{base}/eval"} == shards
    readme = (REPO_ROOT / "README.md").read_text()
    examples = [line for line in readme.splitlines() if "sbatch" in line or "audioset_" in line]
    written = {path for line in examples for path in re.findall(r"shards/[\w./-]+", line)}
    assert written and written <= set(shards.values()), written - set(shards.values())
    assert "shards/as2m" not in readme


def test_the_pretraining_script_runs_the_recipe_with_the_marked_paths(tmp_path):
    """pretrain.sbatch made ready by editing its marked lines only: srun (a stand-in that records its
    command) gets the recipe, the nodes and GPUs SLURM gave, the marked shards and MAE weights, and the
    run's fixed logger version; weights that are not there stop the job before srun, in one message."""
    log = tmp_path / "srun.txt"
    bin_dir = stand_in_srun(tmp_path, log)
    weights = tmp_path / "mae_pretrain_vit_base_full.pth"
    weights.write_bytes(b"")  # srun is a stand-in: nothing reads it
    edits = {
        "#SBATCH --partition=": "#SBATCH --partition=gpu",
        "#SBATCH --account=": "#SBATCH --account=lab",
        "source ": f"source {Path(sys.prefix) / 'bin' / 'activate'}",
        "INIT_FROM=": f"INIT_FROM={weights}",
    }
    script = user_copy(SLURM_DIR / "pretrain.sbatch", tmp_path / "pretrain.sbatch", edits)
    environment = {
        key: value for key, value in os.environ.items() if key not in ("SHARDS", "INIT_FROM", "VIRTUAL_ENV")
    }
    environment.update(
        PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
        SLURM_JOB_ID="777", SLURM_NNODES="4", SLURM_NTASKS_PER_NODE="8",
    )  # fmt: skip
    result = subprocess.run(
        ["bash", str(script)], env=environment, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    argv = log.read_text().splitlines()
    assert argv[argv.index("--config") + 1] == "configs/pretrain/audioset2m_vitb.yaml"
    options = dict(zip(argv[argv.index("fit") + 3 :: 2], argv[argv.index("fit") + 4 :: 2], strict=False))
    shards = recipe_shards("pretrain/audioset2m_vitb")
    assert options["--data.init_args.train_shards"] == shards["train_shards"]
    assert options["--data.init_args.val_shards"] == shards["val_shards"]
    assert options["--model.init_args.init_from"] == str(weights)
    assert options["--trainer.num_nodes"] == "4" and options["--trainer.devices"] == "8"
    assert options["--data.init_args.batch_size"] == "16"  # the paper's global batch of 512 over 32 ranks
    assert options["--trainer.logger.init_args.version"] == "job777"

    weights.unlink()
    log.unlink()
    result = subprocess.run(
        ["bash", str(script)], env=environment, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 2 and not log.exists()
    assert (
        f"INIT_FROM={weights}: no such file" in result.stderr
        and "mae_pretrain_vit_base_full" in result.stderr
    )
