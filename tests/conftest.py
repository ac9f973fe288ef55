"""Fixtures shared by the whole suite: where `../shared` is, and small deterministic settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


#: A backbone small enough for CPU tests that reads decoded videos as they come: 48-px frames (a 3x3
#: patch grid) and 64-frame windows of the real 128-bin spectrogram.
VIDEO_TEST_BACKBONE = dict(
    image_size=48, audio_length=64, embed_dim=32, num_heads=2, encoder_depth=1,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip


def shared_path(*parts: str) -> Path:
    """A file under `../shared`, or skip the test (with the reason) when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared reference material sits beside the repository)")
    return path


@pytest.fixture
def shared() -> callable:
    return shared_path


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_in_tmp(tmp_path_factory):
    """Kernel choices measured by the tests (and the commands they start) go to a temporary cache,
    never to the user's `~/.cache/avsync`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVSYNC_CACHE_DIR", str(tmp_path_factory.mktemp("kernel_cache")))
        yield


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: faster on tiny tensors, and no stalls when other jobs load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A miniature `avsync demo` (synthesize, prepare, `avsync fit` with the tiny config, every task):
    its work folder holds the shards, the checkpoint and results.json, like the real demo's."""
    from avsync.demo import run_demo

    workdir = tmp_path_factory.mktemp("demo")
    fit_args = [
        "--data.init_args.epoch_length=64",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--trainer.check_val_every_n_epoch=1",
        "--model.init_args.log_images_every_n_steps=4",
    ]
    return run_demo(
        workdir, clips=15, classes=4, epochs=2, probe_epochs=2, workers=1, fit_args=fit_args, mae_epochs=1
    )
