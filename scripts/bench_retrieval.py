"""Benchmark of the retrieval engine on random unit tokens; prints one JSON line.

Two cases (issue "Evaluation" §1):
- `evaluation`: 1,520 clips x 16 x 768 (VGGSound eval subset size), all four strategies, both directions.
- `gallery`: 100,000 clips, diagonal mean, top-10 for every query, with the peak resident memory. Its
  tokens are 16 x 16 by default (`--gallery-dim`): at 16 x 768 the case is 2.5e14 FLOP, about 12 minutes
  at the ~330 GFLOP/s two cores give, and 4.9 GB of float32 tokens per modality.

Each case runs in a fresh process so that its peak RSS (`resource.getrusage`) is its own. Timings are
medians over `repeats` runs of wall-clock time. `run(...)` is importable for `make bench`.

    .venv/bin/python scripts/bench_retrieval.py --cases evaluation gallery --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from avsync.evaluation.retrieval import evaluate_all, retrieval_metrics
from avsync.evaluation.similarity import STRATEGIES


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


def median_seconds(action: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_evaluation(
    num_clips: int = 1520, steps: int = 16, dim: int = 768, repeats: int = 5, seed: int = 0
) -> dict:
    """Median wall time of `evaluate_all` over all strategies and both directions, and per strategy."""
    audio = random_unit_tokens(num_clips, steps, dim, seed)
    video = random_unit_tokens(num_clips, steps, dim, seed + 1)
    evaluate_all(audio[:64], video[:64])  # warm-up: oneDNN kernels, thread pool
    total, runs = median_seconds(lambda: evaluate_all(audio, video), repeats)
    per_strategy = {}
    for strategy in STRATEGIES:
        seconds, _ = median_seconds(lambda strategy=strategy: evaluate_all(audio, video, [strategy]), repeats)
        flops = strategy_flops(strategy, num_clips, steps, dim)
        per_strategy[strategy] = {
            "seconds": round(seconds, 4),
            "gflop_per_s": round(flops / seconds / 1e9, 1),
        }
    return {
        "clips": num_clips,
        "steps": steps,
        "dim": dim,
        "repeats": repeats,
        "all_strategies_both_directions_s": round(total, 4),
        "runs_s": [round(t, 4) for t in runs],
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
    seconds, runs = median_seconds(lambda: retrieval_metrics(video, audio, top_k=top_k), repeats)
    return {
        "clips": num_clips,
        "steps": steps,
        "dim": dim,
        "top_k": top_k,
        "repeats": repeats,
        "diagonal_mean_topk_s": round(seconds, 3),
        "runs_s": [round(t, 3) for t in runs],
        "gflop_per_s": round(strategy_flops("diagonal_mean", num_clips, steps, dim) / seconds / 1e9, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


CASES: dict[str, Callable[..., dict]] = {"evaluation": time_evaluation, "gallery": time_gallery}


def run(
    cases: Sequence[str] = ("evaluation", "gallery"),
    threads: int = 2,
    options: dict[str, dict] | None = None,
) -> dict:
    """Run each case in a fresh process on `threads` threads; `options[case]` overrides its arguments."""
    options = options or {}
    results: dict = {
        "torch": torch.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    for case in cases:
        command = [sys.executable, __file__, "--one-case", case, "--threads", str(threads)]
        command += ["--case-options", json.dumps(options.get(case, {}))]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode:
            raise RuntimeError(f"benchmark case {case!r} failed:\n{finished.stderr}")
        results[case] = json.loads(finished.stdout.strip().splitlines()[-1])
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="override the number of timed runs of every case")
    parser.add_argument("--gallery-clips", type=int, default=100_000)
    parser.add_argument("--gallery-dim", type=int, default=16)
    parser.add_argument("--one-case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--case-options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_case:  # the child process of `run`
        torch.set_num_threads(args.threads)
        print(json.dumps(CASES[args.one_case](**json.loads(args.case_options))))
        return
    options: dict[str, dict] = {case: {} for case in CASES}
    if args.repeats:
        for case in options:
            options[case]["repeats"] = args.repeats
    options["gallery"].update(num_clips=args.gallery_clips, dim=args.gallery_dim)
    print(json.dumps(run(args.cases, args.threads, options)))


if __name__ == "__main__":
    main()
