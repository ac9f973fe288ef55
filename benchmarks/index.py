"""Benchmark 3d: `avsync index` on a synthetic gallery of a million clustered clips (16 x 768 tokens).

Measured side by side in one run, in this order:

1. exact (`IndexFlatIP`) on the first `exact_clips` clips, per gallery modality: build time, file size,
   peak memory, single-query latency; then projected linearly to `num_clips` (a flat index scans and
   stores every vector);
2. compressed (`avsync.search.compressed`) on all `num_clips`: build time, file size, peak memory of the
   build and of a loaded index, single-query latency per query modality (an audio query searches the
   video tokens, a video query the audio tokens), and recall@10 against exact search for several
   candidate counts, with and without the exact re-ranking of the best `rerank`.

The gallery is `avsync.synth.embeddings.ClusteredGallery` (its parameters are in the result). It never
exists whole: each chunk is generated, added to the index, and scored against the queries by exact brute
force (the ground truth) in the same pass. The queries are the audio and video tokens of `queries` clips
of the gallery (the middle chunk): their own partners are in the gallery, as in retrieval.

recall@10 = |approximate top 10 ∩ exact top 10| / 10, averaged over queries (also reported: the share of
queries whose exact best match is in the approximate top 10). With the exact re-ranking the final order
is exact, so its recall@10 is the share of the exact top 10 among the `rerank` candidates it re-scores;
the re-ranking reads those candidates' float16 tokens from the embeddings on disk, timed here on a
float16 copy of the exact part's gallery.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from avsync.search.compressed import CompressedSettings
from avsync.search.index import DIRECTION, TARGET, SearchIndex, build_index
from avsync.search.vectors import diagonal_mean_vectors
from avsync.synth.embeddings import MODALITIES, ClusteredGallery
from benchmarks.harness import peak_rss_mib


def current_rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count of this process (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mib() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), else of the whole process."""
    return _status_kib("VmHWM") / 1024 or peak_rss_mib()


def loaded_index_mib(path: Path) -> float:
    """Resident memory that reading the FAISS file `path` adds to a fresh process (the index in RAM)."""
    script = (
        "import sys, faiss\n"
        "from benchmarks.index import current_rss_mib\n"
        "before = current_rss_mib()\n"
        "index = faiss.read_index(sys.argv[1])\n"
        "print(current_rss_mib() - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    return round(float(done.stdout.split()[-1]), 1)


def _status_kib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


class GroundTruth:
    """Exact top-k of fixed queries over a gallery streamed chunk by chunk (`build_index`'s `on_chunk`)."""

    def __init__(self, queries: dict[str, np.ndarray], k: int = 10):
        self.queries = {
            m: torch.from_numpy(diagonal_mean_vectors(q, f"{m} queries")) for m, q in queries.items()
        }
        self.k = k
        self.scores = {m: torch.full((len(q), k), -np.inf) for m, q in self.queries.items()}
        self.rows = {m: torch.zeros((len(q), k), dtype=torch.long) for m, q in self.queries.items()}
        self.seconds = 0.0

    def __call__(self, first: int, vectors: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        for modality, queries in self.queries.items():
            gallery = vectors.get(TARGET[modality])
            if gallery is None:
                continue
            scores = queries @ torch.from_numpy(gallery).T
            rows = torch.arange(first, first + len(gallery)).expand(len(queries), -1)
            scores = torch.cat([self.scores[modality], scores], dim=1)
            best, where = scores.topk(self.k, dim=1)
            self.rows[modality] = torch.cat([self.rows[modality], rows], dim=1).gather(1, where)
            self.scores[modality] = best
        self.seconds += time.perf_counter() - started

    def recall(self, modality: str, found: list[np.ndarray], k: int = 10) -> dict:
        truth = self.rows[modality][:, :k].numpy()
        overlap = [
            len(set(hit.tolist()) & set(row.tolist())) / k for hit, row in zip(found, truth, strict=True)
        ]
        best = [row[0] in set(hit[:k].tolist()) for hit, row in zip(found, truth, strict=True)]
        return {
            "recall_at_10": round(float(np.mean(overlap)), 4),
            "top1_in_10": round(float(np.mean(best)), 4),
        }


class TimedSource:
    """A gallery whose generation time is counted apart (the build's own time is the rest)."""

    def __init__(self, gallery: ClusteredGallery):
        self.gallery, self.seconds = gallery, 0.0

    def __getattr__(self, name: str):
        return getattr(self.gallery, name)

    def chunks(self, size: int = 0, modalities=None):
        chunks = self.gallery.chunks(size, modalities)
        while True:
            started = time.perf_counter()
            item = next(chunks, None)
            self.seconds += time.perf_counter() - started
            if item is None:
                return
            yield item

    def tokens(self, modality: str, rows) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.gallery.tokens(modality, rows)
        finally:
            self.seconds += time.perf_counter() - started


def _latencies_ms(index: SearchIndex, queries: np.ndarray, modality: str, **options) -> list[float]:
    times = []
    index.search(queries[0], modality, 10, **options)  # warm-up: first touch of the index pages
    for query in queries:
        started = time.perf_counter()
        index.search(query, modality, 10, **options)
        times.append(1e3 * (time.perf_counter() - started))
    return times


def _summary(times: list[float]) -> dict:
    return {
        "median_ms": round(statistics.median(times), 2),
        "p90_ms": round(float(np.percentile(times, 90)), 2),
        "queries": len(times),
    }


def index_benchmark(
    num_clips: int = 1_000_000,
    exact_clips: int = 20_000,
    queries: int = 100,
    latency_queries: int = 50,
    exact_latency_queries: int = 10,
    candidates: list[int] = (500, 1000, 2000, 4000),
    rerank: int = 100,
    pca_dim: int = 1024,
    base_dim: int = 512,
    train_clips: int = 8192,
    chunk_size: int = 10_000,
    seed: int = 0,
) -> dict:
    """Exact and compressed indexes on one synthetic gallery (see the module docstring)."""
    started = time.perf_counter()
    gallery = ClusteredGallery(num_clips=num_clips, chunk_size=chunk_size, seed=seed)
    middle = gallery.num_chunks // 2
    query_chunk = gallery.chunk(middle)
    query_rows = np.arange(min(queries, len(gallery.chunk_rows(middle))))
    query_tokens = {m: query_chunk[m][query_rows] for m in MODALITIES}
    del query_chunk
    import faiss

    result: dict = {
        "faiss": faiss.__version__,
        "clips": num_clips,
        "steps": gallery.steps,
        "dim": gallery.dim,
        "generator": gallery.parameters(),
        "queries": len(query_rows),
        "query_clips": (gallery.chunk_rows(middle).start + query_rows).tolist()[:5],
    }
    with tempfile.TemporaryDirectory(prefix="avsync-index-bench-") as scratch:
        scratch = Path(scratch)
        result["exact"] = _exact_part(
            replace(gallery, num_clips=exact_clips), scratch, query_tokens, exact_latency_queries, num_clips
        )
        settings = CompressedSettings(pca_dim=pca_dim, base_dim=base_dim, train_clips=train_clips, seed=seed)
        candidates = sorted({*candidates, settings.candidates})  # the default is always measured
        result["compressed"] = _compressed_part(
            gallery, scratch, query_tokens, settings, list(candidates), rerank, latency_queries
        )
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _exact_part(gallery: ClusteredGallery, scratch: Path, queries: dict, latency_queries: int, full: int):
    """Build, size and time an exact index; write the gallery as float16 for the re-ranking's timing."""
    reset_peak_rss()
    before = current_rss_mib()
    source = TimedSource(gallery)
    out = build_index(source, scratch / "exact", kind="exact", chunk_clips=gallery.chunk_size)
    build_peak = window_peak_rss_mib()
    index = SearchIndex(out)
    part: dict = {
        "clips": gallery.num_clips,
        "build_with_generation_s": index.facts["build"]["total_s"],
        "generation_s": round(source.seconds, 1),
        "build_s": round(index.facts["build"]["total_s"] - source.seconds, 2),
        "bytes": index.facts["bytes"],
        "build_peak_rss_mib": round(build_peak, 1),
        "rss_before_build_mib": round(before, 1),
        "latency": {},
    }
    for modality in MODALITIES:
        times = _latencies_ms(index, queries[modality][:latency_queries], modality)
        part["latency"][DIRECTION[modality]] = _summary(times)
    part["loaded_rss_mib"] = {m: loaded_index_mib(out / name) for m, name in index.facts["files"].items()}
    del index
    scale = full / gallery.num_clips
    part["projected"] = {
        "clips": full,
        "bytes_per_modality": int(max(part["bytes"].values()) * scale),
        "build_s": round(part["build_s"] * scale, 1),
        "latency_ms": {d: round(v["median_ms"] * scale, 1) for d, v in part["latency"].items()},
    }
    return part


def _compressed_part(
    gallery: ClusteredGallery,
    scratch: Path,
    queries: dict,
    settings: CompressedSettings,
    candidates: list[int],
    rerank: int,
    latency_queries: int,
) -> dict:
    truth = GroundTruth(queries)
    source = TimedSource(gallery)
    reset_peak_rss()
    out = build_index(
        source, scratch / "compressed", kind="compressed", settings=settings, chunk_clips=gallery.chunk_size,
        on_chunk=truth,
    )  # fmt: skip
    build_peak = window_peak_rss_mib()
    facts = SearchIndex(out).facts
    build = dict(facts["build"])  # train_s, add_s and total_s include generating the gallery
    build["generation_s"] = round(source.seconds, 1)
    build["ground_truth_s"] = round(truth.seconds, 1)  # scored while the chunks were added
    build["index_s"] = round(build["total_s"] - source.seconds - truth.seconds, 1)  # the build's own work
    part: dict = {
        "clips": gallery.num_clips,
        "settings": settings.as_dict(),
        "build": build,
        "bytes": facts["bytes"],
        "build_peak_rss_mib": round(build_peak, 1),
        "directions": {},
    }
    rerank_timing = _rerank_timing(scratch / "exact", queries, rerank)
    for modality in MODALITIES:
        direction = DIRECTION[modality]
        loaded = time.perf_counter()
        index = SearchIndex(out)
        index.faiss_index(TARGET[modality])
        entry: dict = {
            "gallery_modality": TARGET[modality],
            "load_s": round(time.perf_counter() - loaded, 2),
            "loaded_rss_mib": loaded_index_mib(out / facts["files"][TARGET[modality]]),
            "by_candidates": {},
        }
        for count in candidates:
            hits = index.search(queries[modality], modality, 10, candidates=count)
            rows = [hit.rows for hit in hits]
            deep = index.search(queries[modality], modality, rerank, candidates=max(count, rerank))
            times = _latencies_ms(index, queries[modality][:latency_queries], modality, candidates=count)
            entry["by_candidates"][str(count)] = {
                **truth.recall(modality, rows),
                "with_exact_rerank": truth.recall(modality, [hit.rows for hit in deep]),
                "latency": _summary(times),
            }
        entry["exact_rerank_ms"] = rerank_timing[modality]
        part["directions"][direction] = entry
        del index
    return part


def _rerank_timing(exact_dir: Path, queries: dict, rerank: int) -> dict:
    """Milliseconds to read `rerank` random rows of float16 tokens from a memory-mapped file and score
    them exactly: the re-ranking stage, on a float16 copy of the exact index's gallery (page-cached)."""
    index = SearchIndex(exact_dir)
    timing = {}
    rng = np.random.default_rng(0)
    for modality in MODALITIES:
        target = TARGET[modality]
        flat = index.faiss_index(target)
        path = exact_dir / f"{target}.f16.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(index.num_clips, flat.d))
        for first in range(0, index.num_clips, 8192):
            rows = np.arange(first, min(first + 8192, index.num_clips))
            array[rows] = flat.reconstruct_batch(rows)
        array.flush()
        del array
        stored = np.load(path, mmap_mode="r")
        query_vectors = diagonal_mean_vectors(queries[modality], "queries")
        times = []
        for query in query_vectors[:50]:
            rows = np.sort(rng.choice(index.num_clips, rerank, replace=False))
            started = time.perf_counter()
            tokens = np.asarray(stored[rows], dtype=np.float32).reshape(rerank, index.steps, index.dim)
            scores = diagonal_mean_vectors(tokens) @ query
            np.argsort(-scores)
            times.append(1e3 * (time.perf_counter() - started))
        timing[modality] = {
            "candidates": rerank,
            **_summary(times),
            "file_gib": round(path.stat().st_size / 2**30, 2),
        }
        del stored
    return timing
