"""The benchmarks `make bench` runs: what each measures, with which settings (full and `--quick`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Benchmark:
    """`function` (a `module:name` path, imported in the benchmark's own process) with its full and
    quick keyword arguments, and environment variables for that process."""

    function: str
    full: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    gpu_only: bool = False
    description: str = ""

    def resolve(self) -> Callable[..., dict]:
        import importlib

        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


SUITE: dict[str, Benchmark] = {
    "pretrain": Benchmark(
        "benchmarks.pretrain:pretrain_step",
        full={"steps": 5},
        quick={"steps": 2},
        description="ViT-B pretraining step, batch 8, fp32 and bf16 autocast, CPU",
    ),
    "pretrain_gpu": Benchmark(
        "benchmarks.pretrain:pretrain_step",
        full={"steps": 20, "warmup": 3, "device": "cuda", "profile": False},
        quick={"steps": 5, "warmup": 2, "device": "cuda", "profile": False},
        gpu_only=True,
        description="ViT-B pretraining step, batch 8, fp32 and bf16 autocast, GPU",
    ),
    "pretrain_ablation": Benchmark(
        "benchmarks.pretrain:pretrain_ablation",
        full={"steps": 4, "compile": ["fp32", "bf16"]},
        quick={"steps": 2, "precisions": ["bf16"]},
        description="each CPU optimization of the training step, interleaved with the step before it",
    ),
    "inference": Benchmark(
        "benchmarks.inference:feature_extraction",
        full={"clips": 2, "repeats": 3},
        quick={"clips": 1, "repeats": 1, "compare_library": False},
        description="feature extraction (encode), bf16, 16 pairs per clip",
    ),
    "retrieval": Benchmark(
        "benchmarks.retrieval:time_evaluation",
        full={"repeats": 5},
        quick={"repeats": 2},
        description="1,520 clips x 16 x 768, all four strategies, both directions",
    ),
    "gallery": Benchmark(
        "benchmarks.retrieval:time_gallery",
        full={"repeats": 1},
        quick={"num_clips": 20_000},
        description="100,000-clip gallery, diagonal mean, top-10, 16 x 16 tokens",
    ),
    "gallery_768": Benchmark(
        "benchmarks.retrieval:time_gallery_projection",
        full={"subset_clips": 8000},
        quick={"subset_clips": 2000},
        description="the gallery at 16 x 768 tokens: measured on a subset, projected to 100,000 clips",
    ),
    "index": Benchmark(
        "benchmarks.index:index_benchmark",
        full={"num_clips": 1_000_000, "exact_clips": 20_000, "queries": 100},
        quick={"num_clips": 30_000, "exact_clips": 10_000, "queries": 50},
        description="`avsync index`: exact and compressed, 1,000,000 clustered synthetic clips x 16 x 768",
    ),
    "probe": Benchmark(
        "benchmarks.probe:probing_epochs",
        full={"clips": 8, "cached_epochs": 5},
        quick={"clips": 4, "batch_size": 2, "cached_epochs": 3},
        description="a probing epoch (ViT-B, bf16) with and without the feature cache",
    ),
    "prepare": Benchmark(
        "benchmarks.data:prepare_throughput",
        full={"repeats": 3, "end_to_end": True, "seconds": 8.0, "dask": True},
        quick={"repeats": 1, "end_to_end": True, "seconds": 1.0},
        description="`prepare`, one worker on one core, per real clip and whole runs; AudioSet-2M projected",
    ),
    "prepare_resolutions": Benchmark(
        "benchmarks.prepare_resolutions:prepare_resolutions",
        full={"rounds": 3, "clips": {"144p": 16, "360p": 6, "720p": 2}},
        quick={"rounds": 1, "clips": {"144p": 4, "360p": 2, "720p": 1}},
        description="`prepare` clips/s per core at 144p, 360p, 720p: before issue 22 and now, same run",
    ),
    "loader": Benchmark(
        "benchmarks.data:loader_throughput",
        full={"train_samples": 512, "eval_clips": 64, "repeats": 3},
        quick={"train_samples": 128, "eval_clips": 16, "repeats": 1},
        description="shard loader, one worker on one core, augmentation off, 224 px",
    ),
    "loader_thp": Benchmark(
        "benchmarks.data:loader_throughput",
        full={"train_samples": 512, "eval_clips": 64, "repeats": 3, "dataloader_worker": False},
        quick={"train_samples": 128, "eval_clips": 16, "repeats": 1, "dataloader_worker": False},
        env={"THP_MEM_ALLOC_ENABLE": "1"},
        description="the loader with PyTorch's huge-page allocation (THP_MEM_ALLOC_ENABLE=1)",
    ),
    "paper_recipe": Benchmark(
        "benchmarks.paper_recipe:dry_run",
        full={"clips": 4, "batch_size": 2, "steps": 2},
        quick={"clips": 2, "batch_size": 2, "steps": 1},
        description="audioset2m_vitb.yaml as shipped: MAE init, 2 steps at batch 2 on shards, checkpoint",
    ),
    "app": Benchmark(
        "benchmarks.app:app_latency",
        full={"repeats": 5},
        quick={"repeats": 2},
        description="`avsync app`: a 10-s clip's maps and segments after upload, a map switch (tiny model)",
    ),
    "tar_reader": Benchmark(
        "benchmarks.hand_rolled:tar_reader",
        full={"train_samples": 512, "eval_clips": 64, "repeats": 5},
        quick={"train_samples": 64, "eval_clips": 8, "repeats": 1},
        description="issue 22: avsync's tar reader against webdataset's expander, alone and in the loader",
    ),
    "pca_fit": Benchmark(
        "benchmarks.hand_rolled:pca_fit",
        full={
            "train_clips": [1024, 2048],
            "gallery_clips": 20_000,
            "queries": 50,
            "repeats": 1,
            "pca_dim": 1024,
        },
        quick={"train_clips": [512], "gallery_clips": 2000, "queries": 10, "pca_dim": 128},
        description="issue 22: avsync's PCA against faiss.PCAMatrix, alone and in a compressed index build",
    ),
    "gallery_reads": Benchmark(
        "benchmarks.hand_rolled:gallery_reads",
        full={"clips": 10_000, "reads": 10, "repeats": 5},
        quick={"clips": 1000, "reads": 3, "repeats": 1},
        description="issue 22: npz members memory-mapped in place against .npy mmap_mode and np.load",
    ),
    "progress_lines": Benchmark(
        "benchmarks.hand_rolled:progress_lines",
        full={"steps": 2000, "repeats": 3, "interval": 1.0},
        quick={"steps": 100, "repeats": 1, "interval": 0.05},
        description="issue 22: LogLineProgress against Lightning's tqdm and rich bars, written to a file",
    ),
    "cli_help": Benchmark(
        "benchmarks.cli_help:help_times",
        full={"rounds": 7},
        quick={"rounds": 2},
        description="issue 22: `avsync --help` and each tool's, before the redesign and now, same run",
    ),
}


@dataclass(frozen=True)
class Target:
    """A number from issue 6 and how to read the measured value out of the results."""

    name: str
    goal: str
    measured: Callable[[dict], float | None]
    met: Callable[[float], bool]
    unit: str = ""


def _get(results: dict, *path, default=None):
    value = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


FOUR_GB_IN_GIB = 4 * 1000**3 / 2**30


def _full_gallery(results: dict, name: str, scale: float = 1.0) -> float | None:
    """A value of the gallery benchmark, only when it ran at the target's 100,000 clips."""
    if _get(results, "gallery", "clips") != 100_000:
        return None
    return _get(results, "gallery", name) * scale


def _index(results: dict, *path) -> float | None:
    """A value of the index benchmark, only when it ran at the target's 1,000,000 clips."""
    if _get(results, "index", "clips") != 1_000_000:
        return None
    return _get(results, "index", *path)


def _index_bytes_gib(results: dict) -> float | None:
    sizes = _index(results, "compressed", "bytes")
    return None if sizes is None else sum(sizes.values()) / 2**30


def _index_default(results: dict, name: str, *path) -> float | None:
    """The worse direction's `path` at the compressed index's default candidate count."""
    directions = _index(results, "compressed", "directions")
    candidates = _index(results, "compressed", "settings", "candidates")
    if not directions:
        return None
    values = [_get(d, "by_candidates", str(candidates), *path) for d in directions.values()]
    if None in values:
        return None
    return max(values) if name == "max" else min(values)


TARGETS: list[Target] = [
    Target(
        "ViT-B step, fp32, CPU", ">= 1.6 samples/s",
        lambda r: _get(r, "pretrain", "precisions", "fp32", "samples_per_s"), lambda v: v >= 1.6, "samples/s",
    ),
    Target(
        "ViT-B step, bf16 autocast, CPU", ">= 6 samples/s",
        lambda r: _get(r, "pretrain", "precisions", "bf16", "samples_per_s"), lambda v: v >= 6.0, "samples/s",
    ),
    Target(
        "model FLOPs per sample, counted as the reference design", "126.7 GFLOP (no skipped work)",
        lambda r: _get(r, "pretrain", "flop_counter_sdpa_gflop_per_sample"),
        lambda v: abs(v - 126.7) < 0.1, "GFLOP",
    ),
    Target(
        "probing epoch, cached vs backbone", ">= 20x faster",
        lambda r: _get(r, "probe", "speedup"), lambda v: v >= 20, "x",
    ),
    Target(
        "loader, training samples/s per worker", ">= 560",
        lambda r: _get(r, "loader", "in_process", "train_samples_per_s"), lambda v: v >= 560, "samples/s",
    ),
    Target(
        "loader, eval clips/s per worker", ">= 66",
        lambda r: _get(r, "loader", "in_process", "eval_clips_per_s"), lambda v: v >= 66, "clips/s",
    ),
    Target(
        "retrieval 1,520 x 16 x 768, 4 strategies x 2 directions", "< 1 s",
        lambda r: _get(r, "retrieval", "all_strategies_both_directions_s"), lambda v: v < 1.0, "s",
    ),
    Target(
        "100,000-clip gallery, 16 x 16 tokens", "< 60 s",
        lambda r: _full_gallery(r, "diagonal_mean_topk_s"), lambda v: v < 60, "s",
    ),
    Target(
        "100,000-clip gallery, 16 x 16 tokens, memory", "< 4 GB",
        lambda r: _full_gallery(r, "peak_rss_mib", 1 / 1024), lambda v: v < FOUR_GB_IN_GIB, "GiB",
    ),
    Target(
        "100,000-clip gallery, 16 x 768 tokens (projected)", "< 60 s",
        lambda r: _get(r, "gallery_768", "projected_s"), lambda v: v < 60, "s",
    ),
    Target(
        "100,000-clip gallery, 16 x 768 tokens, float32 tokens alone", "< 4 GB",
        lambda r: _get(r, "gallery_768", "projected_float32_tokens_gib"), lambda v: v < FOUR_GB_IN_GIB, "GiB",
    ),
    Target(
        "index of 1,000,000 clips x 16 x 768, compressed, both modalities (issue 15)", "< 4 GiB",
        _index_bytes_gib, lambda v: v < 4, "GiB",
    ),
    Target(
        "index query, 1,000,000 clips, compressed, median, worse direction (issue 15)", "< 50 ms",
        lambda r: _index_default(r, "max", "latency", "median_ms"), lambda v: v < 50, "ms",
    ),
    Target(
        "index recall@10 vs exact, 1,000,000 clips, compressed, worse direction (issue 15)", ">= 0.95",
        lambda r: _index_default(r, "min", "recall_at_10"), lambda v: v >= 0.95,
    ),
    Target(
        "the same with the exact re-ranking of the best 100 (issue 15)", ">= 0.95",
        lambda r: _index_default(r, "min", "with_exact_rerank", "recall_at_10"), lambda v: v >= 0.95,
    ),
]  # fmt: skip
