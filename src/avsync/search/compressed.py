"""The compressed index: PCA, then a 4-bit product-quantization scan, then an 8-bit re-scoring.

A clip is a 12,288-dimensional unit vector (16 x 768; `vectors.py`): 48 KiB in float32, 49 GB for a
million clips, so an exact index does not fit in memory there. The compressed index keeps about 1.1 KB
per clip, in three stages:

1. `PCA`: a linear map to `pca_dim` (1024) dimensions, learned (uncentred: inner products are kept, not
   distances to a mean) on a sample of the gallery. The frames of a clip are strongly correlated, so
   most of a clip's energy lies in few directions (92 % in 1,024 of 12,288 on the benchmark's
   synthetic gallery); what is left is mostly per-frame noise, which no index can keep.
2. Candidates: the first `base_dim` (512) PCA coordinates in a 4-bit product quantizer with SIMD
   "fast scan" (`IndexPQFastScan`, 64 bytes per clip), scanned in full for every query: no coarse
   partition to miss the neighbours of a query that lies between clusters (an audio query lies near the
   video tokens of its clip but not on them), and a million clips scan in a few milliseconds.
3. Re-scoring: the `candidates` best are re-scored on all `pca_dim` coordinates stored as 8-bit scalars
   (`IndexScalarQuantizer`, 1 KB per clip), and the best `k` returned (`IndexRefine`).

The whole chain is one FAISS index (`IndexPreTransform(PCA, IndexRefine(...))`), saved and loaded as
one file. Its scores approximate the diagonal mean; an exact re-ranking of the best few from the stored
embeddings (`SearchIndex.search(rerank=...)`) makes the final order and scores exact.

The build projects the gallery with PyTorch (in bfloat16 where the CPU has native bf16 products: twice
as fast, and its rounding is far below the 8-bit quantization's) and adds the projections to the inner
index; queries go through FAISS's float32 transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Fewest clips a compressed index is built for (its quantizers are trained on the gallery).
MIN_CLIPS = 1000


@dataclass(frozen=True)
class CompressedSettings:
    """How a compressed index is built (defaults: those measured at a million clips, BENCHMARKS.md 3d).

    Args:
    pca_dim: dimensions kept by the PCA (and re-scored in 8 bits).
    base_dim: leading PCA dimensions the 4-bit candidate scan sees, rounded down to a multiple of 4:
        `base_dim / 4` sub-quantizers of 16 centroids each, `base_dim / 8` bytes per clip.
    train_clips: gallery clips the PCA and the quantizers are learned on.
    candidates: clips the scan passes to the 8-bit re-scoring, per query (a search-time default).
    projection: `"bf16"`, `"fp32"`, or `"auto"` (bf16 where the CPU multiplies bf16 natively).
    seed: the training sample and the randomized SVD.
    """

    pca_dim: int = 1024
    base_dim: int = 512
    train_clips: int = 8192
    candidates: int = 2000
    projection: str = "auto"
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def fit_pca(
    vectors: np.ndarray, dim: int, seed: int = 0, iterations: int = 2, exact_limit: int = 2048
) -> np.ndarray:
    """`(d_in, dim)` float32 orthonormal columns spanning the top-`dim` uncentred principal directions of
    `vectors (n, d_in)`; `dim` is capped at `min(n, d_in)`.

    Exact (an eigendecomposition of the smaller Gram matrix) when `min(n, d_in)` is at most
    `max(2 dim, exact_limit)`; else a randomized subspace iteration (Halko et al. 2011) with
    `iterations` power steps. Both are built
    from large matrix products and eigendecompositions of small float64 matrices only: LAPACK's QR,
    which `torch.svd_lowrank` uses, is made of many short parallel sections that stall for seconds
    each on a machine whose cores are busy with other work.

    Kept over `faiss.PCAMatrix` (issue 22 item 7; uncentred there with `have_bias = False`), measured
    in one run on the video tokens of a clustered synthetic gallery (BENCHMARKS.md, `pca_fit`; 2 busy
    cores): on 2,048 training clips it fits in 13.4 s against FAISS's 56.1 s (4.2x; 4.4x on 1,024) with
    the same subspace (mean squared cosine 1.000, held-out energy 0.841 both), and a 20,000-clip
    compressed index builds in 22.8 s against 58.5 s with FAISS's PCA, recall@10 0.956 against 0.958.
    FAISS eigendecomposes the whole Gram matrix: its work grows with the cube of the training clips
    (64 times the 2,048-clip fit at the default 8,192), where the randomized iteration's grows linearly.
    """
    import torch

    data = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    rows, width = data.shape
    dim = min(dim, rows, width)
    if min(rows, width) <= max(2 * dim, exact_limit):
        if width <= rows:
            basis = _top_eigenvectors(data.T @ data, dim)
        else:
            basis = _principal_axes(data, _top_eigenvectors(data @ data.T, dim))
        return np.ascontiguousarray(basis.float().numpy())
    sketch = min(dim + 64, rows, width)
    generator = torch.Generator().manual_seed(seed)
    range_ = data @ torch.randn(width, sketch, generator=generator)
    for _ in range(iterations):
        range_ = data @ (data.T @ _orthonormal(range_))
    projected = _orthonormal(range_).T @ data  # (sketch, width): the data in the found subspace
    basis = _principal_axes(projected, _top_eigenvectors(projected @ projected.T, dim))
    return np.ascontiguousarray(basis.float().numpy())


def _eigh(matrix):
    """`torch.linalg.eigh` in float64 on one thread: a few hundred milliseconds for the sizes here, and
    several times that on two threads of cores busy with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix.double())
    finally:
        torch.set_num_threads(threads)


def _top_eigenvectors(gram, count: int):
    """The eigenvectors of the `count` largest eigenvalues of a symmetric matrix (in float64)."""
    import torch

    values, vectors = _eigh(gram)
    order = torch.argsort(values, descending=True)[:count]
    return vectors[:, order].to(gram.dtype)


def _principal_axes(data, left):
    """The right singular vectors of `data` for its left singular vectors `left`, in their order:
    `data^T left`, whose columns are orthogonal with the singular values as norms, scaled to unit norm
    and orthonormalized (Lowdin: the orthonormal columns nearest to them, so the order is kept)."""
    axes = (data.T @ left).double()
    axes = axes / axes.norm(dim=0, keepdim=True)
    values, vectors = _eigh(axes.T @ axes)  # close to the identity
    return (axes @ (vectors / values.sqrt()) @ vectors.T).to(data.dtype)


def _orthonormal(matrix):
    """Orthonormal columns spanning `matrix`'s (n, q), in some order: `M E L^(-1/2)` from a float64 eigh
    `M^T M = E L E^T` of the small Gram matrix; directions with no energy are dropped."""

    values, vectors = _eigh(matrix.T.double() @ matrix.double())
    keep = values > values.max() * 1e-12
    whiten = vectors[:, keep] / values[keep].sqrt()
    return (matrix.double() @ whiten).to(matrix.dtype)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class Projector:
    """`vectors (n, d_in)` -> `(n, dim)` float32 through the PCA basis, with PyTorch."""

    def __init__(self, basis: np.ndarray, projection: str = "auto"):
        import torch

        if projection not in ("auto", "bf16", "fp32"):
            raise ValueError(f"projection must be auto, bf16 or fp32, got {projection!r}")
        self.bf16 = projection == "bf16" or (projection == "auto" and native_bf16())
        self.basis = torch.from_numpy(basis)
        if self.bf16:
            self.basis = self.basis.bfloat16()

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        import torch

        data = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        if self.bf16:
            data = data.bfloat16()
        return (data @ self.basis).float().numpy()


def build_structure(basis: np.ndarray, projected_sample: np.ndarray, settings: CompressedSettings):
    """The FAISS chain for one modality: PCA transform (from `basis`), 4-bit scan over
    the leading coordinates and 8-bit re-scoring, its quantizers trained on `projected_sample`."""
    import faiss

    d_in, dim = basis.shape
    base_dim = max(4, min(settings.base_dim, dim) // 4 * 4)
    pca = faiss.LinearTransform(d_in, dim, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(basis.T).ravel(), pca.A)
    pca.is_trained = True
    pca.is_orthonormal = True
    sample = np.ascontiguousarray(projected_sample, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means of 16 centroids: short parallel sections stall on busy cores
    try:
        select = faiss.RemapDimensionsTransform(dim, base_dim, False)  # the first base_dim coordinates
        scan = faiss.IndexPQFastScan(base_dim, base_dim // 4, 4, faiss.METRIC_INNER_PRODUCT)
        base = faiss.IndexPreTransform(select, scan)
        base.train(sample)
        rescore = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        rescore.train(sample)
    finally:
        faiss.omp_set_num_threads(threads)
    refine = faiss.IndexRefine(base, rescore)
    refine.k_factor = 1.0
    index = faiss.IndexPreTransform(pca, refine)
    return index


def add_projected(index, projected: np.ndarray) -> None:
    """Add PCA projections (computed outside FAISS) to the chain built by `build_structure`."""
    import faiss

    inner = faiss.downcast_index(index.index)
    inner.add(np.ascontiguousarray(projected, dtype=np.float32))
    index.ntotal = inner.ntotal


def set_candidates(index, k: int, candidates: int) -> None:
    """Scan candidates per query: the `IndexRefine`'s `k_factor` for a top-`k` search."""
    import faiss

    refine = faiss.downcast_index(index.index)
    refine.k_factor = max(1.0, candidates / max(k, 1))
