"""Retrieval under real DDP (launch with torchrun, gloo on loopback): each rank encodes its share of the
clips, `ClipEmbeddings` gathers them with tensor collectives.

Usage: torchrun --nproc_per_node 2 retrieval_ddp.py TMP_DIR
Writes TMP_DIR/rank<r>.pt (the clips this rank encoded, and the gathered ids and tokens) and, from rank 0,
the run's outputs under TMP_DIR/out.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from avsync.distributed import release_process_group


def main(directory: str) -> None:
    spec = importlib.util.spec_from_file_location(
        "retrieval_tests", Path(__file__).with_name("test_retrieval_task.py")
    )
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    counter = tests.SeenClips()
    module = tests.run_retrieval(Path(directory) / "out", devices=2, callbacks=[counter])
    keys, audio, video = module.embeddings
    torch.save(
        {"seen": counter.keys, "keys": keys, "audio": audio, "video": video},
        Path(directory) / f"rank{module.global_rank}.pt",
    )
    release_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
