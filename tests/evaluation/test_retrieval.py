"""The retrieval engine against brute-force definitions: strategies, chunking, ties, top-k, directions."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from avsync.evaluation.ranking import median_rank, rank_of_truth, summarize_ranks, top_k_targets
from avsync.evaluation.retrieval import (
    DIRECTIONS,
    evaluate_all,
    flatten_metrics,
    queries_and_targets,
    rank_matrix,
    retrieval_metrics,
    write_metrics_csv,
    write_metrics_json,
    write_rankings_csv,
)
from avsync.evaluation.similarity import STRATEGIES, similarity
from avsync.kernels import matmul_nt


def brute_force_similarity(queries: torch.Tensor, targets: torch.Tensor, strategy: str) -> torch.Tensor:
    """SPEC §4 literally: the T x T cosine matrix of every pair in float64, then the strategy's reduction."""
    cos = torch.einsum(
        "itd,jsd->ijts", F.normalize(queries.double(), dim=-1), F.normalize(targets.double(), dim=-1)
    )
    diagonal = cos.diagonal(dim1=2, dim2=3)
    return {
        "diagonal_mean": diagonal.mean(-1),
        "diagonal_max": diagonal.amax(-1),
        "block_mean": cos.mean((2, 3)),
        "block_max": cos.amax((2, 3)),
    }[strategy]


def brute_force_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank = first position of the true target's score in the row sorted descending (authors' rule)."""
    ranks = []
    for i, row in enumerate(scores.tolist()):
        ranks.append(sorted(row, reverse=True).index(row[i]) + 1)
    return torch.tensor(ranks)


def random_tokens(num_clips: int = 37, steps: int = 4, dim: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_clips, steps, dim, generator=generator) * 3 + 0.5  # not unit: normalizing is ours


@pytest.fixture(scope="module")
def paired() -> tuple[torch.Tensor, torch.Tensor]:
    """Audio and video tokens where the true pair is more similar than chance, so ranks spread out."""
    audio = random_tokens(seed=1)
    video = audio + 6 * random_tokens(seed=2)
    return audio, video


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_similarity_follows_the_definition(paired, strategy):
    audio, video = paired
    expected = brute_force_similarity(video, audio, strategy)
    torch.testing.assert_close(similarity(video, audio, strategy).double(), expected, rtol=0, atol=1e-6)


def test_strategies_give_different_scores(paired):
    audio, video = paired
    matrices = [similarity(video, audio, strategy) for strategy in STRATEGIES]
    for i in range(len(matrices)):
        for j in range(i + 1, len(matrices)):
            assert (matrices[i] - matrices[j]).abs().max() > 1e-2, (STRATEGIES[i], STRATEGIES[j])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranks_and_metrics_follow_the_definition(paired, strategy):
    audio, video = paired
    result = retrieval_metrics(video, audio, strategy)
    expected_ranks = brute_force_ranks(brute_force_similarity(video, audio, strategy))
    assert torch.equal(result.ranks, expected_ranks)
    n = len(expected_ranks)
    assert result.metrics["R1"] == (expected_ranks == 1).sum().item() / n
    assert result.metrics["R5"] == (expected_ranks <= 5).sum().item() / n
    assert result.metrics["R10"] == (expected_ranks <= 10).sum().item() / n
    assert result.metrics["MR"] == float(expected_ranks.double().median())  # odd count: no averaging
    assert result.metrics["MeanR"] == pytest.approx(expected_ranks.double().mean().item())
    assert 0 < result.metrics["R1"] < result.metrics["R10"] < 1  # the fixture spreads the ranks


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunking_and_tiling_do_not_change_results(paired, strategy):
    audio, video = paired
    reference = retrieval_metrics(video, audio, strategy, chunk_size=len(video), top_k=5)
    variants = [
        dict(chunk_size=1),
        dict(chunk_size=7),
        dict(chunk_size=None),
        dict(chunk_size=7, block_bytes=1, tile_bytes=1),  # one target clip per tile
    ]
    for options in variants:
        result = retrieval_metrics(video, audio, strategy, top_k=5, **options)
        assert torch.equal(result.ranks, reference.ranks), options
        assert result.metrics == reference.metrics, options
        assert torch.equal(result.topk_indices, reference.topk_indices), options
        torch.testing.assert_close(result.topk_scores, reference.topk_scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            similarity(video, audio, strategy, **options),
            similarity(video, audio, strategy),
            rtol=0,
            atol=1e-6,
        )


def one_hot_clips(*clips: list[int], dim: int = 4) -> torch.Tensor:
    """Clips whose tokens are basis vectors: all cosines are exactly 0 or 1, so ties are exact."""
    return torch.eye(dim)[torch.tensor(clips)]


def test_a_tie_with_the_true_target_does_not_push_it_down():
    queries = one_hot_clips([0, 1], [2, 3], [0, 2], [1, 3])
    targets = one_hot_clips(
        [0, 2],  # truth of query 0: (1 + 0) / 2 = 0.5
        [3, 1],  # ties with it: 0.5
        [0, 1],  # beats it: 1.0
        [2, 3],  # loses: 0.0
    )
    scores = similarity(queries, targets, "diagonal_mean")
    assert scores[0].tolist() == [0.5, 0.5, 1.0, 0.0]
    result = retrieval_metrics(queries, targets, "diagonal_mean")
    assert result.ranks[0] == 2  # one target strictly higher; the tie at 0.5 does not count
    assert torch.equal(result.ranks, brute_force_ranks(scores))
    assert torch.equal(
        rank_of_truth(torch.zeros(3, 5), torch.tensor([0, 2, 4])), torch.ones(3, dtype=torch.long)
    )


def test_top_k_breaks_ties_by_target_index_even_at_the_cut():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.5, 0.9, 0.5, 0.5],  # four-way tie across the cut at k = 3
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.3, 0.2, 0.1, 0.6, 0.5, 0.4],
        ]
    )
    values, indices = top_k_targets(scores, 3)
    assert indices.tolist() == [[3, 1, 2], [0, 1, 2], [3, 4, 5]]
    assert torch.equal(values, scores.gather(1, indices))


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_top_k_equals_a_full_stable_sort(k):
    generator = torch.Generator().manual_seed(k)
    # Few distinct values, so that ties are everywhere, including at the cut.
    scores = torch.randint(0, 6, (50, 29), generator=generator).float() / 8
    values, indices = top_k_targets(scores, k)
    k = min(k, scores.shape[1])
    for row, (row_values, row_indices) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
        expected = sorted(range(scores.shape[1]), key=lambda j: (-scores[row, j].item(), j))[:k]
        assert row_indices == expected
        assert row_values == scores[row, expected].tolist()


def test_top_k_of_retrieval_matches_the_similarity_matrix(paired):
    audio, video = paired
    result = retrieval_metrics(audio, video, "block_max", top_k=10, chunk_size=6)
    scores = similarity(audio, video, "block_max")
    expected = torch.stack(
        [torch.tensor(sorted(range(len(row)), key=lambda j: (-row[j], j))[:10]) for row in scores.tolist()]
    )
    assert torch.equal(result.topk_indices, expected)
    torch.testing.assert_close(result.topk_scores, scores.gather(1, expected), rtol=0, atol=1e-6)
    in_top = (result.topk_indices == torch.arange(len(audio))[:, None]).any(dim=1)
    assert torch.equal(in_top, result.ranks <= 10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_directions_are_the_two_orientations_of_one_matrix(paired, strategy):
    audio, video = paired
    torch.testing.assert_close(
        similarity(audio, video, strategy), similarity(video, audio, strategy).T, rtol=0, atol=1e-6
    )
    shared = evaluate_all(audio, video, [strategy])
    streamed = evaluate_all(audio, video, [strategy], max_matrix_bytes=0, chunk_size=5)
    for direction in DIRECTIONS:
        queries, targets = queries_and_targets(audio, video, direction)
        direct = retrieval_metrics(queries, targets, strategy)
        assert torch.equal(shared[direction][strategy].ranks, direct.ranks), direction
        assert torch.equal(streamed[direction][strategy].ranks, direct.ranks), direction
    # The two directions are different questions: their ranks differ on this data.
    assert not torch.equal(shared["video_to_audio"][strategy].ranks, shared["audio_to_video"][strategy].ranks)


def test_queries_and_targets_follow_the_direction_names():
    audio, video = torch.zeros(1), torch.ones(1)
    assert queries_and_targets(audio, video, "video_to_audio") == (video, audio)
    assert queries_and_targets(audio, video, "audio_to_video") == (audio, video)
    with pytest.raises(ValueError, match="direction"):
        queries_and_targets(audio, video, "audio_to_audio")


def test_median_rank_averages_the_middle_pair_like_numpy():
    assert median_rank(torch.tensor([4, 1, 3, 2])) == 2.5
    assert median_rank(torch.tensor([5, 1, 3])) == 3.0
    metrics = summarize_ranks(torch.tensor([1, 2, 6, 11]))
    assert metrics == {"R1": 0.25, "R5": 0.5, "R10": 0.75, "MR": 4.0, "MeanR": 5.0}


def test_rank_matrix_reads_the_diagonal_as_truth():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.9], [0.0, 0.2, 0.1]])
    assert rank_matrix(scores).ranks.tolist() == [1, 3, 2]
    assert rank_matrix(scores.T).ranks.tolist() == [1, 1, 3]


def test_bad_inputs_are_named():
    tokens = random_tokens(num_clips=6)
    broken = tokens.clone()
    broken[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"queries: 1 clip.*\[4\]"):
        retrieval_metrics(broken, tokens)
    zeros = tokens.clone()
    zeros[2, 0] = 0
    with pytest.raises(ValueError, match=r"video: 1 clip.*\[2\]"):
        evaluate_all(tokens, zeros)
    with pytest.raises(ValueError, match="unknown similarity strategy 'mean'"):
        similarity(tokens, tokens, "mean")
    with pytest.raises(ValueError, match="6 queries and 5 targets"):
        retrieval_metrics(tokens, tokens[:5])
    with pytest.raises(ValueError, match="time steps or dimension"):
        similarity(tokens, tokens[:, :3])
    with pytest.raises(ValueError, match="no tokens to compare"):
        retrieval_metrics(tokens[:0], tokens[:0])
    with pytest.raises(ValueError, match="expected \\(clips, time steps, dim\\)"):
        similarity(tokens[0], tokens[0])


def test_matmul_nt_is_float32_exact_for_awkward_shapes():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(37, 130, generator=generator)
    b = torch.randn(53, 260, generator=generator)[:, ::2]  # non-contiguous
    product = matmul_nt(a, b)
    assert product.shape == (37, 53) and product.dtype == torch.float32
    torch.testing.assert_close(product.double(), a.double() @ b.double().T, rtol=0, atol=1e-4)


def test_results_are_written_as_json_csv_and_flat_logs(paired, tmp_path):
    audio, video = paired
    results = evaluate_all(audio, video, ["diagonal_mean", "block_max"], top_k=3)
    flat = flatten_metrics(results)
    assert (
        flat["retrieval/video_to_audio/diagonal_mean/R1"]
        == results["video_to_audio"]["diagonal_mean"].metrics["R1"]
    )
    assert len(flat) == 2 * 2 * 5

    written = json.loads(write_metrics_json(results, tmp_path / "metrics.json", clips=len(audio)).read_text())
    assert written["metadata"] == {"clips": len(audio)}
    assert written["metrics"]["audio_to_video"]["block_max"] == results["audio_to_video"]["block_max"].metrics

    with write_metrics_csv(results, tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["direction"], row["strategy"]) for row in rows] == [
        (direction, strategy) for direction in DIRECTIONS for strategy in ("diagonal_mean", "block_max")
    ]
    assert float(rows[0]["MR"]) == results["video_to_audio"]["diagonal_mean"].metrics["MR"]

    result = results["video_to_audio"]["block_max"]
    names = [f"clip{i}" for i in range(len(audio))]
    with write_rankings_csv(result, tmp_path / "rankings.csv", names, names).open() as handle:
        rankings = list(csv.DictReader(handle))
    assert rankings[3]["query"] == "clip3" and int(rankings[3]["rank"]) == result.ranks[3]
    assert rankings[3]["top1"] == names[result.topk_indices[3, 0]]
    assert float(rankings[3]["score1"]) == pytest.approx(result.topk_scores[3, 0].item(), abs=1e-6)
