"""Smoke tests of `python -m benchmarks`: every benchmark runs at tiny sizes and reports what it measured,
the report renders from the results, and the harness times and isolates as it says. No timed assertions."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from benchmarks import data, inference, pretrain, probe, retrieval
from benchmarks.__main__ import main
from benchmarks.harness import interleaved_medians, machine, run_isolated, time_runs, versions
from benchmarks.report import render
from benchmarks.suite import SUITE, TARGETS, Benchmark

TINY_RETRIEVAL = {"num_clips": 40, "steps": 4, "dim": 8, "repeats": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_timing_warms_up_then_times_each_run_and_interleaves_variants():
    calls = []
    timing = time_runs(lambda: calls.append("a"), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing.runs) == 3 and timing.median >= 0
    order = []
    timings = interleaved_medians({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2)
    assert order == ["a", "b", "a", "b", "a", "b"]  # one warm-up each, then round-robin
    assert set(timings) == {"a", "b"} and all(len(t.runs) == 2 for t in timings.values())


def test_machine_and_versions_describe_this_host():
    info, found = machine(), versions()
    assert info["logical_cores"] >= 1 and info["memory_gib"] > 0 and info["cpu"]
    assert torch.__version__.startswith(found["torch"]) and found["python"]


def test_a_benchmark_runs_in_its_own_process_and_reports_its_peak_memory():
    result = run_isolated("retrieval", TINY_RETRIEVAL, threads=1)
    assert (result["clips"], result["steps"], result["dim"]) == (40, 4, 8)
    assert len(result["runs_s"]) == 2 and result["all_strategies_both_directions_s"] > 0
    assert set(result["per_strategy_both_directions"]) == {
        "diagonal_mean",
        "diagonal_max",
        "block_mean",
        "block_max",
    }
    assert result["peak_rss_mib"] > 0 and result["wall_s"] > 0


def test_retrieval_flop_counts_follow_the_strategies():
    assert retrieval.strategy_flops("diagonal_mean", 10, 16, 8) == 2 * 100 * 16 * 8
    assert retrieval.strategy_flops("block_mean", 10, 16, 8) == 2 * 100 * 8
    assert retrieval.strategy_flops("block_max", 10, 16, 8) == 2 * 100 * 16 * 16 * 8


def test_gallery_and_its_projection():
    gallery = retrieval.time_gallery(num_clips=300, steps=4, dim=8)
    assert gallery["clips"] == 300 and gallery["top_k"] == 10 and gallery["diagonal_mean_topk_s"] > 0
    projection = retrieval.time_gallery_projection(full_clips=1000, subset_clips=100, steps=4, dim=8)
    assert projection["projected_s"] == pytest.approx(
        projection["measured"]["diagonal_mean_topk_s"] * 100, rel=0.01
    )
    assert projection["projected_float32_tokens_gib"] == pytest.approx(2 * 1000 * 4 * 8 * 4 / 2**30, abs=0.01)


@pytest.fixture(scope="module")
def tiny_pretrain():
    torch.set_num_threads(1)
    return pretrain.pretrain_step(preset="tiny", batch=2, steps=1, warmup=0, matmul_size=128)


def test_pretrain_step_reports_throughput_flops_mfu_and_where_the_time_goes(tiny_pretrain):
    result = tiny_pretrain
    assert set(result["precisions"]) == {"fp32", "bf16"}
    # attention's products are counted in one count and not in the reference design's
    assert result["model_gflop_per_sample"] > result["flop_counter_sdpa_gflop_per_sample"] > 0
    for entry in result["precisions"].values():
        assert entry["samples_per_s"] > 0 and 0 < entry["mfu"]
        # the authors' configuration timed in the same run, and the median of the paired ratios
        pairs = zip(entry["authors_step"]["runs_s"], entry["step"]["runs_s"], strict=True)
        assert entry["ratio_vs_authors"] == pytest.approx(
            statistics.median(a / b for a, b in pairs), rel=1e-2
        )
        assert sum(entry["kernels"].values()) > 0 and entry["first_step_s"] > 0
        assert entry["matmul_peak"]["best_gflop_per_s"] == max(
            v
            for k, v in entry["matmul_peak"].items()
            if k.endswith("gflop_per_s") and k != "best_gflop_per_s"
        )
        shares = entry["profile"]["by_category"]
        assert shares["linear layers (GEMM)"]["seconds"] > 0
        assert sum(v["share"] for v in shares.values()) == pytest.approx(1, abs=0.01)


def test_the_reference_design_flop_count_is_the_papers_126_7_gflop_at_vitb():
    """No skipped work: the ViT-B step counts 126.7 GFLOP per sample as the reference design did (one
    forward and backward at batch 1, about 2 s)."""
    torch.manual_seed(0)
    model = pretrain.CAVMAESync.from_preset("vitb")
    audio, video = pretrain.make_batch(model, 1, torch.device("cpu"))
    assert pretrain.model_flops_per_sample(model, audio, video, "sdpa") / 1e9 == pytest.approx(
        126.745, abs=0.01
    )


def test_ablation_times_every_variant_against_the_authors_configuration():
    result = pretrain.pretrain_ablation(
        preset="tiny", batch=2, steps=1, warmup=0, precisions=("fp32", "bf16")
    )
    for precision in ("fp32", "bf16"):
        measured = result["precisions"][precision]["variants"]
        assert list(measured) == [name for name, _, _ in pretrain.CPU_VARIANTS]
        assert measured[pretrain.CPU_VARIANTS[0][0]]["speedup_vs_authors"] == 1.0
    assert set(result["optimizer_step_ms"]) == {"multi_tensor", "fused"}


def test_the_authors_configuration_runs_pytorchs_kernels_and_avsyncs_the_measured_ones():
    from avsync.kernels import chooses_kernels, chosen_kernels

    (authors, authors_adam), (ours, adam) = pretrain.authors_and_avsync("tiny", torch.device("cpu"))
    assert not chooses_kernels(authors) and chooses_kernels(ours)
    assert set(chosen_kernels(authors)) == {"linear: library", "attention: sdpa"}
    assert not authors_adam.defaults.get("fused") and adam.defaults["fused"]
    for a, b in zip(authors.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same initial weights


def test_feature_extraction_reports_each_mode():
    result = inference.feature_extraction(preset="tiny", clips=1, frames=2, repeats=1, warmup=0)
    assert result["audio_and_video"]["gflop_per_clip"] == pytest.approx(
        result["audio"]["gflop_per_clip"] + result["video"]["gflop_per_clip"], rel=0.02
    )
    assert all(result[m]["clips_per_s"] > 0 for m in inference.MODES)
    assert result["kernel_choice_speedup"] > 0


def test_probing_with_and_without_the_cache():
    result = probe.probing_epochs(
        preset="tiny", clips=4, batch_size=2, frames=2, cached_epochs=2, num_classes=3
    )
    assert result["epoch_without_cache_s"] > 0 and result["epoch_with_cache_s"] > 0
    assert result["speedup"] == pytest.approx(
        result["epoch_without_cache_s"] / result["epoch_with_cache_s"], rel=0.05
    )
    assert len(result["cached_epochs_s"]) == 2


def test_loader_on_synthetic_shards_with_the_before_variant(tmp_path):
    path, described = data.make_shard(tmp_path / "s", 6, source="synthetic")
    assert described.startswith("synthetic") and path.endswith(".tar")
    result = data.loader_throughput(
        train_samples=16, eval_clips=4, repeats=1, source="synthetic", batch_size=4, eval_batch_size=2
    )
    inside = result["in_process"]
    assert inside["train_samples_per_s"] > 0 and inside["eval_clips_per_s"] > 0
    assert inside["before_train_samples_per_s"] > 0 and inside["before_eval_clips_per_s"] > 0
    assert result["dataloader_worker"]["train_samples_per_s"] > 0


def test_prepare_throughput_on_the_real_clips_or_a_reason():
    result = data.prepare_throughput(repeats=1)
    if "skipped" in result:
        assert "not present" in result["skipped"]
    else:
        assert result["144p"]["clips_per_s"] > 0 and result["720p"]["clips_per_s"] > 0


def test_whole_prepare_runs_are_timed_per_resolution_and_projected_to_audioset(tmp_path):
    result = data.prepare_throughput(repeats=1, end_to_end=True, seconds=0.2)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    runs, projected = result["end_to_end"], result["projection"]
    assert runs["360p"]["size"].startswith("640x360") and runs["360p"]["clips"] >= 4
    for label in ("144p", "360p", "720p"):
        cpu = runs[label]["cpu_s_per_clip"]
        assert cpu > 0 and runs[label]["sample_bytes"] > 0
        assert projected[label]["hours"] == pytest.approx(2_000_000 * cpu / 64 / 3600, abs=0.01)
    text = render({"command": "test", "generated": "now", "threads": 1, "machine": machine(),
                   "versions": versions(), "results": {"prepare": result}})  # fmt: skip
    assert "2,000,000 clips (AudioSet-2M) on one 64-core node" in text


def test_the_report_renders_every_section_and_judges_the_targets(tiny_pretrain):
    results = {
        "pretrain": tiny_pretrain,
        "retrieval": retrieval.time_evaluation(**TINY_RETRIEVAL),
        "gallery": retrieval.time_gallery(num_clips=200, steps=4, dim=8),
    }
    report = {
        "command": "test",
        "generated": "now",
        "threads": 1,
        "machine": machine(),
        "versions": versions(),
        "results": results,
    }
    text = render(report)
    for heading in (
        "## Machine",
        "## Targets (issue 6)",
        "## 1. Pretraining step",
        "## 3a. Retrieval",
        "## Runs",
    ):
        assert heading in text
    fp32 = tiny_pretrain["precisions"]["fp32"]["samples_per_s"]
    row = next(line for line in text.splitlines() if line.startswith("| ViT-B step, fp32, CPU"))
    assert ("| met |" in row) == (fp32 >= 1.6)
    assert (
        "| 100,000-clip gallery, 16 x 16 tokens | < 60 s | - | not measured |" in text
    )  # only 200 clips ran
    assert json.dumps(report)  # everything in the report is JSON


def test_the_suite_and_targets_are_consistent():
    for name, bench in SUITE.items():
        assert callable(bench.resolve()), name
        assert set(bench.quick) <= set(bench.full) | {
            "precisions",
            "compare_library",
            "num_clips",
            "batch_size",
        }, name
    assert len({t.name for t in TARGETS}) == len(TARGETS)


def test_the_command_line_writes_json_and_markdown(tmp_path, monkeypatch):
    tiny = Benchmark("benchmarks.retrieval:time_evaluation", full=TINY_RETRIEVAL, quick=TINY_RETRIEVAL)
    monkeypatch.setitem(SUITE, "retrieval", tiny)
    assert main(["--only", "retrieval", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "benchmarks.json").read_text())
    assert written["results"]["retrieval"]["clips"] == 40 and written["threads"] == 1
    assert "## 3a. Retrieval" in (tmp_path / "BENCHMARKS.md").read_text()
    (tmp_path / "BENCHMARKS.md").unlink()
    assert main(["--render", "--out-dir", str(tmp_path)]) == 0  # the report alone, from the JSON
    assert "## 3a. Retrieval" in (tmp_path / "BENCHMARKS.md").read_text()


def test_render_without_results_names_the_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--render", "--out-dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert (
        str(tmp_path / "benchmarks.json") in capsys.readouterr().err
        and not (tmp_path / "BENCHMARKS.md").exists()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the row a machine without a GPU writes")
def test_the_gpu_row_is_skipped_with_its_reason_where_there_is_no_gpu(tmp_path):
    assert main(["--only", "pretrain_gpu", "--out-dir", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "benchmarks.json").read_text())
    assert "no CUDA GPU" in written["results"]["pretrain_gpu"]["skipped"]
    assert "`pretrain_gpu`: skipped (no CUDA GPU" in (tmp_path / "BENCHMARKS.md").read_text()
