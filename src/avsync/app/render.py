"""Pictures and playable video of an analysis: heat maps over frames, held for their audio windows.

The video is WebM (VP9 + Opus), which every browser plays: frame `t` is shown from its time in the
clip until the next frame's, with the clip's own sound underneath, so a person sees the map move as
the sound does.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from avsync.data.audio import decode_audio
from avsync.data.media import open_media

#: Display height of frames (the tiny model's 96-px inputs are enlarged to this).
DISPLAY = 256
AUDIO_RATE = 48000  # Opus's native rate


def heat_overlay(frames: np.ndarray, maps: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`(T, S, S, 3)` uint8 frames with `maps` `(T, h, w)` laid over them in jet colours; the maps are
    upsampled (bilinear) and scaled to [0, 1] by their joint min and max, so frames compare."""
    size = frames.shape[1]
    grid = torch.from_numpy(np.asarray(maps, dtype=np.float32))[:, None]
    upsampled = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    low, high = float(upsampled.min()), float(upsampled.max())
    scaled = (upsampled - low) / (high - low) if high > low else np.zeros_like(upsampled)
    colours = matplotlib.colormaps["jet"](scaled)[..., :3]
    blended = (1 - alpha) * frames.astype(np.float32) / 255 + alpha * colours
    return (blended.clip(0, 1) * 255).round().astype(np.uint8)


def enlarge(frame: np.ndarray, height: int = DISPLAY) -> Image.Image:
    image = Image.fromarray(frame)
    if image.height >= height:
        return image
    return image.resize((round(image.width * height / image.height), height), Image.Resampling.BILINEAR)


def frame_strip(frames: np.ndarray, times: list[float], columns: int = 8, height: int = 128) -> Image.Image:
    """The frames in a grid of `columns`, each labelled with its time in the clip."""
    tiles = [enlarge(frame, height) for frame in frames]
    width = tiles[0].width
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, time) in enumerate(zip(tiles, times, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + 14)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + height + 1), f"{time:.2f} s", fill="black")
    return sheet


def read_sound(path: str | Path, max_seconds: float) -> np.ndarray:
    """The mono waveform of `path` at `AUDIO_RATE` (what the overlay video plays)."""
    with open_media(path) as container:
        return decode_audio(container, path, AUDIO_RATE, "mean", max_seconds).samples.astype(np.float32)


def overlay_video(
    frames: np.ndarray, times: list[float], duration: float, sound: np.ndarray, out: str | Path
) -> Path:
    """A WebM of `frames` (each held from `times[t]` to the next time) over the first `duration` s of
    `sound` (mono, `AUDIO_RATE`)."""
    out = Path(out)
    first = enlarge(frames[0])
    width, height = first.width - first.width % 2, first.height - first.height % 2
    samples = np.asarray(sound[: int(duration * AUDIO_RATE)], dtype=np.float32)
    with av.open(os.fspath(out), "w", format="webm") as container:
        # VP9 in real-time mode: 5x less CPU than VP8 at its defaults for these 17 pictures (measured)
        video = container.add_stream("libvpx-vp9", rate=2)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        video.bit_rate = 1_000_000
        video.options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
        audio = container.add_stream("libopus", rate=AUDIO_RATE, layout="mono")
        for time, frame in zip([*times, duration], [*frames, frames[-1]], strict=True):
            picture = av.VideoFrame.from_image(enlarge(frame).resize((width, height)))
            picture.pts, picture.time_base = round(time * 1000), Fraction(1, 1000)
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        step = 960  # Opus frames of 20 ms
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            if len(chunk) < step:
                chunk = np.pad(chunk, (0, step - len(chunk)))
            sound = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            sound.sample_rate, sound.pts = AUDIO_RATE, start
            container.mux(audio.encode(sound))
        container.mux(audio.encode(None))
    return out
