"""Cross-modal clip retrieval: exact ranks and R@k / median rank, chunked so galleries of any size fit.

Query clip `i` matches target clip `i`. For each block of query clips the engine builds that block's rows
of similarity scores (`similarity.py`), counts for every query the targets scoring strictly higher than
its true target (`ranking.py`: the authors' tie rule, no sort) and, if asked, keeps its top-k targets.
Only one block of scores exists at a time.

Directions: `video_to_audio` (queries are video tokens, targets audio tokens) and `audio_to_video`.
Since every strategy satisfies `S(audio, video) = S(video, audio).T`, `evaluate_all` computes each
matrix once and ranks both directions from it when it fits `max_matrix_bytes`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from avsync.evaluation.ranking import rank_of_truth, summarize_ranks, top_k_targets
from avsync.evaluation.similarity import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_TILE_BYTES,
    STRATEGIES,
    Strategy,
    UnitTokens,
    similarity,
    similarity_blocks,
)

Direction = Literal["video_to_audio", "audio_to_video"]
DIRECTIONS: tuple[Direction, ...] = ("video_to_audio", "audio_to_video")
RECALL_AT = (1, 5, 10)


@dataclass
class RetrievalResult:
    """Outcome of one strategy in one direction, on CPU.

    `metrics`: `R1`, `R5`, `R10` (fractions), `MR` (median rank, 1-based), `MeanR`.
    `ranks`: `(N,)` 1-based rank of each query's true target.
    `topk_indices` / `topk_scores`: `(N, k)` best targets per query, best first (when asked for).
    """

    metrics: dict[str, float]
    ranks: torch.Tensor
    topk_indices: torch.Tensor | None = None
    topk_scores: torch.Tensor | None = None


Results = dict[str, dict[str, RetrievalResult]]  # direction -> strategy -> result


def queries_and_targets(
    audio: torch.Tensor | UnitTokens, video: torch.Tensor | UnitTokens, direction: Direction
) -> tuple[torch.Tensor | UnitTokens, torch.Tensor | UnitTokens]:
    """`(queries, targets)`: `video_to_audio` queries with video tokens, `audio_to_video` with audio."""
    if direction == "video_to_audio":
        return video, audio
    if direction == "audio_to_video":
        return audio, video
    raise ValueError(f"unknown retrieval direction {direction!r}; choose one of {DIRECTIONS}")


def rank_blocks(
    blocks: Iterable[tuple[int, torch.Tensor]],
    num_queries: int,
    *,
    top_k: int = 0,
    recall_at: Sequence[int] = RECALL_AT,
) -> RetrievalResult:
    """Ranks, metrics and (`top_k > 0`) top-k lists from `(first row, score rows)` blocks of all queries."""
    ranks = torch.zeros(num_queries, dtype=torch.long)
    seen = torch.zeros(num_queries, dtype=torch.bool)
    topk_indices = topk_scores = None
    workspace = None  # reused by every block: no fresh allocation (and page faults) per block
    for start, scores in blocks:
        rows = slice(start, start + scores.shape[0])
        truth = torch.arange(rows.start, rows.stop, device=scores.device)
        if workspace is None or workspace.numel() < scores.numel():
            workspace = torch.empty(scores.numel(), dtype=torch.float32, device=scores.device)
        ranks[rows] = rank_of_truth(scores, truth, workspace[: scores.numel()].view_as(scores)).cpu()
        seen[rows] = True
        if top_k:
            block_scores, block_indices = top_k_targets(scores, top_k)
            if topk_indices is None:  # top_k is capped at the number of targets
                topk_indices = torch.empty(num_queries, block_indices.shape[1], dtype=torch.long)
                topk_scores = torch.empty(num_queries, block_indices.shape[1])
            topk_scores[rows], topk_indices[rows] = block_scores.cpu(), block_indices.cpu()
    if not seen.all():
        raise RuntimeError(f"score blocks covered {int(seen.sum())} of {num_queries} queries")
    return RetrievalResult(summarize_ranks(ranks, recall_at), ranks, topk_indices, topk_scores)


def _check_paired(queries: torch.Tensor | UnitTokens, targets: torch.Tensor | UnitTokens) -> int:
    num_queries, num_targets = _num_clips(queries), _num_clips(targets)
    if num_queries != num_targets:
        raise ValueError(
            f"retrieval pairs query i with target i, but there are {num_queries} queries and "
            f"{num_targets} targets"
        )
    return num_queries


def _num_clips(tokens: torch.Tensor | UnitTokens) -> int:
    return tokens.num_clips if isinstance(tokens, UnitTokens) else tokens.shape[0]


def retrieval_metrics(
    query_tokens: torch.Tensor | UnitTokens,
    target_tokens: torch.Tensor | UnitTokens,
    strategy: Strategy = "diagonal_mean",
    *,
    chunk_size: int | None = None,
    top_k: int = 0,
    recall_at: Sequence[int] = RECALL_AT,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> RetrievalResult:
    """Retrieve target `i` for query `i` among all targets: `(N, T, D)` tokens each, cosine similarity.

    `top_k > 0` also returns every query's top-k targets. Blocking (see `similarity_blocks`) bounds
    memory and never changes the results.
    """
    num_queries = _check_paired(query_tokens, target_tokens)
    blocks = similarity_blocks(
        query_tokens,
        target_tokens,
        strategy,
        chunk_size=chunk_size,
        block_bytes=block_bytes,
        tile_bytes=tile_bytes,
    )
    return rank_blocks(blocks, num_queries, top_k=top_k, recall_at=recall_at)


def rank_matrix(
    scores: torch.Tensor,
    *,
    top_k: int = 0,
    recall_at: Sequence[int] = RECALL_AT,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> RetrievalResult:
    """Ranks and metrics of a complete `(N, N)` score matrix whose diagonal holds the true pairs."""
    num_queries, num_targets = scores.shape
    if num_queries != num_targets:
        raise ValueError(f"a paired score matrix must be square, got {tuple(scores.shape)}")
    rows = max(1, block_bytes // (4 * num_targets))
    blocks = ((start, scores[start : start + rows].contiguous()) for start in range(0, num_queries, rows))
    return rank_blocks(blocks, num_queries, top_k=top_k, recall_at=recall_at)


def evaluate_all(
    audio: torch.Tensor | UnitTokens,
    video: torch.Tensor | UnitTokens,
    strategies: Sequence[Strategy] = STRATEGIES,
    directions: Sequence[Direction] = DIRECTIONS,
    *,
    chunk_size: int | None = None,
    top_k: int = 0,
    recall_at: Sequence[int] = RECALL_AT,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    max_matrix_bytes: int = 256 << 20,
) -> Results:
    """Every strategy in every direction for paired `audio` and `video` tokens `(N, T, D)`.

    Returns `{direction: {strategy: RetrievalResult}}`. Tokens are normalized once. When both
    directions are asked for and an `N x N` float32 matrix fits `max_matrix_bytes`, each strategy's
    matrix is computed once (video rows) and ranked along its rows and its columns; larger galleries
    stream each direction in blocks.
    """
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown retrieval direction(s) {sorted(unknown)}; choose from {DIRECTIONS}")
    audio, video = UnitTokens.from_tokens(audio, "audio"), UnitTokens.from_tokens(video, "video")
    num_clips = _check_paired(video, audio)
    share_matrix = set(directions) == set(DIRECTIONS) and 4 * num_clips**2 <= max_matrix_bytes
    blocking = dict(chunk_size=chunk_size, block_bytes=block_bytes, tile_bytes=tile_bytes)
    results: Results = {direction: {} for direction in directions}
    for strategy in strategies:
        if share_matrix:
            scores = similarity(video, audio, strategy, **blocking)
            for direction, oriented in (("video_to_audio", scores), ("audio_to_video", scores.T)):
                results[direction][strategy] = rank_matrix(
                    oriented, top_k=top_k, recall_at=recall_at, block_bytes=block_bytes
                )
            continue
        for direction in directions:
            queries, targets = queries_and_targets(audio, video, direction)
            results[direction][strategy] = retrieval_metrics(
                queries, targets, strategy, top_k=top_k, recall_at=recall_at, **blocking
            )
    return results


def metrics_table(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """`{direction: {strategy: metrics}}`: the JSON-ready part of `evaluate_all`'s results."""
    return {
        direction: {strategy: dict(result.metrics) for strategy, result in by_strategy.items()}
        for direction, by_strategy in results.items()
    }


def flatten_metrics(results: Results, prefix: str = "retrieval") -> dict[str, float]:
    """One level for TensorBoard / `log_dict`: `{"retrieval/video_to_audio/diagonal_mean/R1": 0.3, ...}`."""
    return {
        f"{prefix}/{direction}/{strategy}/{name}": value
        for direction, by_strategy in metrics_table(results).items()
        for strategy, metrics in by_strategy.items()
        for name, value in metrics.items()
    }


def write_metrics_json(results: Results, path: str | Path, **metadata: object) -> Path:
    """Metrics as `{"metadata": {...}, "metrics": {direction: {strategy: {...}}}}`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": metadata, "metrics": metrics_table(results)}, indent=2) + "\n")
    return path


def write_metrics_csv(results: Results, path: str | Path) -> Path:
    """One row per (direction, strategy): `direction,strategy,R1,R5,R10,MR,MeanR`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"direction": direction, "strategy": strategy, **metrics}
        for direction, by_strategy in metrics_table(results).items()
        for strategy, metrics in by_strategy.items()
    ]
    if not rows:
        raise ValueError("no retrieval results to write")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_rankings_csv(
    result: RetrievalResult,
    path: str | Path,
    query_ids: Sequence[str] | None = None,
    target_ids: Sequence[str] | None = None,
) -> Path:
    """Per query: its id, the rank of its true target and, when kept, its top-k targets and scores."""
    num_queries = len(result.ranks)
    query_ids = list(query_ids) if query_ids is not None else [str(i) for i in range(num_queries)]
    target_ids = list(target_ids) if target_ids is not None else [str(i) for i in range(num_queries)]
    if len(query_ids) != num_queries or len(target_ids) != num_queries:
        raise ValueError(
            f"{len(query_ids)} query ids and {len(target_ids)} target ids for {num_queries} queries"
        )
    k = 0 if result.topk_indices is None else result.topk_indices.shape[1]
    header = ["query", "rank"]
    header += [column for j in range(1, k + 1) for column in (f"top{j}", f"score{j}")]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(num_queries):
            row: list[object] = [query_ids[i], int(result.ranks[i])]
            if k:
                for index, score in zip(
                    result.topk_indices[i].tolist(), result.topk_scores[i].tolist(), strict=True
                ):
                    row += [target_ids[index], f"{score:.7g}"]
            writer.writerow(row)
    return path


def write_all_rankings(results: Results, directory: str | Path, ids: Sequence[str]) -> list[Path]:
    """`rankings/{direction}_{strategy}.csv` under `directory` for every result (`write_rankings_csv`;
    query and target ids are the clip ids, which both directions share)."""
    return [
        write_rankings_csv(result, Path(directory) / "rankings" / f"{direction}_{strategy}.csv", ids, ids)
        for direction, by_strategy in results.items()
        for strategy, result in by_strategy.items()
    ]


# ------------------------------------------------------------------------------ gathering over ranks
#: Room for one clip id, in UTF-8 bytes.
KEY_BYTES = 256


def _encode_keys(keys: Sequence[str], width: int) -> torch.Tensor:
    """Clip ids as `(B, width)` byte values (float32, zero-padded), so they travel in tensor collectives."""
    encoded = torch.zeros(len(keys), width)
    for row, key in enumerate(keys):
        data = str(key).encode()
        if len(data) > width or b"\0" in data:
            raise ValueError(f"clip id {key!r} is longer than {width} bytes or holds a NUL byte")
        encoded[row, : len(data)] = torch.tensor(list(data), dtype=torch.float32)
    return encoded


def _decode_keys(encoded: torch.Tensor) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode() for row in encoded.to(torch.uint8).tolist()]


class ClipEmbeddings(Metric):
    """The per-clip token sequences of both modalities `(B, T, D)` and their clip ids, over all batches
    and all ranks, for retrieval over the whole test set.

    States are flat float32 tensors that torchmetrics gathers with tensor collectives
    (`dist_reduce_fx="cat"`; a rank without clips contributes an empty one); clip ids travel as bytes.
    `compute()` keeps each clip once (the first copy: samplers pad ranks with repeated clips) and sorts
    clips by id, so any number of ranks gives the same tensors in the same order.
    """

    full_state_update = False

    def __init__(self, key_bytes: int = KEY_BYTES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key_bytes = key_bytes
        for name in ("audio", "video", "keys"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("shape", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="max")

    def update(self, keys: Sequence[str], audio: torch.Tensor, video: torch.Tensor) -> None:
        if audio.ndim != 3 or audio.shape != video.shape or len(keys) != audio.shape[0]:
            raise ValueError(
                f"need {len(keys)} clip ids and audio, video tokens of one shape (B, T, D); got "
                f"{tuple(audio.shape)} and {tuple(video.shape)}"
            )
        shape = torch.tensor(audio.shape[1:], device=self.shape.device)
        if self.audio and not torch.equal(shape, self.shape):
            raise ValueError(f"token shape (T, D) changed from {self.shape.tolist()} to {shape.tolist()}")
        self.shape = shape
        self.audio.append(audio.detach().float().flatten())
        self.video.append(video.detach().float().flatten())
        self.keys.append(_encode_keys(keys, self.key_bytes).flatten().to(audio.device))

    def compute(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """`(ids, audio (N, T, D), video (N, T, D))` on the CPU, each clip once, sorted by id."""
        steps, dim = (int(v) for v in self.shape)
        # after a sync the states are tensors (gathered), else lists of this rank's batches
        if (isinstance(self.keys, list) and not self.keys) or steps * dim == 0:
            return [], torch.empty(0, steps, dim), torch.empty(0, steps, dim)
        keys = _decode_keys(dim_zero_cat(self.keys).reshape(-1, self.key_bytes).cpu())
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        ids = sorted(first)
        rows = torch.tensor([first[key] for key in ids])
        audio = dim_zero_cat(self.audio).reshape(-1, steps, dim).cpu()[rows]
        video = dim_zero_cat(self.video).reshape(-1, steps, dim).cpu()[rows]
        return ids, audio, video
