"""Probe feature caching under real DDP (launch with torchrun): each rank extracts its share of the clips.

Usage: torchrun --nproc_per_node 2 probe_ddp_cache.py TMP_DIR [TRAIN_CLIPS]
Writes TMP_DIR/rank<r>.json: the backbone passes this rank ran and the keys of the cached train split
it loaded; and TMP_DIR/train.pt (rank 0): that split's keys, features and labels.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import lightning as L
import torch

from avsync.distributed import release_process_group


def main(directory: str, train_clips: int = 96) -> None:
    spec = importlib.util.spec_from_file_location("probe_tests", Path(__file__).with_name("test_probe.py"))
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    model = tests.backbone()
    counter = tests.ForwardCounter(model)
    datamodule = tests.data(Path(directory), tests.ClipSource(train_clips=train_clips))
    run = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    run.fit(tests.probe(model), datamodule)
    report = {
        "calls": counter.calls,
        "train_keys": datamodule.splits["train"].keys,
        "val_clips": len(datamodule.splits["val"]),
    }
    (Path(directory) / f"rank{run.global_rank}.json").write_text(json.dumps(report))
    if run.global_rank == 0:
        train = datamodule.splits["train"]
        torch.save(
            {"keys": train.keys, "features": train.features, "labels": train.labels},
            Path(directory) / "train.pt",
        )
    release_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *(int(arg) for arg in sys.argv[2:]))
