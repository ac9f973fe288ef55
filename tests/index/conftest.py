"""Fixtures of the `avsync index` tests: small clustered galleries (`avsync.synth.embeddings`), a tiny
model, and real `avsync embed` outputs (of the two real clips in ../shared/data/videos, and of shards)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.checkpoints import save_backbone
from avsync.cli import main as avsync_main
from avsync.model import CAVMAESync
from avsync.synth.embeddings import ClusteredGallery
from tests.api.conftest import REAL_CLIPS, SMALL
from tests.conftest import shared_path

#: 2,000 clips of 16 tokens of 64 in 20 categories: small, but clustered like real embeddings.
SMALL_GALLERY = ClusteredGallery(num_clips=2000, dim=64, clusters=20, chunk_size=2000, seed=3)


def embed_main(argv: list[str]) -> int:
    """`avsync embed ARGV`, as the command runs it."""
    return avsync_main(["embed", *argv])


@pytest.fixture(scope="session")
def clustered() -> dict[str, np.ndarray]:
    """`ids`, `audio`, `video` of SMALL_GALLERY, each frame scaled by a random positive factor (the
    index must normalize per frame, as the diagonal mean does)."""
    chunk = SMALL_GALLERY.chunk(0)
    rng = np.random.default_rng(0)
    scales = {
        m: rng.uniform(0.5, 3.0, size=(*chunk[m].shape[:2], 1)).astype(np.float32) for m in ("audio", "video")
    }
    return {
        "ids": np.array([f"clip{i:04d}" for i in range(SMALL_GALLERY.num_clips)]),
        "audio": chunk["audio"] * scales["audio"],
        "video": chunk["video"] * scales["video"],
    }


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A tiny backbone (SMALL: 32-wide tokens) exported as safetensors."""
    torch.manual_seed(0)
    return save_backbone(CAVMAESync(**SMALL).eval(), tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="session")
def real_clips() -> list[Path]:
    return [shared_path("data", "videos", name) for name in REAL_CLIPS]


@pytest.fixture(scope="session")
def real_embeddings(tmp_path_factory, small_model, real_clips) -> Path:
    """`avsync embed` of the two real clips with the tiny model: an npz of 16 x 32 tokens per clip."""
    out = tmp_path_factory.mktemp("embedded") / "clips.npz"
    argv = [*map(str, real_clips), "--ckpt", str(small_model), "--out", str(out), "--device", "cpu"]
    assert embed_main([*argv, "--workers", "0", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def clip_index(tmp_path_factory, real_embeddings) -> Path:
    """An exact index (`avsync index build`) of `real_embeddings`: two clips, 16 x 32 tokens."""
    from avsync.cli import main

    out = tmp_path_factory.mktemp("clip_index") / "index"
    assert (
        main(["index", "build", str(real_embeddings), "--out", str(out), "--kind", "exact", "--quiet"]) == 0
    )
    return out
