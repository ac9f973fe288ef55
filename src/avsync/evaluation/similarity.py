"""Clip-to-clip similarity of token sequences (SPEC §4, supplementary §8).

A clip carries `T` tokens per modality: the global tokens of its `T` frame / audio-window pairs. For a
query clip `q` and a target clip `k`, `C[t, s] = cos(q_t, k_s)` is a `T x T` matrix; a strategy reduces it
to one score (the authors' script calls block mean and block max `mean` and `max`):

- `diagonal_mean` (default): mean over t of `C[t, t]`. Equal to the dot product of the concatenated unit
  tokens divided by T, so one GEMM over `T * D` long vectors.
- `diagonal_max`: max over t of `C[t, t]`. One `D`-deep GEMM per time step, folded into a running max.
- `block_mean`: mean over t, s of `C[t, s]`, equal to `<mean_t q_t, mean_s k_s>`: one GEMM on the means.
- `block_max`: max over t, s of `C[t, s]`. Needs every token pair: `T^2` times the work of the others.

Every strategy is symmetric under swapping the roles: `similarity(k, q) == similarity(q, k).T`.

Scores come in blocks of query clips; within a block the targets are processed in tiles of about
`tile_bytes` of GEMM output, so that products and their reductions stay in cache and the block's score
buffer is allocated once and reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange, reduce

from avsync.kernels import matmul_nt

Strategy = Literal["diagonal_mean", "diagonal_max", "block_mean", "block_max"]
STRATEGIES: tuple[Strategy, ...] = ("diagonal_mean", "diagonal_max", "block_mean", "block_max")

# A block holds the scores of `chunk_size` query clips against all targets: at most `block_bytes`, but
# at least MIN_CHUNK clips so that each GEMM is large enough to run at full speed. A tile is the GEMM
# output for one block against a slice of the targets.
DEFAULT_BLOCK_BYTES = 64 << 20
DEFAULT_TILE_BYTES = 4 << 20
MIN_CHUNK = 64


@dataclass(frozen=True)
class UnitTokens:
    """Validated per-clip token sequences `(N, T, D)`, each token scaled to unit L2 norm (cosine)."""

    tensor: torch.Tensor

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor | UnitTokens, name: str = "tokens") -> UnitTokens:
        """Check `tokens (N, T, D)` and L2-normalize each token in float32.

        Non-finite or all-zero tokens have no direction; they mean that feature extraction failed,
        so they are an error (naming the clips) rather than a silent score of NaN or 0.
        """
        if isinstance(tokens, UnitTokens):
            return tokens
        if tokens.ndim != 3:
            raise ValueError(f"{name}: expected (clips, time steps, dim), got shape {tuple(tokens.shape)}")
        if 0 in tokens.shape:
            raise ValueError(f"{name}: no tokens to compare, shape {tuple(tokens.shape)}")
        if not tokens.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {tokens.dtype}")
        tokens = tokens.detach().float()
        norms = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True)
        bad = ~(torch.isfinite(norms) & (norms > 0)).squeeze(-1)
        if bad.any():
            clips = bad.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"{name}: {len(clips)} clip(s) have NaN/inf or all-zero tokens (first: {clips[:10]})"
            )
        return cls(tokens / norms)

    @property
    def num_clips(self) -> int:
        return self.tensor.shape[0]


class _Scorer:
    """One strategy: layouts of a query block and of the targets, and the scores of the block against a
    tile of targets."""

    # Query clips per block beyond which larger blocks only cost memory (None: no such limit).
    max_chunk: int | None = None

    def __init__(self, steps: int):
        self.steps = steps

    def prepare_queries(self, tokens: torch.Tensor) -> torch.Tensor:
        """Layout of a block of unit query tokens `(B, T, D)` for `tile_scores`."""
        return tokens

    def prepare_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Layout of unit target tokens `(N, T, D)` for `tile_scores`; clips stay on the first axis."""
        return tokens

    def tile_scores(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`(B, n)` scores of a prepared query block against `n` prepared target clips."""
        raise NotImplementedError

    def tile_bytes_per_target(self, num_queries: int) -> int:
        """Working memory that one target clip adds to a tile."""
        return 4 * num_queries


class _DiagonalMean(_Scorer):
    def prepare_queries(self, tokens):
        return rearrange(tokens, "b t d -> b (t d)")

    def prepare_targets(self, tokens):
        return rearrange(tokens, "n t d -> n (t d)")

    def tile_scores(self, queries, targets):
        return matmul_nt(queries, targets).div_(self.steps)


class _DiagonalMax(_Scorer):
    def prepare_queries(self, tokens):
        return rearrange(tokens, "b t d -> t b d").contiguous()

    def tile_scores(self, queries, targets):
        targets = rearrange(targets, "n t d -> t n d").contiguous()
        scores = matmul_nt(queries[0], targets[0])
        for step in range(1, self.steps):
            torch.maximum(scores, matmul_nt(queries[step], targets[step]), out=scores)
        return scores

    def tile_bytes_per_target(self, num_queries):
        return 2 * 4 * num_queries


class _BlockMean(_Scorer):
    def prepare_queries(self, tokens):
        return reduce(tokens, "b t d -> b d", "mean")

    def prepare_targets(self, tokens):
        return reduce(tokens, "n t d -> n d", "mean")

    def tile_scores(self, queries, targets):
        return matmul_nt(queries, targets)


class _BlockMax(_Scorer):
    """The `(n*T, B*T)` products of all token pairs, with the queries laid out time-major, `(t b)`, so that
    both maxima run over outer axes: wide elementwise maxima instead of short strided scans."""

    max_chunk = MIN_CHUNK  # already GEMM operands of MIN_CHUNK * T rows

    def prepare_queries(self, tokens):
        return rearrange(tokens, "b t d -> (t b) d").contiguous()

    def tile_scores(self, queries, targets):
        pairs = matmul_nt(rearrange(targets, "n s d -> (n s) d"), queries)
        pairs = rearrange(pairs, "(n s) (t b) -> n s t b", s=self.steps, t=self.steps)
        return pairs.amax(dim=(1, 2)).T

    def tile_bytes_per_target(self, num_queries):
        return 4 * num_queries * self.steps**2


_SCORERS: dict[str, type[_Scorer]] = {
    "diagonal_mean": _DiagonalMean,
    "diagonal_max": _DiagonalMax,
    "block_mean": _BlockMean,
    "block_max": _BlockMax,
}


def _scorer_class(strategy: str) -> type[_Scorer]:
    if strategy not in _SCORERS:
        raise ValueError(f"unknown similarity strategy {strategy!r}; choose one of {STRATEGIES}")
    return _SCORERS[strategy]


def default_chunk_size(
    strategy: Strategy, num_queries: int, num_targets: int, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> int:
    """Query clips per block: as many as fit `block_bytes` of float32 scores, and at least `MIN_CHUNK`."""
    fitting = max(block_bytes // (4 * num_targets), MIN_CHUNK)
    return max(1, min(num_queries, fitting, _scorer_class(strategy).max_chunk or fitting))


@torch.no_grad()
def similarity_blocks(
    queries: torch.Tensor | UnitTokens,
    targets: torch.Tensor | UnitTokens,
    strategy: Strategy = "diagonal_mean",
    *,
    chunk_size: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(first query index, scores (B, N_targets))` for consecutive blocks of query clips.

    Scores are float32 cosine similarities on the tokens' device. Memory beyond the normalized tokens
    is one block: the yielded tensor is a buffer that the next block overwrites, so copy what you keep.
    `chunk_size` (query clips per block) defaults to `default_chunk_size`.
    """
    queries = UnitTokens.from_tokens(queries, "queries")
    targets = UnitTokens.from_tokens(targets, "targets")
    if queries.tensor.shape[1:] != targets.tensor.shape[1:]:
        raise ValueError(
            f"queries {tuple(queries.tensor.shape)} and targets {tuple(targets.tensor.shape)} differ in "
            "time steps or dimension"
        )
    num_queries, num_targets, steps = queries.num_clips, targets.num_clips, queries.tensor.shape[1]
    scorer = _scorer_class(strategy)(steps)
    if chunk_size is None:
        chunk_size = default_chunk_size(strategy, num_queries, num_targets, block_bytes)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk_size = min(chunk_size, num_queries)
    tile = max(1, tile_bytes // scorer.tile_bytes_per_target(chunk_size))
    prepared_targets = scorer.prepare_targets(targets.tensor)
    buffer = queries.tensor.new_empty(chunk_size, num_targets)
    for start in range(0, num_queries, chunk_size):
        block = scorer.prepare_queries(queries.tensor[start : start + chunk_size])
        scores = buffer[: min(chunk_size, num_queries - start)]
        for first in range(0, num_targets, tile):
            scores[:, first : first + tile] = scorer.tile_scores(
                block, prepared_targets[first : first + tile]
            )
        yield start, scores


def similarity(
    queries: torch.Tensor | UnitTokens,
    targets: torch.Tensor | UnitTokens,
    strategy: Strategy = "diagonal_mean",
    *,
    chunk_size: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> torch.Tensor:
    """The full `(N_queries, N_targets)` float32 similarity matrix, computed as `similarity_blocks`."""
    queries = UnitTokens.from_tokens(queries, "queries")
    targets = UnitTokens.from_tokens(targets, "targets")
    matrix = queries.tensor.new_empty(queries.num_clips, targets.num_clips)
    blocks = similarity_blocks(
        queries, targets, strategy, chunk_size=chunk_size, block_bytes=block_bytes, tile_bytes=tile_bytes
    )
    for start, scores in blocks:
        matrix[start : start + scores.shape[0]] = scores
    return matrix
