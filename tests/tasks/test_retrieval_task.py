"""`RetrievalModule` in real Lightning runs: rankings written and read back, clips gathered over 2 DDP
processes exactly as 1 process sees them, and `avsync retrieve` = `avsync test --config` on real shards."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from avsync.evaluation.retrieval import evaluate_all
from avsync.model import CAVMAESync
from avsync.tasks.retrieval import RetrievalModule

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(
    image_size=32, audio_length=32, mel_bins=128, embed_dim=32, num_heads=2, encoder_depth=2,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip
CLIPS, STEPS = 11, 4


class Clips(torch.utils.data.Dataset):
    """Eval-mode clips (all T pairs) of random inputs, ids in reverse order of their index."""

    def __len__(self) -> int:
        return CLIPS

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {
            "audio": torch.randn(STEPS, SMALL["audio_length"], SMALL["mel_bins"], generator=generator),
            "video": torch.randn(STEPS, 3, SMALL["image_size"], SMALL["image_size"], generator=generator),
            "key": f"clip{CLIPS - index:02d}",
        }


class SeenClips(L.Callback):
    """The clip ids this rank's test steps received."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.keys += list(batch["key"])


def run_retrieval(out: Path, devices: int = 1, callbacks=(), top_k: int = 3) -> RetrievalModule:
    torch.manual_seed(0)
    module = RetrievalModule(CAVMAESync(**SMALL), top_k=top_k, output_dir=str(out))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks),
    )  # fmt: skip
    trainer.test(module, DataLoader(Clips(), batch_size=2), verbose=False)
    return module


def read_rankings(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_top_k_rankings_are_written_and_read_back(tmp_path):
    module = run_retrieval(tmp_path, top_k=3)
    keys, audio, video = module.embeddings
    assert keys == sorted(f"clip{i:02d}" for i in range(1, CLIPS + 1))  # sorted by id, not by arrival
    expected = evaluate_all(audio, video, top_k=3)
    files = sorted((tmp_path / "rankings").glob("*.csv"))
    assert [f.stem for f in files] == sorted(f"{d}_{s}" for d, by in expected.items() for s in by)
    for direction, by_strategy in expected.items():
        for strategy, result in by_strategy.items():
            rows = read_rankings(tmp_path / "rankings" / f"{direction}_{strategy}.csv")
            assert [row["query"] for row in rows] == keys
            assert [int(row["rank"]) for row in rows] == result.ranks.tolist()
            for i, row in enumerate(rows):
                assert [row[f"top{j}"] for j in (1, 2, 3)] == [keys[t] for t in result.topk_indices[i]]
                scores = [float(row[f"score{j}"]) for j in (1, 2, 3)]
                assert scores == pytest.approx(result.topk_scores[i].tolist(), abs=1e-6)
    metrics = json.loads((tmp_path / "retrieval.json").read_text())
    assert metrics["metrics"]["video_to_audio"]["diagonal_mean"]["R1"] == pytest.approx(
        expected["video_to_audio"]["diagonal_mean"].metrics["R1"]
    )


def test_without_top_k_no_rankings_are_written(tmp_path):
    run_retrieval(tmp_path, top_k=0)
    assert (tmp_path / "retrieval.json").exists() and not (tmp_path / "rankings").exists()


def test_two_processes_gather_exactly_the_clips_of_one(tmp_path):
    single = run_retrieval(tmp_path / "single")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(Path(__file__).with_name("retrieval_ddp.py")), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(seen) == CLIPS + 1 and len(set(seen)) == CLIPS  # DistributedSampler padded one clip
    keys, audio, video = single.embeddings
    for gathered in ranks:
        assert gathered["keys"] == keys
        torch.testing.assert_close(gathered["audio"], audio, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gathered["video"], video, rtol=1e-5, atol=1e-6)
    one = json.loads((tmp_path / "single" / "retrieval.json").read_text())
    two = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert two == one
    for path in (tmp_path / "single" / "rankings").glob("*.csv"):
        ours = read_rankings(tmp_path / "out" / "rankings" / path.name)
        assert [(r["query"], r["rank"], r["top1"]) for r in ours] == [
            (r["query"], r["rank"], r["top1"]) for r in read_rankings(path)
        ]


def test_retrieve_and_test_with_the_recipe_are_one_run(tmp_path):
    from avsync.checkpoints import save_backbone
    from avsync.cli import main as avsync
    from tests.data.conftest import write_shards

    write_shards(tmp_path / "shards", [3, 2], fbank_frames=120)
    torch.manual_seed(0)
    ckpt = save_backbone(CAVMAESync(**SMALL), tmp_path / "tiny.safetensors")
    common = ["--accelerator", "cpu", "--workers", "0", "--batch-size", "2", "--top-k", "2"]
    code = avsync(["retrieve", "--ckpt", str(ckpt), "--shards", str(tmp_path / "shards"),
                   "--out", str(tmp_path / "short"), *common])  # fmt: skip
    assert code == 0
    code = avsync([
        "test", "--config", str(REPO / "configs" / "retrieval" / "tiny_cpu.yaml"),
        f"--model.init_args.backbone_checkpoint={ckpt}",
        f"--model.init_args.output_dir={tmp_path / 'recipe'}",
        "--model.init_args.top_k=2", f"--trainer.default_root_dir={tmp_path / 'recipe'}",
        f"--data.init_args.test_shards={tmp_path / 'shards'}", "--data.init_args.eval_batch_size=2",
    ])  # fmt: skip
    assert code == 0
    short = json.loads((tmp_path / "short" / "retrieval.json").read_text())
    recipe = json.loads((tmp_path / "recipe" / "retrieval.json").read_text())
    assert short == recipe and short["metadata"]["clips"] == 5
    for name in ("video_to_audio_diagonal_mean.csv", "audio_to_video_block_max.csv"):
        assert (tmp_path / "short" / "rankings" / name).read_text() == (
            tmp_path / "recipe" / "rankings" / name
        ).read_text()
    saved = (tmp_path / "short" / "config.yaml").read_text()  # the run's full config, for provenance
    # no --alignment: the data module takes the loaded model's (`clip` here, as the recipe's results show)
    assert "avsync.tasks.retrieval.RetrievalModule" in saved and "alignment: null" in saved


def test_the_audioset_recipe_parses_and_builds_through_lightningcli(tmp_path, monkeypatch):
    """configs/retrieval/audioset_vitb.yaml (issue 20, item 8) as `avsync test --config` reads it: parsed
    and its model and data built by avsync's LightningCLI (its checkpoint swapped for a small one, no
    trainer: the recipe asks for a GPU), then checked against the protocol; nothing is evaluated."""
    from avsync.checkpoints import save_backbone
    from avsync.cli import avsync_cli_class, register_classes, trainer_defaults
    from avsync.data.datamodule import AVShardDataModule
    from tests.data.conftest import write_shards

    class Built(avsync_cli_class()):
        def _instantiate_trainer(self, config, callbacks):
            self.trainer_config = config
            return None

        def _run_subcommand(self, subcommand):
            """No evaluation."""

    torch.manual_seed(0)
    ckpt = save_backbone(CAVMAESync(**SMALL), tmp_path / "small.safetensors")
    write_shards(tmp_path / "shards" / "audioset" / "retrieval", [2])  # at the recipe's relative path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI reads `args`, not pytest's command line
    register_classes()
    recipe = REPO / "configs" / "retrieval" / "audioset_vitb.yaml"
    cli = Built(
        subclass_mode_model=True, subclass_mode_data=True, trainer_defaults=trainer_defaults(),
        args=["test", "--config", str(recipe), f"--model.init_args.backbone_checkpoint={ckpt}"],
    )  # fmt: skip
    assert isinstance(cli.model, RetrievalModule) and type(cli.datamodule) is AVShardDataModule
    assert cli.model.hparams.strategies[0] == "diagonal_mean"  # the paper's (Eq. 5), then Table 11's others
    assert sorted(cli.model.hparams.directions) == ["audio_to_video", "video_to_audio"]
    data = cli.datamodule
    assert data.shard_specs["test"] == "shards/audioset/retrieval"
    assert (data.num_frames, data.alignment) == (16, "authors")  # the authors' fixed 1024-frame windows
    assert (data.image_size, data.audio_length) == (SMALL["image_size"], SMALL["audio_length"])  # linked
    assert cli.trainer_config["precision"] == "bf16-mixed" and cli.trainer_config["devices"] == 1
    short_form = recipe.read_text().split("The same run, short form:")[1]
    assert "--shards shards/audioset/retrieval" in short_form and "--alignment authors" in short_form
