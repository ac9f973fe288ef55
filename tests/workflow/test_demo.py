"""The demo end to end (in miniature) and the notebooks run top to bottom on its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from avsync.checkpoints import load_backbone
from avsync.demo import DemoRun, Row
from tests.conftest import SHARED

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_writes_every_task_beside_its_baselines(demo_run):
    results = json.loads((demo_run.workdir / "results.json").read_text())
    tasks = {row["task"] for row in results["rows"]}
    assert {
        "retrieval V->A diagonal mean",
        "retrieval A->V block mean",
        "linear probe (16 x [g_a, g_v])",
        "sound-prompted segmentation (paper's map)",
        "sound-prompted segmentation (paper's map), next clip's sounds (control)",
        "sound-prompted segmentation, paper's map + prompt surgery",
        "sound-prompted segmentation, self-attention readout",
        "sound-prompted segmentation, global readout + prompt surgery, next clip's sounds (control)",
        "temporal segmentation (audio-visual), true count",
        "temporal segmentation (audio-visual), count chosen",
    } <= tasks
    for row in results["rows"]:
        for column in ("trained", "untrained", "chance"):
            assert 0.0 <= row[column] <= 1.0, row
    retrieval_chance = [
        r["chance"] for r in results["rows"] if r["task"].startswith("retrieval") and r["metric"] == "R@1"
    ]
    assert retrieval_chance and all(c == pytest.approx(1 / 3) for c in retrieval_chance)  # 3 held-out clips
    assert Path(results["checkpoint"]).is_file()
    assert {"image-MAE stage", "pretrain"} <= set(results["timings_s"])
    for row in results["rows"]:
        assert row["margin"] == pytest.approx(row["trained"] - max(row["untrained"], row["chance"]))
    table = demo_run.table()
    assert "trained" in table and "sound-prompted segmentation" in table


def test_margin_column_is_trained_minus_the_better_baseline():
    above = Row("retrieval", "R@1", trained=0.9, untrained=0.2, chance=0.3)
    below = Row("localization", "mAP", trained=0.06, untrained=0.10, chance=0.09)
    assert above.margin == pytest.approx(0.6) and below.margin == pytest.approx(-0.04)
    table = DemoRun(Path("."), rows=[above, below]).table().splitlines()
    assert table[0].split()[-1] == "margin"
    assert table[2].split()[-1] == "+60.0" and table[3].split()[-1] == "-4.0"


def test_demo_starts_the_audio_visual_run_from_its_own_image_mae(demo_run):
    """The recipe in miniature: the image-MAE stage's export (the released MAE layout) is the
    `init_from` of the audio-visual run, and the run's config says so."""
    import yaml

    mae = demo_run.workdir / "runs" / "image_mae" / "demo" / "mae.pth"
    state = torch.load(mae, weights_only=True)["model"]
    assert "blocks.3.attn.qkv.weight" in state and "decoder_pred.weight" in state
    config = yaml.safe_load((demo_run.checkpoint.parent.parent / "config.yaml").read_text())
    assert Path(config["model"]["init_args"]["init_from"]) == mae


def test_demo_draws_and_logs_the_localization_control_figures(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figures = sorted(p.name for p in (demo_run.workdir / "figures").glob("localization_*.png"))
    assert figures == [
        "localization_global_readout_surgery.png",
        "localization_patch_tokens.png",
        "localization_patch_tokens_surgery.png",
        "localization_self_attention.png",
    ]
    events = EventAccumulator(str(demo_run.checkpoint.parent.parent), size_guidance={"images": 0})
    events.Reload()
    assert {f"localization/{Path(name).stem}" for name in figures} <= set(events.Tags()["images"])


def test_demo_checkpoint_is_the_trained_tiny_model(demo_run):
    backbone = load_backbone(demo_run.checkpoint)
    assert backbone.image_size == 96 and backbone.audio_length == 192 and backbone.embed_dim == 128
    untrained = type(backbone)(**backbone.config)
    changed = [
        name
        for name, tensor in backbone.state_dict().items()
        if not torch.equal(tensor, untrained.state_dict()[name])
    ]
    assert len(changed) > 0.9 * len(backbone.state_dict())


@pytest.mark.parametrize("name", ["retrieval", "localization", "temporal_segmentation"])
def test_notebook_runs_top_to_bottom(demo_run, name, monkeypatch):
    monkeypatch.setenv("AVSYNC_DEMO_DIR", str(demo_run.workdir))
    monkeypatch.setenv("AVSYNC_SHARED", str(SHARED))  # the real clips, when ../shared is there
    notebook = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}},
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [
        o
        for o in outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]
    assert images, "the notebook shows no figure"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    expected = {"retrieval": "diagonal_mean", "localization": "mAP", "temporal_segmentation": "ARI"}[name]
    assert expected in text
