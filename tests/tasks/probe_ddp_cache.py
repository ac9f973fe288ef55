"""Probe feature caching under real DDP (launch with torchrun): each rank extracts its share of the clips.

Usage: torchrun --nproc_per_node 2 probe_ddp_cache.py TMP_DIR
Writes TMP_DIR/rank<r>.json: the backbone passes this rank ran and the keys of the cached train split
it loaded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import lightning as L

from avsync.distributed import release_process_group


def main(directory: str) -> None:
    spec = importlib.util.spec_from_file_location("probe_tests", Path(__file__).with_name("test_probe.py"))
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    model = tests.backbone()
    counter = tests.ForwardCounter(model)
    datamodule = tests.data(Path(directory))
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
    release_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
