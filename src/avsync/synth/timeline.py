"""A clip's event timeline: which class sounds (and is shown) when.

Boundaries lie on the video frame grid, so every frame shows exactly one event and the audio switches
at the same instant as the picture. They also avoid the frames around the annotated frame times (SPEC
§1), so the ground truth at those times does not depend on whether a reader takes the frame on screen
at `t`, the first frame at or after `t`, or the nearest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

#: How often to redraw boundaries before settling for one event fewer.
_ATTEMPTS = 1000
#: Frame positions closer than this to a whole frame may be read as either neighbour.
_ROUNDING = 1e-6


@dataclass(frozen=True)
class Event:
    """Frames `[start_frame, end_frame)` show class `class_index` and its sound plays over the same span."""

    start_frame: int
    end_frame: int
    class_index: int


def allowed_boundaries(
    num_frames: int, fps: Fraction, protected_times: Sequence[float], min_frames: int
) -> np.ndarray:
    """Frame indices where an event may start: `min_frames` from both clip ends, and never between the
    frame on screen at a protected time and the first frame at or after it (with a margin for float
    rounding of the time), so that every reading of "the frame at t" sees the same event."""
    candidates = np.arange(min_frames, num_frames - min_frames + 1)
    if len(protected_times) == 0 or len(candidates) == 0:
        return candidates
    position = np.asarray(protected_times, dtype=np.float64) * float(fps)
    earliest, latest = np.floor(position - _ROUNDING), np.ceil(position + _ROUNDING)
    splits = (candidates[:, None] > earliest[None, :]) & (candidates[:, None] <= latest[None, :])
    return candidates[~splits.any(axis=1)]


def sample_timeline(
    rng: np.random.Generator,
    num_frames: int,
    fps: Fraction,
    num_classes: int,
    event_count: tuple[int, int],
    min_event: float,
    protected_times: Sequence[float] = (),
) -> list[Event]:
    """Draw 'event_count' (inclusive range) events, each at least `min_event` seconds long.

    Consecutive events have different classes (when there are two or more), so every boundary is a real
    change of both picture and sound. If the clip is too short for the drawn number of events, fewer are used.
    """
    min_frames = max(1, int(np.ceil(min_event * fps - 1e-9)))
    wanted = int(rng.integers(event_count[0], event_count[1] + 1))
    candidates = allowed_boundaries(num_frames, fps, protected_times, min_frames)
    starts = [0]
    for count in range(min(wanted, num_frames // min_frames), 1, -1):
        if len(candidates) < count - 1:
            continue
        found = _draw_boundaries(rng, candidates, count - 1, num_frames, min_frames)
        if found is not None:
            starts = [0, *found]
            break
    ends = [*starts[1:], num_frames]
    classes = _draw_classes(rng, num_classes, len(starts))
    return [Event(start, end, k) for start, end, k in zip(starts, ends, classes, strict=True)]


def _draw_boundaries(
    rng: np.random.Generator, candidates: np.ndarray, count: int, num_frames: int, min_frames: int
) -> list[int] | None:
    for _ in range(_ATTEMPTS):
        boundaries = np.sort(rng.choice(candidates, size=count, replace=False))
        lengths = np.diff(np.concatenate([[0], boundaries, [num_frames]]))
        if lengths.min() >= min_frames:
            return [int(b) for b in boundaries]
    return None


def _draw_classes(rng: np.random.Generator, num_classes: int, count: int) -> list[int]:
    classes = [int(rng.integers(num_classes))]
    for _ in range(count - 1):
        if num_classes == 1:
            classes.append(0)
            continue
        step = int(rng.integers(1, num_classes))  # anything but the previous class
        classes.append((classes[-1] + step) % num_classes)
    return classes
