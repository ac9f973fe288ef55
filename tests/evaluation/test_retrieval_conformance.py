"""Conformance: the authors' retrieval script's similarity matrices and metrics on fixed tokens."""

from __future__ import annotations

import pytest
import torch

from avsync.evaluation.retrieval import DIRECTIONS, evaluate_all, queries_and_targets, retrieval_metrics
from avsync.evaluation.similarity import similarity
from tests.conftest import shared_path

# The authors' script names block mean and block max `mean` and `max`.
AUTHORS_NAMES = {
    "diagonal_mean": "diagonal_mean",
    "diagonal_max": "diagonal_max",
    "mean": "block_mean",
    "max": "block_max",
}
CASES = [(authors, ours, direction) for authors, ours in AUTHORS_NAMES.items() for direction in DIRECTIONS]


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(shared_path("reference", "retrieval_strategies.pt"), weights_only=True)


@pytest.fixture(scope="module")
def all_results(reference):
    return evaluate_all(reference["audio"], reference["video"])


@pytest.mark.parametrize(("authors", "strategy", "direction"), CASES)
def test_similarity_matrix_matches_authors(reference, authors, strategy, direction):
    queries, targets = queries_and_targets(reference["audio"], reference["video"], direction)
    expected = reference[f"{authors}/{direction}/sim"]
    ours = similarity(queries, targets, strategy)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("authors", "strategy", "direction"), CASES)
def test_metrics_match_authors_exactly(reference, all_results, authors, strategy, direction):
    expected = reference[f"{authors}/{direction}/metrics"]
    queries, targets = queries_and_targets(reference["audio"], reference["video"], direction)
    streamed = retrieval_metrics(queries, targets, strategy, chunk_size=5).metrics
    shared = all_results[direction][strategy].metrics
    for name, value in expected.items():
        assert streamed[name] == value, (name, streamed[name], value)
        assert shared[name] == value, (name, shared[name], value)


def test_fixture_tells_the_strategies_apart(reference):
    """Guards the test itself: each strategy's reference metrics differ, so a swap cannot pass."""
    metrics = {name: tuple(reference[f"{name}/video_to_audio/metrics"].values()) for name in AUTHORS_NAMES}
    assert len(set(metrics.values())) == len(metrics)
