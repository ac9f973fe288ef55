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
from avsync.synth.classes import SynthClass, class_catalogue
from avsync.synth.config import SynthConfig
from avsync.synth.mp4 import write_mp4
from avsync.synth.render import (
    background_hiss,
    draw_object,
    place_object,
    render_background,
    render_sound,
)
from avsync.synth.speechlike import MovingScenes, background_noise, pan, render_speech, speech_catalogue
from avsync.synth.timeline import Event, sample_timeline


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


class StillScenes:
    """The pictures of a tones clip: per event, the class object at a fixed place on one background."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], classes, events: list[Event]) -> None:
        self.events = events
        background = render_background(rng, size)
        self.scenes = []  # per event: the frame before sensor noise, and the object's mask
        for event in events:
            box = place_object(rng, size)
            self.scenes.append(
                draw_object(background, classes[event.class_index], box, rng.uniform(0.85, 1.0))
            )

    def render(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        return self.scenes[_event_at(self.events, frame)]


def catalogue(config: SynthConfig) -> list[SynthClass]:
    """The class designs of the config's kind."""
    return (
        speech_catalogue(config.classes) if config.kind == "speechlike" else class_catalogue(config.classes)
    )


def render_clip(
    config: SynthConfig,
    classes: list[SynthClass],
    events: list[Event],
    picture_rng: np.random.Generator,
    sound_rng: np.random.Generator,
) -> tuple[StillScenes | MovingScenes, np.ndarray]:
    """The kind-specific part of a clip: its pictures (`.render(frame) -> (pixels, mask)`) and its
    soundtrack `(channels, samples)`. Everything else (timeline, noise, files, ground truth) is shared."""
    size = (config.size, config.frame_height)
    if config.kind == "speechlike":
        pictures = MovingScenes(picture_rng, size, classes, events)
        audio = background_noise(sound_rng, config.num_audio_samples, config.sample_rate, config.audio_snr_db)
        for i, event in enumerate(events):
            start, end = (_sample_index(frame, config) for frame in (event.start_frame, event.end_frame))
            voice = render_speech(classes[event.class_index], sound_rng, end - start, config.sample_rate)
            audio[:, start:end] += pan(voice, pictures.pan_track(i, end - start))
        if config.channels == 1:
            audio = audio.mean(axis=0, keepdims=True)
        return pictures, audio
    pictures = StillScenes(picture_rng, size, classes, events)
    audio = _soundtrack(config, classes, events, sound_rng)[None]
    return pictures, np.repeat(audio, config.channels, axis=0)


def write_clip(out_dir: Path, config: SynthConfig, index: int) -> ClipRecord:
    """Render clip `index` of the set and write its video, masks and annotation under `out_dir`."""
    classes = catalogue(config)
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
    pictures, audio = render_clip(config, classes, events, picture_rng, sound_rng)
    path = video_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(
        path,
        _frames(pictures, config, picture_rng),
        config.num_video_frames,
        config.fps,
        audio,
        config.sample_rate,
        config.crf,
    )

    shown = [shown_frame(t, float(config.fps), config.num_video_frames) for t in times]
    masks = [pictures.render(frame)[1] for frame in shown]
    for i, mask in enumerate(masks):
        target = mask_path(out_dir, name, i)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(target)

    boxes = [_event_box(pictures, event) for event in events]
    annotation = _annotation(config, classes, name, events, boxes, times, shown, masks)
    target = annotation_path(out_dir, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(annotation, indent=1) + "\n")
    present = tuple(sorted({event.class_index for event in events}))
    return ClipRecord(name, present, len(events))


def _event_box(pictures: StillScenes | MovingScenes, event: Event) -> tuple[int, int, int, int]:
    """The bounding box of every pixel the event's object covers: the union of its first and last
    frames' boxes (objects move along straight lines, so every frame in between lies inside)."""
    boxes = [_bounding_box(pictures.render(frame)[1]) for frame in (event.start_frame, event.end_frame - 1)]
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _frames(
    pictures: StillScenes | MovingScenes, config: SynthConfig, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Every video frame in order: the frame's picture plus sensor noise that changes every frame.

    The noise of each frame is a randomly placed crop of one field twice the frame's size, which is
    several times cheaper than drawing fresh noise per frame and looks the same.
    """
    width, height = config.size, config.frame_height
    field = rng.standard_normal((2 * height, 2 * width, 3), dtype=np.float32) * config.video_noise + 0.5
    for frame in range(config.num_video_frames):
        picture, _ = pictures.render(frame)
        if width == height:
            y, x = rng.integers(0, width + 1, 2)
        else:
            y, x = rng.integers(0, [height + 1, width + 1])
        yield np.clip(picture + field[y : y + height, x : x + width], 0, 255).astype(np.uint8)


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
    boxes: list[tuple[int, int, int, int]],
    times: list[float],
    shown: list[int],
    masks: list[np.ndarray],
) -> dict[str, Any]:
    fps = config.fps
    return {
        "clip_id": name,
        "kind": config.kind,
        "video": f"videos/{name}.mp4",
        "duration": config.duration,
        "fps": str(fps),
        "num_video_frames": config.num_video_frames,
        "sample_rate": config.sample_rate,
        "channels": config.channels,
        "size": [config.size, config.frame_height],
        "labels": [classes[k].mid for k in sorted({event.class_index for event in events})],
        "events": [
            {
                "start": float(event.start_frame / fps),
                "end": float(event.end_frame / fps),
                "start_frame": event.start_frame,
                "end_frame": event.end_frame,
                "class_index": event.class_index,
                "mid": classes[event.class_index].mid,
                "box": list(box),
            }
            for event, box in zip(events, boxes, strict=True)
        ],
        "frames": {
            "times": times,
            "video_frames": shown,
            "class_indices": [events[_event_at(events, frame)].class_index for frame in shown],
            "boxes": [list(_bounding_box(mask)) for mask in masks],
            "masks": [mask_path(Path(), name, i).as_posix() for i in range(len(times))],
        },
    }


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)` of the mask's pixels, end-exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
