"""Fixtures of the reliability tests, and the plugin that writes RELIABILITY.md from their outcomes.

Runs are real: `avsync prepare` / `avsync fit` in subprocesses (torchrun for several ranks), real
shards prepared from synthetic H.264 + AAC clips, real signals. Each test records the cases it
checks (`reliability.record(...)`) with the outcome it observed; when the whole folder ran and
passed, the table in RELIABILITY.md is rewritten from those records (only if it changed).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# the index fixtures (the real clips, their `avsync embed` output, an index of it), for hostile indexes
from tests.index.conftest import clip_index, real_clips, real_embeddings, small_model  # noqa: F401

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
RELIABILITY_MD = REPO_ROOT / "RELIABILITY.md"

#: A backbone small enough for a CPU step in tens of milliseconds that still reads 128-bin spectrograms.
SMALL_BACKBONE = dict(
    image_size=32, audio_length=64, embed_dim=32, num_heads=2, encoder_depth=1, joint_depth=1,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip


# ------------------------------------------------------------------------------------------ processes
def avsync_env(**extra: str) -> dict[str, str]:
    """The environment of an avsync subprocess: this folder importable (for `reliability_probes`),
    one thread (two ranks share the CI machine's 2 cores)."""
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def avsync_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "avsync.cli", *args]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def prepared_shards(tmp_path_factory) -> Path:
    """16 synthetic 3-s clips prepared by `avsync prepare` into 8 shards of 2 clips."""
    from avsync.data.prepare import prepare
    from avsync.synth import synthesize

    root = tmp_path_factory.mktemp("reliability_data")
    synth = synthesize(root / "synth", clips=16, classes=4, duration=3.0, size=64, workers=0)
    summary = prepare(
        [synth.out_dir / "videos"], root / "shards", shard_max_clips=2, workers=1, progress=False
    )
    assert summary.clips == 16 and len(summary.shards) == 8 and summary.failures == 0
    return root / "shards"


def shard_keys(shards: Path) -> dict[str, set[str]]:
    """shard file name -> the clip ids it holds (read from the tar members' metadata)."""
    keys: dict[str, set[str]] = {}
    for shard in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            keys[shard.name] = {
                json.loads(archive.extractfile(m).read())["id"]
                for m in archive.getmembers()
                if m.name.endswith(".json")
            }
    return keys


@pytest.fixture(scope="session")
def tool_inputs(prepared_shards) -> dict:
    """What every checkpoint-reading tool needs besides the checkpoint: prepared shards, one of their
    source videos, and the `avsync synth` folder they came from."""
    videos = sorted((prepared_shards.parent / "synth" / "videos").glob("*.mp4"))
    return {"shards": prepared_shards, "video": videos[0], "synth": prepared_shards.parent / "synth"}


@pytest.fixture(scope="session")
def output_kit(tmp_path_factory) -> dict[str, Path]:
    """What the tools that write outputs read: two different real clips that share a file name
    (`d1/clip.mp4`, `d2/clip.mp4`), an untrained small-backbone safetensors export (`ckpt`), the two
    clips prepared into shards, a localization manifest prompting each clip at 1 s (`manifest`), and
    their `avsync embed` output (`embeddings`)."""
    import numpy as np
    import torch
    from PIL import Image

    from avsync.api import load, write_embeddings
    from avsync.checkpoints import save_backbone
    from avsync.data.prepare import prepare
    from avsync.model import CAVMAESync

    from .hostile_media import write_media

    root = tmp_path_factory.mktemp("output_kit")
    (root / "d1").mkdir()
    (root / "d2").mkdir()
    first = write_media(root / "d1" / "clip.mp4", duration=3.0)
    second = write_media(root / "d2" / "clip.mp4", duration=2.5, fps=8)  # other frames, other length
    torch.manual_seed(0)
    ckpt = save_backbone(CAVMAESync(**SMALL_BACKBONE).eval(), root / "tiny.safetensors")
    summary = prepare([root / "d1", root / "d2"], root / "shards", workers=1, progress=False)
    assert summary.clips == 2 and summary.failures == 0
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(root / "mask.png")
    manifest = root / "prompts.csv"
    rows = ["video,frame_time,mask,class", "d1/clip.mp4,1.0,mask.png,beep", "d2/clip.mp4,1.0,mask.png,beep"]
    manifest.write_text("\n".join(rows) + "\n")
    model = load(ckpt, "cpu")
    run = model.embed_videos([first, second], batch_size=2, num_workers=0)
    embeddings = write_embeddings(run, root / "embeddings.npz", model.describe(), patches=False)
    return {"root": root, "first": first, "second": second, "ckpt": ckpt, "shards": root / "shards",
            "manifest": manifest, "embeddings": embeddings}  # fmt: skip


# ------------------------------------------------------------------------------------------ configs
def fit_config(
    path: Path,
    shards: Path,
    runs: Path,
    *,
    steps_dir: Path | None = None,
    trainer: dict | None = None,
    data: dict | None = None,
    model: dict | None = None,
    checkpoint: dict | None = None,
    probe: dict | None = None,
    callbacks: list[dict] | None = None,
) -> Path:
    """A config file: configs/pretrain/tiny_cpu.yaml with the small backbone, these shards for
    training only (no validation), a TensorBoard logger with a fixed version (so that `--ckpt_path
    last` finds the run's checkpoints, as in scripts/slurm/pretrain.sbatch), `last.ckpt` only, and
    `RecordSteps` when `steps_dir` is given."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trainer"].update(
        max_epochs=1, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    config["trainer"]["logger"]["init_args"].update(save_dir=str(runs), name="reliability", version="run")
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, **(checkpoint or {})},
        }
    ]
    if steps_dir is not None:
        config["trainer"]["callbacks"].append(
            {
                "class_path": "reliability_probes.RecordSteps",
                "init_args": {"out_dir": str(steps_dir), **(probe or {})},
            }
        )
    config["trainer"]["callbacks"] += callbacks or []
    config["trainer"].update(trainer or {})
    config["model"]["init_args"]["backbone"]["init_args"] = dict(SMALL_BACKBONE)
    config["model"]["init_args"].update(log_images_every_n_steps=0, **(model or {}))
    config["data"]["init_args"] = {
        "train_shards": str(shards),
        "batch_size": 2,
        "num_workers": 0,
        **(data or {}),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def checkpoints_dir(runs: Path) -> Path:
    return runs / "reliability" / "run" / "checkpoints"


# ------------------------------------------------------------------------------------------ RELIABILITY.md
@dataclass
class Case:
    group: str
    case: str
    entry_point: str
    outcome: str


class Recorder:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def record(self, group: str, case: str, entry_point: str, outcome: str) -> None:
        """Note a case and the outcome the test observed (call it after the assertions that back it)."""
        self.cases.append(Case(group, case, entry_point, outcome))


_RECORDER = Recorder()
_GROUP_ORDER = ("Multi-node", "Resume", "Hostile inputs")


@pytest.fixture
def reliability() -> Recorder:
    return _RECORDER


def render(cases: list[Case]) -> str:
    """The RELIABILITY.md text for `cases` (grouped, in a stable order)."""
    lines = [
        "# Reliability",
        "",
        "What avsync does when runs are interrupted, scaled out, or fed hostile inputs. Every row is written",
        "by the test that checks it (`tests/reliability/`), from the outcome it observed; the file is",
        "regenerated when `pytest tests/reliability` (or `make test`) runs the whole folder and it passes.",
        "Do not edit by hand.",
    ]
    for group in _GROUP_ORDER:
        rows = [c for c in cases if c.group == group]  # in the order the tests ran (file order)
        if not rows:
            continue
        lines += ["", f"## {group}", "", "| case | checked through | outcome |", "|---|---|---|"]
        lines += [f"| {c.case} | {c.entry_point} | {c.outcome} |" for c in rows]
    return "\n".join(lines) + "\n"


_outcomes: dict[str, str] = {}
_deselected: list[str] = []


def _in_this_folder(nodeid: str) -> bool:
    return nodeid.startswith("tests/reliability/")


def pytest_deselected(items) -> None:
    _deselected.extend(item.nodeid for item in items if _in_this_folder(item.nodeid))


def pytest_runtest_logreport(report) -> None:
    if not _in_this_folder(report.nodeid):
        return
    if report.outcome != "passed":  # failed or skipped, in any phase
        _outcomes[report.nodeid] = report.outcome
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Rewrite RELIABILITY.md when every test file of this folder ran, nothing was deselected, and
    every test passed (a partial run would drop rows)."""
    ours = [item for item in session.items if _in_this_folder(item.nodeid)]
    files = {Path(str(item.fspath)).name for item in ours}
    complete = (
        files == {path.name for path in HERE.glob("test_*.py")}
        and not _deselected
        and all(_outcomes.get(item.nodeid) == "passed" for item in ours)
    )
    if not complete or not _RECORDER.cases:
        return
    text = render(_RECORDER.cases)
    if not RELIABILITY_MD.exists() or RELIABILITY_MD.read_text() != text:
        RELIABILITY_MD.write_text(text)
        session.config.get_terminal_writer().line(
            f"\n{RELIABILITY_MD.name} regenerated from the reliability tests"
        )
