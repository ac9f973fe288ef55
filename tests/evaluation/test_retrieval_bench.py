"""The retrieval benchmark script runs and reports what it measured (tiny sizes; timings not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_retrieval.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_retrieval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_cases_report_times_and_memory_in_a_fresh_process(bench):
    tiny = {
        "evaluation": {"num_clips": 40, "steps": 4, "dim": 8, "repeats": 2},
        "gallery": {"num_clips": 300, "steps": 4, "dim": 8, "repeats": 1},
    }
    results = bench.run(["evaluation", "gallery"], threads=1, options=tiny)
    evaluation, gallery = results["evaluation"], results["gallery"]
    assert results["threads"] == 1
    assert (evaluation["clips"], evaluation["steps"], evaluation["dim"]) == (40, 4, 8)
    assert len(evaluation["runs_s"]) == 2 and evaluation["all_strategies_both_directions_s"] > 0
    assert set(evaluation["per_strategy_both_directions"]) == {
        "diagonal_mean",
        "diagonal_max",
        "block_mean",
        "block_max",
    }
    assert gallery["clips"] == 300 and gallery["top_k"] == 10 and gallery["diagonal_mean_topk_s"] > 0
    assert gallery["peak_rss_mib"] > 0


def test_flop_counts_follow_the_strategies(bench):
    assert bench.strategy_flops("diagonal_mean", 10, 16, 8) == 2 * 100 * 16 * 8
    assert bench.strategy_flops("block_mean", 10, 16, 8) == 2 * 100 * 8
    assert bench.strategy_flops("block_max", 10, 16, 8) == 2 * 100 * 16 * 16 * 8
