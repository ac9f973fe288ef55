"""The full-size dry run's benchmark (`python -m benchmarks --only paper_recipe`): its step timer in a
real Lightning run, and its section of BENCHMARKS.md. The run itself takes minutes at ViT-B size: it is
`make bench`'s, and `tests/tasks/test_pretrain_init.py` builds the same recipe through LightningCLI."""

from __future__ import annotations

import json

import lightning as L
import torch
from torch.utils.data import DataLoader

from avsync.model import CAVMAESync
from avsync.tasks.pretrain import PretrainModule
from benchmarks.paper_recipe import StepTimer
from benchmarks.report import render
from benchmarks.suite import SUITE

TINY = dict(
    image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=1,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=0,
)  # fmt: skip


def test_the_step_timer_times_every_optimizer_step_of_a_real_run(tmp_path):
    clips = [{"audio": torch.randn(32, 32), "video": torch.randn(3, 32, 32)} for _ in range(6)]
    path = tmp_path / "steps.json"
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StepTimer(str(path))],
    )  # fmt: skip
    trainer.fit(PretrainModule(CAVMAESync(**TINY), warmup_steps=1), train_dataloaders=DataLoader(clips, 2))
    written = json.loads(path.read_text())
    assert len(written["steps_s"]) == len(written["steps_cpu_s"]) == 3
    assert all(s > 0 for s in written["steps_s"]) and written["peak_rss_mib_before_checkpoint"] > 0


def test_the_dry_run_has_its_section_in_the_report():
    assert SUITE["paper_recipe"].full == {"clips": 4, "batch_size": 2, "steps": 2}
    result = {
        "recipe": "pretrain/audioset2m_vitb", "clips": 4, "batch_size": 2, "steps": 2, "threads": 2,
        "precision": "bf16-mixed", "machine": {"cpu": "Some CPU", "cpu_features": ["avx2"]},
        "init_file": {"tensors": 254, "parameters_m": 111.9, "bytes": 447733007},
        "init_report": "init_from mae_pretrain_vit_base_full.pth: initialized 401 tensors",
        "steps_s": [9.5, 7.9], "steps_cpu_s": [18.0, 15.1], "fit_s": 66.9, "load_average_after_fit": [2.0],
        "fit_peak_rss_mib": 4815.3, "fit_peak_rss_mib_before_checkpoint": 4708.3, "peak_rss_mib": 4815.3,
        "checkpoint": {"bytes": 2280214202, "global_step": 2, "tensors": 407, "adam_parameters": 407},
    }  # fmt: skip
    text = render({"results": {"paper_recipe": result}})
    assert "## 1c. The paper's recipe at full size: a dry run on CPU" in text
    assert "| 2 | 7.9 | 15.1 | 0.253 |" in text
    assert "4,815 MiB" in text and "2.12 GiB, global step 2" in text and "initialized 401 tensors" in text
    failed = render({"results": {"paper_recipe": {"failed": "avsync fit failed (exit 1)"}}})
    assert "**paper_recipe failed:**" in failed
