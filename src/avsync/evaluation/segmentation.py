"""Temporal segmentation of one clip (supplementary §11) and its agreement with ground truth, as pure
functions on per-frame features and label sequences.

Segmenting: agglomerative clustering of the `T` per-frame features with a distance threshold chosen so
that it yields exactly `K` clusters (the paper adjusts the threshold until it does). The threshold is read
off the dendrogram: with merge heights sorted in decreasing order `d_1 >= d_2 >= ...`, any threshold in
`(d_K, d_{K-1}]` keeps exactly `K` clusters (what a bisection on the threshold converges to). When no
threshold does (tied heights), K-means with `K` clusters is the fallback. Segment ids are renumbered in
order of first appearance, so frame 0 is always in segment 0.

Choosing K when it is not known: `choose_segment_count` segments the clip for every K in 2..K_max and
keeps the K with the highest silhouette score (mean over frames of how much closer a frame is to its own
segment than to the nearest other one; ties go to the smaller K). The silhouette is undefined for one
segment, so a clip is never left whole by this choice; the paper instead fixes K per clip by hand.

By default the clustering ignores time, as in the paper: a segment id may recur (A B A), so "K segments"
means K clusters. `contiguous=True` restricts merges to neighbouring frames (a chain connectivity
graph): every cluster is then one run of frames.

Agreement:
- adjusted Rand index of the frame partitions (scikit-learn; invariant to how ids are numbered);
- boundary F1: a boundary at `b` means frames `b - 1` and `b` differ; predicted and true boundaries
  are matched one-to-one when at most `tolerance` frames apart (default 1), and precision, recall and
  F1 count the matches. Two sequences without any boundary agree perfectly (1, 1, 1); a side without
  boundaries against one with boundaries scores F1 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.sparse import diags
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

Linkage = Literal["ward", "complete", "average", "single"]


@dataclass
class Segmentation:
    """Segment id per frame, and which method produced them (`agglomerative` or `kmeans`)."""

    labels: np.ndarray
    method: str
    threshold: float | None = None


def first_appearance_order(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Renumber ids in order of first appearance: `[3, 3, 1, 3, 0]` -> `[0, 0, 1, 0, 2]`."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].reshape(labels.shape)


def chain_connectivity(num_frames: int):
    """Sparse adjacency of frames in time order: each frame is connected to its neighbours."""
    return diags([np.ones(num_frames - 1), np.ones(num_frames - 1)], [-1, 1], shape=(num_frames, num_frames))


def segment_frames(
    features: np.ndarray,
    num_segments: int = 5,
    linkage: Linkage = "ward",
    contiguous: bool = False,
    seed: int = 0,
) -> Segmentation:
    """Segment ids `(T,)` for per-frame `features` `(T, D)` (see the module docstring)."""
    features = np.asarray(features, dtype=np.float64)
    frames = len(features)
    if features.ndim != 2 or frames < 1:
        raise ValueError(f"features must be (T, D) with T >= 1, got shape {features.shape}")
    if not 1 <= num_segments <= frames:
        raise ValueError(f"cannot cut {frames} frames into {num_segments} segments")
    if frames == 1:
        return Segmentation(np.zeros(1, dtype=np.int64), "agglomerative")
    connectivity = chain_connectivity(frames) if contiguous else None
    tree = AgglomerativeClustering(
        n_clusters=None,
        distance_threshold=0.0,
        linkage=linkage,
        connectivity=connectivity,
        compute_distances=True,
    ).fit(features)
    threshold = _threshold_for(np.sort(tree.distances_)[::-1], num_segments)
    if threshold is not None:
        clustering = AgglomerativeClustering(
            n_clusters=None, distance_threshold=threshold, linkage=linkage, connectivity=connectivity
        ).fit(features)
        if clustering.n_clusters_ == num_segments:
            return Segmentation(first_appearance_order(clustering.labels_), "agglomerative", threshold)
    labels = KMeans(num_segments, n_init=10, random_state=seed).fit_predict(features)
    return Segmentation(first_appearance_order(labels), "kmeans")


@dataclass
class SegmentCount:
    """The number of segments chosen for a clip, and the silhouette score of every candidate."""

    count: int
    silhouettes: dict[int, float]


def choose_segment_count(
    features: np.ndarray,
    max_segments: int = 8,
    linkage: Linkage = "ward",
    contiguous: bool = False,
) -> SegmentCount:
    """The K in 2..`max_segments` whose segmentation has the highest silhouette score (see the module
    docstring); a clip of fewer than 3 frames gets one segment per frame."""
    features = np.asarray(features, dtype=np.float64)
    frames = len(features)
    if max_segments < 2:
        raise ValueError(f"max_segments must be at least 2 to choose among counts, got {max_segments}")
    candidates = range(2, min(max_segments, frames - 1) + 1)
    if not candidates:
        return SegmentCount(max(frames, 1), {})
    silhouettes = {}
    for count in candidates:
        labels = segment_frames(features, count, linkage, contiguous).labels
        silhouettes[count] = float(silhouette_score(features, labels)) if len(set(labels)) > 1 else -1.0
    best = max(silhouettes, key=lambda count: (silhouettes[count], -count))
    return SegmentCount(best, silhouettes)


def _threshold_for(heights: np.ndarray, clusters: int) -> float | None:
    """A distance threshold leaving `clusters` clusters, given merge heights in decreasing order.

    scikit-learn keeps one cluster more than the number of merges at or above the threshold, so the
    threshold must lie in `(heights[clusters - 1], heights[clusters - 2]]`; the midpoint is taken.
    """
    upper = heights[clusters - 2] if clusters >= 2 else np.inf
    lower = heights[clusters - 1] if clusters - 1 < len(heights) else 0.0
    if clusters - 1 == len(heights):  # every frame its own cluster: any threshold up to the lowest merge
        return float(upper) if upper > 0 else None
    if not upper > lower:
        return None
    return float(lower + 1.0) if np.isinf(upper) else float((lower + upper) / 2)


def adjusted_rand_index(truth: Sequence[int], predicted: Sequence[int]) -> float:
    """Adjusted Rand index of two labelings of the same frames (1 = same partition, ~0 = chance)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if truth.shape != predicted.shape:
        raise ValueError(f"label sequences differ in length: {truth.shape} vs {predicted.shape}")
    return float(adjusted_rand_score(truth, predicted))


def boundaries(labels: Sequence[int]) -> np.ndarray:
    """Frame indices `b` where `labels[b] != labels[b - 1]`."""
    labels = np.asarray(labels)
    return np.flatnonzero(labels[1:] != labels[:-1]) + 1


@dataclass
class BoundaryScore:
    precision: float
    recall: float
    f1: float
    matched: int


def boundary_f1(truth: Sequence[int], predicted: Sequence[int], tolerance: int = 1) -> BoundaryScore:
    """Boundary precision, recall and F1 with one-to-one matches at most `tolerance` frames apart.

    Matching is greedy in time order (each predicted boundary takes the earliest free true boundary
    within reach), which is a maximum matching for intervals on a line.
    """
    if len(truth) != len(predicted):
        raise ValueError(f"label sequences differ in length: {len(truth)} vs {len(predicted)}")
    true_bounds, predicted_bounds = boundaries(truth), boundaries(predicted)
    if len(true_bounds) == 0 and len(predicted_bounds) == 0:
        return BoundaryScore(1.0, 1.0, 1.0, 0)
    matched, next_true = 0, 0
    for bound in predicted_bounds:
        while next_true < len(true_bounds) and true_bounds[next_true] < bound - tolerance:
            next_true += 1
        if next_true < len(true_bounds) and abs(true_bounds[next_true] - bound) <= tolerance:
            matched += 1
            next_true += 1
    precision = matched / len(predicted_bounds) if len(predicted_bounds) else 1.0
    recall = matched / len(true_bounds) if len(true_bounds) else 1.0
    f1 = 2 * precision * recall / (precision + recall) if matched else 0.0
    return BoundaryScore(precision, recall, f1, matched)
