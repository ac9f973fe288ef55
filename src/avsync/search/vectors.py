"""Clips as single vectors whose inner product is the diagonal-mean similarity.

Diagonal mean (`avsync.evaluation.similarity`) is `(1/T) sum_t cos(q_t, k_t)`: with every token scaled
to unit length, it is the dot product of the concatenated `T * D` tokens divided by T. Dividing each
concatenation by sqrt(T) instead makes the vectors unit length and the plain inner product the score,
so any inner-product index (FAISS `METRIC_INNER_PRODUCT`) serves it, exactly for a flat index.
"""

from __future__ import annotations

import numpy as np


def diagonal_mean_vectors(
    tokens: np.ndarray, name: str = "tokens", first_row: int = 0, ids: np.ndarray | None = None
) -> np.ndarray:
    """`(N, T, D)` tokens -> `(N, T * D)` float32 unit vectors: each token L2-normalized, then the
    concatenation divided by sqrt(T). Tokens that are NaN/inf or all zero have no direction: an error
    naming the clips (by `ids`, the clip ids of the N rows, when given; else rows counted from
    `first_row`), as `UnitTokens` refuses them."""
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 3 or 0 in tokens.shape:
        raise ValueError(f"{name}: expected (clips, time steps, dim) tokens, got shape {tokens.shape}")
    if tokens.size >= 1 << 22:
        return _large(tokens, name, first_row, ids)
    squares = np.einsum("ntd,ntd->nt", tokens, tokens)
    _check(squares, name, first_row, ids)
    scale = 1 / np.sqrt(squares * np.float32(tokens.shape[1]))
    return np.multiply(tokens, scale[..., None], dtype=np.float32).reshape(len(tokens), -1)


def _large(tokens: np.ndarray, name: str, first_row: int, ids: np.ndarray | None) -> np.ndarray:
    """The same with PyTorch, on all its threads (a chunk of 10,000 clips is 123 M numbers)."""
    import torch

    data = torch.from_numpy(np.ascontiguousarray(tokens))
    norms = torch.linalg.vector_norm(data, dim=-1, keepdim=True)
    _check(norms[..., 0].numpy(), name, first_row, ids)
    return data.div(norms.mul_(float(np.sqrt(tokens.shape[1])))).reshape(len(tokens), -1).numpy()


def _check(norms: np.ndarray, name: str, first_row: int, ids: np.ndarray | None = None) -> None:
    bad = ~(np.isfinite(norms) & (norms > 0))
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        which = (
            f"clips {[str(i) for i in ids[rows[:10]]]}"
            if ids is not None
            else f"rows {(rows[:10] + first_row).tolist()}"
        )
        raise ValueError(f"{name}: {len(rows)} clip(s) have NaN/inf or all-zero tokens ({which})")


def tokens_of_vectors(vectors: np.ndarray, steps: int) -> np.ndarray:
    """The inverse for unit tokens: `(N, T * D)` -> `(N, T, D)` (times sqrt(T), reshaped)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return (vectors * np.float32(np.sqrt(steps))).reshape(len(vectors), steps, -1)
