"""Small real media files of the kinds batch jobs meet in the wild, written with PyAV.

Video frame `k` is a flat grey of level `10 k`; audio is a 440-Hz tone whose channel `c` has
amplitude `(1 + c) / channels` (so a mixdown that dropped channels would show in the spectrogram).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LAYOUTS = {1: "mono", 2: "stereo", 8: "7.1"}
#: (rows, columns) of the white block at the top left of the stored frames of a rotated video.
CORNER = (16, 24)


def write_media(
    path: Path,
    *,
    duration: float = 3.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    frame_times: list[float] | None = None,
    channels: int = 2,
    sample_rate: int = 44100,
    audio_codec: str = "aac",
    audio: np.ndarray | None = None,
    rotation: float | None = None,
) -> Path:
    """H.264 video (frames at `frame_times`, default every `1 / fps` s) and an audio track
    (`audio`: `(channels, samples)` float32, default the tone; `channels=0`: none). The container
    follows the suffix: `.mkv` also takes PCM audio. `rotation`: a display matrix rotating the picture
    by that many degrees counterclockwise (`ffmpeg -display_rotation`; a phone's portrait video: -90);
    the frames then carry a white `CORNER` block at the top left of the stored picture."""
    times = frame_times if frame_times is not None else [k / fps for k in range(round(duration * fps))]
    with av.open(str(path), mode="w") as output:
        picture = output.add_stream("libx264", rate=fps)
        picture.width, picture.height, picture.pix_fmt = size[0], size[1], "yuv420p"
        picture.options = {"preset": "ultrafast"}
        picture.time_base = picture.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            picture.set_display_rotation(rotation)
        sound = (
            output.add_stream(audio_codec, rate=sample_rate, layout=LAYOUTS[channels]) if channels else None
        )
        for k, time in enumerate(times):
            level = (10 * k) % 256
            pixels = np.full((size[1], size[0], 3), level, np.uint8)
            if rotation is not None:
                pixels[: CORNER[0], : CORNER[1]] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = round(time * 1000), Fraction(1, 1000)
            output.mux(picture.encode(frame))
        output.mux(picture.encode())
        if sound is not None:
            samples = tone(duration, sample_rate, channels) if audio is None else audio
            _write_audio(output, sound, samples, sample_rate)
    return path


def tone(duration: float, sample_rate: int, channels: int) -> np.ndarray:
    count = int(duration * sample_rate)
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(count) / sample_rate)).astype(np.float32)
    return np.stack([wave * (1 + c) / channels for c in range(channels)])


def _write_audio(output, stream, samples: np.ndarray, sample_rate: int) -> None:
    layout = stream.layout.name
    for offset in range(0, samples.shape[1], 1024):
        interleaved = samples[:, offset : offset + 1024].T.reshape(
            1, -1
        )  # packed: PyAV's planar input stops at 8
        block = av.AudioFrame.from_ndarray(np.ascontiguousarray(interleaved), format="flt", layout=layout)
        block.sample_rate, block.time_base, block.pts = sample_rate, Fraction(1, sample_rate), offset
        output.mux(stream.encode(block))
    output.mux(stream.encode())
