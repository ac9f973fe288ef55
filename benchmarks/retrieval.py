"""Benchmark 3a: the retrieval engine on random unit tokens (moved here from `scripts/bench_retrieval.py`).

- `evaluation`: 1,520 clips x 16 x 768 (the VGGSound evaluation subset), all four strategies, both
  directions (`evaluate_all`), in total and per strategy.
- `gallery`: 100,000 clips, diagonal mean, top-10 for every query, with peak memory. At 16 x 768 tokens
  that is 2.5e14 FLOP and 4.9 GB of float32 tokens per modality, out of reach of a 60-s / 4-GB budget on
  a 2-core CPU; the benchmark runs it at 16 x 16 tokens, and at 16 x 768 on `subset_clips` clips, from
  which it projects the full size (time grows with the square of the clip count).
"""

from __future__ import annotations

import torch

from avsync.evaluation.retrieval import evaluate_all, retrieval_metrics
from avsync.evaluation.similarity import STRATEGIES
from benchmarks.harness import peak_rss_mib, time_runs


def random_unit_tokens(num_clips: int, steps: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_clips, steps, dim, generator=generator)
    return tokens / tokens.norm(dim=-1, keepdim=True)


def strategy_flops(strategy: str, num_clips: int, steps: int, dim: int) -> float:
    """2 x the multiply-adds of one similarity matrix (both directions share it)."""
    depth = {
        "diagonal_mean": steps * dim,  # one dot product of T * D
        "diagonal_max": steps * dim,  # T dot products of D
        "block_mean": dim,  # one dot product of the means
        "block_max": steps * steps * dim,  # T^2 dot products of D
    }[strategy]
    return 2.0 * num_clips * num_clips * depth


def time_evaluation(
    num_clips: int = 1520, steps: int = 16, dim: int = 768, repeats: int = 5, seed: int = 0
) -> dict:
    """Median wall time of `evaluate_all` over all strategies and both directions, and per strategy."""
    audio = random_unit_tokens(num_clips, steps, dim, seed)
    video = random_unit_tokens(num_clips, steps, dim, seed + 1)
    evaluate_all(audio[:64], video[:64])  # warm-up: oneDNN kernels, thread pool
    total = time_runs(lambda: evaluate_all(audio, video), repeats, warmup=0)
    per_strategy = {}
    for strategy in STRATEGIES:
        timing = time_runs(
            lambda strategy=strategy: evaluate_all(audio, video, [strategy]), repeats, warmup=0
        )
        flops = strategy_flops(strategy, num_clips, steps, dim)
        per_strategy[strategy] = {
            "seconds": round(timing.median, 4),
            "gflop": round(flops / 1e9, 1),
            "gflop_per_s": round(flops / timing.median / 1e9, 1),
        }
    return {
        "clips": num_clips,
        "steps": steps,
        "dim": dim,
        "repeats": repeats,
        "all_strategies_both_directions_s": round(total.median, 4),
        "runs_s": [round(t, 4) for t in total.runs],
        "total_gflop": round(sum(strategy_flops(s, num_clips, steps, dim) for s in STRATEGIES) / 1e9, 1),
        "per_strategy_both_directions": per_strategy,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def time_gallery(
    num_clips: int = 100_000, steps: int = 16, dim: int = 16, top_k: int = 10, repeats: int = 1, seed: int = 0
) -> dict:
    """Wall time and peak RSS of video-to-audio diagonal-mean retrieval with every query's top-k."""
    audio = random_unit_tokens(num_clips, steps, dim, seed)
    video = random_unit_tokens(num_clips, steps, dim, seed + 1)
    retrieval_metrics(video[:256], audio[:256], top_k=top_k)  # warm-up
    timing = time_runs(lambda: retrieval_metrics(video, audio, top_k=top_k), repeats, warmup=0)
    flops = strategy_flops("diagonal_mean", num_clips, steps, dim)
    return {
        "clips": num_clips,
        "steps": steps,
        "dim": dim,
        "top_k": top_k,
        "repeats": repeats,
        "diagonal_mean_topk_s": round(timing.median, 3),
        "runs_s": [round(t, 3) for t in timing.runs],
        "gflop": round(flops / 1e9, 1),
        "gflop_per_s": round(flops / timing.median / 1e9, 1),
        "float32_tokens_mib": round(2 * num_clips * steps * dim * 4 / 2**20, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def time_gallery_projection(
    full_clips: int = 100_000,
    subset_clips: int = 8000,
    steps: int = 16,
    dim: int = 768,
    top_k: int = 10,
    seed: int = 0,
) -> dict:
    """The 16 x 768 gallery measured on `subset_clips` clips and projected to `full_clips`: time by the
    square of the clip count (every query against every target), token memory linearly."""
    measured = time_gallery(subset_clips, steps, dim, top_k, repeats=1, seed=seed)
    scale = (full_clips / subset_clips) ** 2
    return {
        "measured": measured,
        "projected_clips": full_clips,
        "projected_s": round(measured["diagonal_mean_topk_s"] * scale, 1),
        "projected_gflop": round(strategy_flops("diagonal_mean", full_clips, steps, dim) / 1e9, 1),
        "projected_float32_tokens_gib": round(2 * full_clips * steps * dim * 4 / 2**30, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
