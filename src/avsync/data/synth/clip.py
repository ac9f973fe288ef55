"""One synthetic clip: its timeline, pixels and sound, its mp4, masks and ground-truth annotation.

A clip depends only on the config and its index (its random streams are seeded by `(seed, index)`), so
any worker can make any clip and the set does not depend on how the work was split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avsync.data.alignment import frame_times
from avsync.data.synth.classes import SynthClass, class_catalogue
from avsync.data.synth.config import SynthConfig
from avsync.data.synth.mp4 import write_mp4
from avsync.data.synth.render import (
    background_hiss,
    draw_object,
    place_object,
    render_background,
    render_sound,
)
from avsync.data.synth.timeline import Event, sample_timeline


@dataclass(frozen=True)
class ClipRecord:
    """What the set needs to know about a written clip: its id and the classes it contains."""

    clip_id: str
    class_indices: tuple[int, ...]
    num_events: int


def clip_id(seed: int, index: int) -> str:
    return f"synth_s{seed}_{index:05d}"


def video_path(out_dir: Path, clip: str) -> Path:
    return out_dir / "videos" / f"{clip}.mp4"


def annotation_path(out_dir: Path, clip: str) -> Path:
    return out_dir / "annotations" / f"{clip}.json"


def mask_path(out_dir: Path, clip: str, frame: int) -> Path:
    return out_dir / "masks" / clip / f"f{frame:02d}.png"


def shown_frame(time: float, fps: float, num_frames: int) -> int:
    """Index of the video frame on screen at `time` (pts <= time < next pts)."""
    return min(num_frames - 1, math.floor(time * fps + 1e-9))


def write_clip(out_dir: Path, config: SynthConfig, index: int) -> ClipRecord:
    """Render clip `index` of the set and write its video, masks and annotation under `out_dir`."""
    classes = class_catalogue(config.classes)
    timeline_rng, picture_rng, sound_rng = np.random.default_rng([config.seed, index]).spawn(3)
    name = clip_id(config.seed, index)
    times = frame_times(config.duration, config.annotated_frames)
    events = sample_timeline(
        timeline_rng,
        config.num_video_frames,
        config.fps,
        config.classes,
        config.events,
        config.min_event,
        protected_times=times,
    )

    background = render_background(picture_rng, config.size)
    scenes = []  # per event: the frame before sensor noise, and the object's mask
    for event in events:
        box = place_object(picture_rng, config.size)
        scenes.append(
            draw_object(background, classes[event.class_index], box, picture_rng.uniform(0.85, 1.0))
        )

    audio = _soundtrack(config, classes, events, sound_rng)
    path = video_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(
        path,
        _frames(events, scenes, config.video_noise, picture_rng),
        config.num_video_frames,
        config.fps,
        audio,
        config.sample_rate,
        config.crf,
    )

    shown = [shown_frame(t, float(config.fps), config.num_video_frames) for t in times]
    shown_events = [_event_at(events, frame) for frame in shown]
    for i, event_index in enumerate(shown_events):
        target = mask_path(out_dir, name, i)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scenes[event_index][1].astype(np.uint8) * 255, "L").save(target)

    annotation = _annotation(config, classes, name, events, scenes, times, shown, shown_events)
    target = annotation_path(out_dir, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(annotation, indent=1) + "\n")
    present = tuple(sorted({event.class_index for event in events}))
    return ClipRecord(name, present, len(events))


def _frames(
    events: list[Event], scenes: list[tuple[np.ndarray, np.ndarray]], noise: float, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Every video frame in order: the event's scene plus sensor noise that changes every frame.

    The noise of each frame is a randomly placed crop of one field twice the frame's side, which is
    several times cheaper than drawing fresh noise per frame and looks the same.
    """
    size = scenes[0][0].shape[0]
    field = rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32) * noise + 0.5
    for event, (scene, _) in zip(events, scenes, strict=True):
        for _ in range(event.start_frame, event.end_frame):
            y, x = rng.integers(0, size + 1, 2)
            yield np.clip(scene + field[y : y + size, x : x + size], 0, 255).astype(np.uint8)


def _soundtrack(
    config: SynthConfig, classes: list[SynthClass], events: list[Event], rng: np.random.Generator
) -> np.ndarray:
    """Hiss under the whole clip plus each event's sound over exactly the event's frames."""
    audio = background_hiss(rng, config.num_audio_samples, config.audio_snr_db)
    for event in events:
        start, end = (_sample_index(frame, config) for frame in (event.start_frame, event.end_frame))
        audio[start:end] += render_sound(classes[event.class_index], rng, end - start, config.sample_rate)
    return audio


def _sample_index(frame: int, config: SynthConfig) -> int:
    return min(config.num_audio_samples, round(frame * config.sample_rate / config.fps))


def _event_at(events: list[Event], frame: int) -> int:
    return next(i for i, event in enumerate(events) if event.start_frame <= frame < event.end_frame)


def _annotation(
    config: SynthConfig,
    classes: list[SynthClass],
    name: str,
    events: list[Event],
    scenes: list[tuple[np.ndarray, np.ndarray]],
    times: list[float],
    shown: list[int],
    shown_events: list[int],
) -> dict[str, Any]:
    fps = config.fps
    return {
        "clip_id": name,
        "video": f"videos/{name}.mp4",
        "duration": config.duration,
        "fps": str(fps),
        "num_video_frames": config.num_video_frames,
        "sample_rate": config.sample_rate,
        "size": [config.size, config.size],
        "labels": [classes[k].mid for k in sorted({event.class_index for event in events})],
        "events": [
            {
                "start": float(event.start_frame / fps),
                "end": float(event.end_frame / fps),
                "start_frame": event.start_frame,
                "end_frame": event.end_frame,
                "class_index": event.class_index,
                "mid": classes[event.class_index].mid,
                "box": list(_bounding_box(mask)),
            }
            for event, (_, mask) in zip(events, scenes, strict=True)
        ],
        "frames": {
            "times": times,
            "video_frames": shown,
            "class_indices": [events[e].class_index for e in shown_events],
            "masks": [mask_path(Path(), name, i).as_posix() for i in range(len(times))],
        },
    }


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)` of the mask's pixels, end-exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
