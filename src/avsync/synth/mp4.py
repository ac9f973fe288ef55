"""Write an H.264 + AAC mp4 with exact, constant-rate timestamps.

The video time base is `1 / fps`, so frame `i` has pts `i` and is shown over `[i / fps, (i + 1) / fps)`;
audio pts count samples. Both encoders run single-threaded: the workers parallelize across clips, and
x264 and FFmpeg's AAC encoder are then deterministic, so the same pixels and samples give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_CHUNK = 1024  # samples per AAC frame
LAYOUTS = {1: "mono", 2: "stereo"}


def write_mp4(
    path: Path,
    frames: Iterable[np.ndarray],
    num_frames: int,
    fps: Fraction,
    audio: np.ndarray,
    sample_rate: int,
    crf: int = 18,
) -> None:
    """Encode `frames` (`(H, W, 3)` uint8 RGB) and `audio` (float32 in [-1, 1], mono `(samples,)` or
    `(channels, samples)` with 1 or 2 channels) into `path`.

    Written under a temporary name and renamed, so `path` is either absent or complete. Audio and video
    packets are interleaved in time order as a player would want them.
    """
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = 1 / fps
        video.codec_context.thread_count = 1
        video.codec_context.gop_size = max(1, round(2 * fps))  # a keyframe every 2 s, for seeking readers
        video.options = {"crf": str(crf), "preset": "veryfast"}
        audio = np.clip(np.atleast_2d(audio), -1.0, 1.0).astype(np.float32)
        if audio.shape[0] not in LAYOUTS:
            raise ValueError(f"{path}: audio must have 1 or 2 channels, got shape {audio.shape}")
        layout = LAYOUTS[audio.shape[0]]
        sound = container.add_stream("aac", rate=sample_rate, layout=layout)
        sound.codec_context.thread_count = 1
        sound.bit_rate = 64000 * audio.shape[0]

        sent = 0  # audio samples handed to the encoder so far
        count = 0
        for index, pixels in enumerate(frames):
            if index == 0:
                video.height, video.width = pixels.shape[:2]
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            frame.time_base = video.codec_context.time_base
            container.mux(video.encode(frame))
            count += 1
            until = min(audio.shape[1], round((index + 1) * sample_rate / fps))
            while sent + AUDIO_CHUNK <= until:
                sent = _send_audio(container, sound, audio, sent, sample_rate, layout)
        if count != num_frames:
            raise ValueError(f"{path}: expected {num_frames} frames, got {count}")
        while sent < audio.shape[1]:
            sent = _send_audio(container, sound, audio, sent, sample_rate, layout)
        container.mux(video.encode())
        container.mux(sound.encode())
    os.replace(partial, path)


def _send_audio(
    container: av.container.OutputContainer, stream, audio: np.ndarray, start: int, rate: int, layout: str
) -> int:
    chunk = np.ascontiguousarray(audio[:, start : start + AUDIO_CHUNK])
    frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.pts = start
    frame.time_base = Fraction(1, rate)
    container.mux(stream.encode(frame))
    return start + chunk.shape[1]
