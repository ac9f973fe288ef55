"""Fixtures shared by the whole suite: where `../shared` is, and small deterministic settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under `../shared`, or skip the test (with the reason) when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared reference material sits beside the repository)")
    return path


@pytest.fixture
def shared() -> callable:
    return shared_path


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
