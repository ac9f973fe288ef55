"""Smoke tests of issue 22's comparisons with the library (`benchmarks/hand_rolled.py`): each runs at a
tiny size, checks that both variants give the same results, and renders. No timed assertions."""

from __future__ import annotations

import pytest

from benchmarks import hand_rolled
from benchmarks.harness import machine, versions
from benchmarks.report import render

pytestmark = pytest.mark.usefixtures("one_thread")


def report(results: dict) -> str:
    return render({"command": "test", "generated": "now", "threads": 1, "machine": machine(),
                   "versions": versions(), "results": results})  # fmt: skip


def test_each_hand_rolled_part_is_measured_against_the_library_and_rendered():
    tar = hand_rolled.tar_reader(train_samples=6, eval_clips=2, repeats=1, source="synthetic")
    assert tar["same_samples"] and tar["members"] >= 6 * 18  # 16 frames, fbank, json per clip
    assert set(tar["train_samples_per_s"]) == {"avsync", "webdataset"}
    pca = hand_rolled.pca_fit(train_clips=(300,), gallery_clips=1200, queries=5, pca_dim=32)
    fit = pca["fits"]["300"]
    assert fit["subspace_overlap"] > 0.99  # both find the same top directions (both uncentred)
    assert fit["held_out_energy"]["avsync"] == pytest.approx(fit["held_out_energy"]["faiss"], abs=1e-3)
    assert 0 < pca["index"]["avsync"]["recall_at_10"] <= 1
    gallery = hand_rolled.gallery_reads(clips=200, steps=4, dim=8, rerank=10, reads=2, repeats=1)
    assert gallery["same_values"] and len(gallery["open_and_rerank_ms"]) == 3
    progress = hand_rolled.progress_lines(steps=30, repeats=1, interval=1e-9)
    log = progress["log"]
    assert log["none"]["bytes"] == 0 and log["avsync LogLineProgress"]["carriage_returns"] == 0
    assert log["avsync LogLineProgress"]["lines"] == 30 + 2  # a line a step here, the first and the last
    assert log["Lightning TQDMProgressBar"]["carriage_returns"] > 30  # a redraw a step
    text = report({"tar_reader": tar, "pca_fit": pca, "gallery_reads": gallery, "progress_lines": progress})
    assert "## 3f. Hand-rolled parts against the library (issue 22 item 7)" in text
    for heading in ("### Shard reader", "### Index PCA", "### Gallery files", "### Progress in a log"):
        assert heading in text
