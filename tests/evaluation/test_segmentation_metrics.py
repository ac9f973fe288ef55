"""Temporal segmentation: clustering to K segments, adjusted Rand index and boundary F1."""

from __future__ import annotations

import numpy as np
import pytest

from avsync.evaluation.segmentation import (
    adjusted_rand_index,
    boundaries,
    boundary_f1,
    choose_segment_count,
    first_appearance_order,
    segment_frames,
)


def clustered_features(labels: list[int], spread: float = 0.05, seed: int = 0) -> np.ndarray:
    """Per-frame features: a far-apart centre per label plus small noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(labels) + 1, 8)) * 5
    return centres[labels] + spread * rng.normal(size=(len(labels), 8))


def test_boundaries_are_label_changes_between_consecutive_frames():
    assert boundaries([0, 0, 1, 1, 1, 0, 2]).tolist() == [2, 5, 6]
    assert boundaries([3, 3, 3]).tolist() == []


def test_boundary_f1_matches_within_one_frame_by_default():
    truth = [0] * 4 + [1] * 6 + [2] * 6  # boundaries at 4 and 10
    predicted = [0] * 5 + [1] * 7 + [2] * 4  # boundaries at 5 (1 off) and 12 (2 off)
    score = boundary_f1(truth, predicted)
    assert (score.matched, score.precision, score.recall, score.f1) == (1, 0.5, 0.5, 0.5)
    assert boundary_f1(truth, predicted, tolerance=2).f1 == 1.0
    assert boundary_f1(truth, predicted, tolerance=0).f1 == 0.0
    assert boundary_f1(truth, truth, tolerance=0).f1 == 1.0


def test_boundary_matches_are_one_to_one():
    truth = [0] * 4 + [1] * 4  # one boundary, at 4
    predicted = [0] * 3 + [1] + [2] * 4  # boundaries at 3 and 4: both within reach of the same one
    score = boundary_f1(truth, predicted)
    assert (score.matched, score.precision, score.recall) == (1, 0.5, 1.0)
    assert score.f1 == pytest.approx(2 / 3)


def test_boundary_f1_without_boundaries():
    assert boundary_f1([1, 1, 1], [0, 0, 0]).f1 == 1.0  # both: one segment
    assert boundary_f1([1, 1, 1], [0, 1, 1]).f1 == 0.0
    assert boundary_f1([0, 1, 1], [2, 2, 2]).f1 == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        boundary_f1([0, 1], [0, 1, 1])


def test_adjusted_rand_index_ignores_label_names_and_penalizes_splits():
    truth = [0, 0, 0, 1, 1, 1, 0, 0]
    assert adjusted_rand_index(truth, [5, 5, 5, 2, 2, 2, 5, 5]) == pytest.approx(1.0)
    split = adjusted_rand_index(truth, [0, 0, 0, 1, 1, 1, 2, 2])  # the recurring event cut off
    assert 0 < split < 1
    assert adjusted_rand_index(truth, [0] * 8) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_rand_index([0, 1], [0])


def test_ids_are_renumbered_by_first_appearance():
    assert first_appearance_order([3, 3, 1, 3, 0, 1]).tolist() == [0, 0, 1, 0, 2, 1]


def test_clustering_finds_k_segments_and_recovers_separated_events():
    truth = [0] * 4 + [1] * 5 + [0] * 3 + [2] * 4  # event 0 recurs
    features = clustered_features(truth)
    result = segment_frames(features, 3)
    assert result.method == "agglomerative" and result.threshold is not None
    assert result.labels.tolist() == first_appearance_order(truth).tolist()
    for k in (1, 2, 5, 16):
        assert len(set(segment_frames(features, k).labels.tolist())) == k
    with pytest.raises(ValueError, match="segments"):
        segment_frames(features, 17)


def test_contiguous_segments_are_runs():
    truth = [0] * 5 + [1] * 5 + [0] * 6
    features = clustered_features(truth)
    free = segment_frames(features, 2)
    assert free.labels.tolist() == truth  # the recurring event is one cluster
    runs = segment_frames(features, 3, contiguous=True)
    assert runs.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 6
    two_runs = segment_frames(features, 2, contiguous=True).labels
    assert len(boundaries(two_runs)) == 1


def test_tied_merge_heights_fall_back_to_kmeans():
    corners = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # every nearest distance is 1
    result = segment_frames(corners, 3, linkage="single")
    assert result.method == "kmeans"
    assert len(set(result.labels.tolist())) == 3
    assert segment_frames(corners, 4, linkage="single").method == "agglomerative"


@pytest.mark.parametrize(
    "truth",
    [
        [0] * 8 + [1] * 8,
        [0] * 5 + [1] * 6 + [2] * 5,
        [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4,
        [0] * 5 + [1] * 6 + [0] * 5,
    ],
)
def test_the_silhouette_chooses_the_number_of_events(truth):
    choice = choose_segment_count(clustered_features(truth, spread=0.5))
    assert choice.count == len(set(truth))
    assert set(choice.silhouettes) == set(range(2, 9))
    assert choice.silhouettes[choice.count] == max(choice.silhouettes.values())


def test_the_segment_count_choice_is_bounded_by_the_clip():
    features = clustered_features([0, 0, 1, 1, 2])
    assert set(choose_segment_count(features, max_segments=8).silhouettes) == {2, 3, 4}  # K <= T - 1
    assert choose_segment_count(features, max_segments=2).count == 2
    assert choose_segment_count(clustered_features([0, 1]), max_segments=8).count == 2  # no choice to make
    with pytest.raises(ValueError, match="max_segments"):
        choose_segment_count(features, max_segments=1)
