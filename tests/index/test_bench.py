"""The index benchmark (`benchmarks.index`) at a tiny size: its ground truth is brute force, and its
report sections render from its result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avsync.search.vectors import diagonal_mean_vectors
from avsync.synth.embeddings import ClusteredGallery
from benchmarks import retrieval
from benchmarks.index import GroundTruth, index_benchmark
from benchmarks.report import render

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_streamed_ground_truth_is_the_brute_force_top_10():
    gallery = ClusteredGallery(num_clips=900, dim=32, clusters=6, chunk_size=200)
    queries = gallery.clips(np.arange(250, 262), "audio")
    truth = GroundTruth({"audio": queries})
    videos = []
    for first, chunk in gallery.chunks(200, ("video",)):
        vectors = diagonal_mean_vectors(chunk["video"])
        truth(first, {"video": vectors})
        videos.append(vectors)
    scores = diagonal_mean_vectors(queries) @ np.concatenate(videos).T
    best = np.argsort(-scores, axis=1)[:, :10]
    np.testing.assert_array_equal(truth.rows["audio"].numpy(), best)
    assert truth.recall("audio", list(best)) == {"recall_at_10": 1.0, "top1_in_10": 1.0}
    half = [np.concatenate([row[:5], [899 - i for i in range(5)]]) for row in best]
    assert truth.recall("audio", half)["recall_at_10"] == pytest.approx(0.5, abs=0.05)


def test_a_tiny_run_fills_every_figure_the_report_shows():
    torch.manual_seed(0)
    result = index_benchmark(
        num_clips=2000, exact_clips=1000, chunk_size=1000, queries=12, latency_queries=3,
        exact_latency_queries=2, candidates=[100, 400], rerank=20, pca_dim=64, base_dim=32, train_clips=1000,
    )  # fmt: skip
    compressed = result["compressed"]
    assert compressed["bytes"]["video"] < result["exact"]["bytes"]["video"] * 3 / 10
    for direction in ("audio_to_video", "video_to_audio"):
        entry = compressed["directions"][direction]["by_candidates"]
        assert 0.3 < entry["100"]["recall_at_10"] <= entry["400"]["with_exact_rerank"]["recall_at_10"] <= 1
    assert result["exact"]["projected"]["bytes_per_modality"] == pytest.approx(
        2 * result["exact"]["bytes"]["audio"], rel=1e-6
    )
    gallery_768 = retrieval.time_gallery_projection(full_clips=1000, subset_clips=100, steps=4, dim=8)
    report = {"machine": {"memory_gib": 23.5}, "results": {"index": result, "gallery_768": gallery_768}}
    text = render(report)
    assert "## 3d. Search over a million clips" in text and "## 3e. Where exact evaluation ends" in text
    limit = int(round(23.5 * 2**30 / (2 * 4 * 8 * 4), -3))  # float32 audio and video tokens filling 23.5 GiB
    assert f"ends at about **{limit:,} clips**" in text
    row = next(line for line in text.splitlines() if line.startswith("| index query, 1,000,000 clips"))
    assert "not measured" in row  # a 2,000-clip run judges no target
    assert json.dumps(result)
