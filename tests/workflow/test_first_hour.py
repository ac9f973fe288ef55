"""What a new user meets in the first hour (issue 16): the demo's progress and resumption, the avsync
classes in `--help`, quick tool help, quiet tools, export file modes, clear embedding errors."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import VIDEO_TEST_BACKBONE

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A demo-like pretraining: the demo's own data and `pretrain` functions and its recipe, on 15 clips,
#: with a narrower backbone and 2 steps of 8 clips an epoch (so that it also runs on a loaded machine).
PRETRAIN_SCRIPT = """
import sys
from pathlib import Path
from avsync.demo import make_data, pretrain
from avsync.recipes import find_recipe
workdir, epochs = Path(sys.argv[1]), int(sys.argv[2])
make_data(workdir, clips=15, classes=4, seed=0, workers=1)
backbone = "--model.init_args.backbone.init_args."
fit_args = ["--data.init_args.epoch_length=16", "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0", "--trainer.check_val_every_n_epoch=100",
            backbone + "embed_dim=32", backbone + "num_heads=2", backbone + "encoder_depth=1",
            backbone + "decoder_dim=16", backbone + "decoder_heads=2"]
checkpoint = pretrain(find_recipe("pretrain/tiny_cpu"), workdir, epochs, fit_args, progress_interval=0.1)
print("checkpoint:", checkpoint, flush=True)
"""


def demo_pretrain(workdir: Path, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", PRETRAIN_SCRIPT, str(workdir), str(epochs)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 1800) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_demo_pretraining_resumes_after_sigterm_and_reuses_a_finished_run(tmp_path):
    workdir = tmp_path / "demo"
    first = demo_pretrain(workdir, epochs=2)
    lines = []
    for line in first.stdout:  # wait until training has taken a step, then stop it as a scheduler would
        lines.append(line)
        if line.startswith("[train] step"):
            first.send_signal(signal.SIGTERM)
            break
    code, out, err = finish(first)
    out = "".join(lines) + out
    assert code == 143, err[-3000:]
    assert "avsync demo" in err and "--ckpt_path last" not in err  # advice that works for the demo
    run = workdir / "runs" / "pretrain" / "demo"
    state = json.loads((run / "demo-pretrain.json").read_text())
    assert state["finished"] is False
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped_at < 4

    code, out, err = finish(demo_pretrain(workdir, epochs=2))
    assert code == 0, err[-3000:]
    assert "resuming the interrupted run" in out and f"resuming at step {stopped_at}" in out
    assert "ETA" in out and "it/s" in out  # progress lines, although stdout is a pipe
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not list(run.glob("checkpoints/last-v*.ckpt"))  # the resumed run wrote where it read
    assert json.loads((run / "demo-pretrain.json").read_text())["finished"] is True
    finished_bytes = last.read_bytes()

    code, out, err = finish(demo_pretrain(workdir, epochs=2))
    assert code == 0, err[-3000:]
    assert "reusing the finished run" in out and "[train]" not in out  # not a step trained again
    assert last.read_bytes() == finished_bytes

    code, out, err = finish(demo_pretrain(workdir, epochs=1))  # other settings: not the same run
    assert code == 0, err[-3000:]
    assert "starting afresh" in out and "[train] 2 steps" in out
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_the_demo_writes_last_ckpt_every_epoch_and_drops_the_flops_line(tmp_path):
    from avsync.demo import demo_callbacks
    from avsync.recipes import find_recipe

    callbacks = demo_callbacks(find_recipe("pretrain/tiny_cpu"), interactive=False)
    checkpoint = next(c for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))
    settings = checkpoint["init_args"]
    assert settings["save_on_train_epoch_end"] is True and settings["save_last"] is True
    assert settings["save_top_k"] == 1 and settings["enable_version_counter"] is False
    assert any(c["class_path"].endswith("LogLineProgress") for c in callbacks)
    assert any(
        c["class_path"].endswith("TQDMProgressBar")
        for c in demo_callbacks(find_recipe("pretrain/tiny_cpu"), True)
    )

    import lightning as L

    from avsync.training.console import SummaryWithoutFlops

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    summary_log = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    handler, level = Keep(), summary_log.level
    summary_log.addHandler(handler)
    summary_log.setLevel(logging.INFO)
    try:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
        trainer = L.Trainer(
            max_epochs=1, callbacks=[SummaryWithoutFlops()], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(Tiny(), data)
    finally:
        summary_log.removeHandler(handler)
        summary_log.setLevel(level)
    table = "\n".join(records)
    assert "Total params" in table and "Linear" in table
    assert "FLOPs" not in table and "Total Flops" not in table


def avsync(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avsync.cli", *args],
        cwd=REPO_ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_avsync_classes_are_in_help_and_known_by_short_name():
    help_text = avsync("fit", "--help").stdout
    for name in (
        "avsync.tasks.PretrainModule",
        "avsync.tasks.retrieval.RetrievalModule",
        "avsync.tasks.probe.ProbeModule",
        "avsync.data.datamodule.AVShardDataModule",
    ):
        assert name in help_text
    model_help = avsync("fit", "--model.help", "PretrainModule")
    assert model_help.returncode == 0, model_help.stderr[-2000:]
    assert "--model.lr" in model_help.stdout
    printed = avsync(
        "fit", "--model", "PretrainModule", "--model.backbone", "CAVMAESync",
        "--data", "AVShardDataModule", "--data.train_shards", "shards/x", "--print_config",
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "class_path: avsync.tasks.PretrainModule" in printed.stdout
    assert "class_path: avsync.data.datamodule.AVShardDataModule" in printed.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["retrieve", "--help"],
        ["localize", "--help"],
        ["segment", "--help"],
        ["demo", "--help"],
        ["prepare", "--help"],
        ["synth", "--help"],
        ["embed", "--help"],
        ["export", "--help"],
        ["index", "--help"],
        ["index", "build", "--help"],
        ["index", "search", "--help"],
        ["app", "--help"],
        ["config", "--help"],
        ["retrieve"],  # a usage error: missing --ckpt
        ["prepare", "videos"],  # missing OUT
        ["prepare", "videos", "out", "--shard-max-bytes", "lots"],
        ["synth", "out", "--clips", "4"],  # missing --classes
        ["embed", "a.mp4", "--ckpt", "m.ckpt", "--out", "e.npz", "--precision", "fp64"],
        ["export", "m.ckpt"],  # missing OUT
        ["config", "--unknown"],
        ["segment", "--ckpt", "m.ckpt", "--out", "o", "--segments", "x", "a.mp4"],
    ],
)
def test_tool_help_and_usage_errors_come_back_without_importing_torch(args):
    probe = (
        "import sys\nfrom avsync.cli import main\n"
        f"try:\n    code = main({args!r})\nexcept SystemExit as stop:\n    code = stop.code\n"
        "print('torch' in sys.modules, code)"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT)
    elapsed = time.perf_counter() - started
    imported, code = result.stdout.split()[-2:]
    assert imported == "False", f"{args}: torch imported before parsing ({elapsed:.1f} s)"
    assert int(code) == (0 if "--help" in args else 2)
    assert ("usage: avsync" in result.stdout) if "--help" in args else ("error:" in result.stderr)


def test_the_tools_offer_what_the_library_accepts():
    """The choices and defaults `avsync.tools` spells out (so that the command line imports no torch)
    are the library's."""
    import dataclasses
    import typing

    from avsync import tools
    from avsync.api.model import PRECISIONS
    from avsync.api.outputs import OUTPUT_FORMATS
    from avsync.data.audio import MonoMode
    from avsync.data.clip import ExtractionOptions
    from avsync.evaluation.retrieval import DIRECTIONS
    from avsync.evaluation.similarity import STRATEGIES
    from avsync.synth.config import KINDS

    choices = typing.get_args
    assert choices(tools.Strategy) == STRATEGIES and choices(tools.Direction) == DIRECTIONS
    assert choices(tools.MonoMode) == choices(MonoMode) and choices(tools.SynthKind) == KINDS
    assert choices(tools.EmbedPrecision) == PRECISIONS and choices(tools.EmbedFormat) == OUTPUT_FORMATS
    library = dataclasses.asdict(ExtractionOptions())
    for tool in (tools.Prepare, tools.Embed, tools.Segment):
        shown = {f.name: f.default for f in dataclasses.fields(tool) if f.name in library}
        assert shown and all(library[name] == value for name, value in shown.items()), tool.__name__


def test_retrieve_prints_results_without_dependency_noise(demo_run, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    result = avsync(
        "retrieve", "--ckpt", str(demo_run.checkpoint), "--shards", str(demo_run.workdir / "test"),
        "--out", str(tmp_path), "--workers", "0", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diagonal_mean" in result.stdout
    output = result.stdout + result.stderr
    for noise in ("Tip", "GPU available", "TPU available", "DeprecationWarning", "deprecated"):
        assert noise not in output, f"{noise!r} in the output of avsync retrieve:\n{output[-3000:]}"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_follows_the_umask_like_every_other_output(tmp_path, umask):
    from avsync.checkpoints import save_backbone
    from avsync.model import CAVMAESync

    previous = os.umask(umask)
    try:
        path = save_backbone(
            CAVMAESync(**VIDEO_TEST_BACKBONE), tmp_path / "model.safetensors", json_sidecar=True
        )
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == 0o666 & ~umask


def test_embedding_only_missing_videos_says_why_there_is_nothing(demo_run, tmp_path):
    import avsync

    model = avsync.load(demo_run.checkpoint, "cpu")
    missing = [str(tmp_path / f"absent{i}.mp4") for i in range(3)]
    run = model.embed_videos(missing)
    assert len(run.failures) == 3 and not run.embeddings
    with pytest.raises(ValueError, match="no video could be embedded.*absent0.mp4"):
        _ = run.audio
    with pytest.raises(ValueError, match="no video could be embedded"):
        _ = run.video


@pytest.mark.parametrize("recipe", ["pretrain/tiny_cpu", "pretrain/tiny_cpu_mae"])
def test_the_tiny_recipes_write_last_ckpt_after_every_epoch(tmp_path, recipe):
    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint

    from avsync.recipes import find_recipe

    trainer_config = yaml.safe_load(find_recipe(recipe).read_text())["trainer"]
    (settings,) = [
        c["init_args"] for c in trainer_config["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    ]
    seen = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def on_train_epoch_start(self):  # what a run stopped now would resume from
            seen.append(sorted(path.name for path in tmp_path.glob("checkpoints/*")))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", **settings)],
        check_val_every_n_epoch=trainer_config["check_val_every_n_epoch"], logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Tiny(), data)
    assert seen == [[], ["epoch=0-step=2.ckpt", "last.ckpt"], ["epoch=1-step=4.ckpt", "last.ckpt"]]
    assert sorted(path.name for path in tmp_path.glob("checkpoints/*")) == [
        "epoch=2-step=6.ckpt",
        "last.ckpt",
    ]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """8 synthetic 3-s clips prepared into shards (seconds, unlike the demo_run fixture)."""
    from avsync.data.prepare import prepare
    from avsync.synth import synthesize

    root = tmp_path_factory.mktemp("tiny_shards")
    synth = synthesize(root / "synth", clips=8, classes=2, duration=3.0, size=64, workers=0)
    summary = prepare([synth.out_dir / "videos"], root / "shards", workers=1, progress=False)
    assert summary.clips == 8
    return root / "shards"


def test_fit_prints_one_model_summary_without_flops_and_keeps_two_checkpoints(tiny_shards, tmp_path):
    backbone = "--model.init_args.backbone.init_args."
    result = avsync(
        "fit", "--config", "configs/pretrain/tiny_cpu.yaml",
        f"--data.init_args.train_shards={tiny_shards}", "--data.init_args.val_shards=null",
        "--data.init_args.epoch_length=4", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        "--data.init_args.shuffle_buffer=8", "--trainer.max_epochs=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.init_args.log_images_every_n_steps=0",
        *(backbone + setting for setting in (
            "image_size=32", "audio_length=64", "embed_dim=32", "num_heads=2", "encoder_depth=1",
            "joint_depth=1", "decoder_dim=16", "decoder_depth=1", "decoder_heads=2", "num_registers=2",
        )),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("Total params") == 1, output[-3000:]  # Lightning's own summary is not added too
    assert "FLOPs" not in output and "Total Flops" not in output
    assert "already configured with model summary" not in output
    checkpoints = tmp_path / "tiny_cpu" / "version_0" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


@pytest.mark.parametrize(
    "callbacks, summaries",
    [
        ("[]", ["SummaryWithoutFlops"]),  # the default
        ('[{"class_path": "avsync.training.console.SummaryWithoutFlops"}]', ["SummaryWithoutFlops"]),  # demo
        (
            '[{"class_path": "lightning.pytorch.callbacks.ModelSummary", "init_args": {"max_depth": 2}}]',
            ["ModelSummary"],
        ),
    ],
)
def test_a_run_has_one_model_summary(callbacks, summaries, monkeypatch):
    from lightning.pytorch.callbacks import ModelSummary

    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI reads `args`, not pytest's command line
    from avsync.cli import avsync_cli_class, register_classes, trainer_defaults

    register_classes()
    backbone = "--model.init_args.backbone.init_args."
    cli = avsync_cli_class()(
        subclass_mode_model=True, subclass_mode_data=True, trainer_defaults=trainer_defaults(), run=False,
        args=[
            "--config", str(REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"),
            f"--trainer.callbacks={callbacks}", "--trainer.logger=false",
            backbone + "embed_dim=32", backbone + "num_heads=2", backbone + "encoder_depth=1",
        ],
    )  # fmt: skip
    found = [type(c).__name__ for c in cli.trainer.callbacks if isinstance(c, ModelSummary)]
    assert found == summaries
