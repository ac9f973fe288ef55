"""Fixtures of the data tests: small real media files written with PyAV, and real tar shards.

Generated clips show frame `k` as a flat grey of level `FRAME_LEVEL_STEP * k`, so that a test can tell
from decoded pixels which frame was taken; their audio is a 440-Hz tone.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torchaudio.compliance import kaldi

from avsync.data.images import encode_jpeg
from avsync.data.schema import SCHEMA_VERSION, encode_sample, sample_key
from avsync.data.shard_writer import ShardWriter

FRAME_LEVEL_STEP = 6  # 40 frames stay below 256
REAL_CLIPS = ("00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4")


def write_clip(
    path: Path,
    duration: float = 3.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    audio: bool = True,
    video: bool = True,
    sample_rate: int = 44100,
    channels: int = 2,
    video_times: list[float] | None = None,
    start: float = 0.0,
    container_options: dict | None = None,
) -> Path:
    """An H.264 + AAC file (either stream can be left out). `video_times`: frame presentation times
    (variable frame rate), else `k / fps`; `start` shifts every timestamp (a stream not starting at 0)."""
    times = video_times if video_times is not None else [k / fps for k in range(round(duration * fps))]
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), mode="w", options=container_options or {}) as output:
        picture = output.add_stream("libx264", rate=fps) if video else None  # all streams before muxing
        sound = output.add_stream("aac", rate=sample_rate, layout=layout) if audio else None
        if picture is not None:
            _write_video(output, picture, times, size, start)
        if sound is not None:
            _write_tone(output, sound, duration, sample_rate, channels, start)
    return path


def _write_video(output, stream, times: list[float], size: tuple[int, int], start: float) -> None:
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    stream.options = {"preset": "ultrafast", "bf": "0"}
    stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
    for k, time in enumerate(times):
        level = (FRAME_LEVEL_STEP * k) % 256
        frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), level, np.uint8), format="rgb24")
        frame.pts, frame.time_base = round((time + start) * 1000), Fraction(1, 1000)
        output.mux(stream.encode(frame))
    output.mux(stream.encode())


def _write_tone(output, stream, duration: float, sample_rate: int, channels: int, start: float) -> None:
    """A 440-Hz tone; channel `c` has amplitude `(1 + c) / channels`, so that channels differ."""
    layout = stream.layout.name
    count = int(duration * sample_rate)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(count) / sample_rate)).astype(np.float32)
    planes = np.stack([tone * (1 + c) / channels for c in range(channels)])
    for offset in range(0, count, 1024):
        block = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(planes[:, offset : offset + 1024]), format="fltp", layout=layout
        )
        block.sample_rate, block.time_base = sample_rate, Fraction(1, sample_rate)
        block.pts = offset + round(start * sample_rate)
        output.mux(stream.encode(block))
    output.mux(stream.encode())


@pytest.fixture
def real_clips_dir(tmp_path, shared) -> Path:
    """A directory holding copies of the two real clips of ../shared/data/videos."""
    directory = tmp_path / "real"
    directory.mkdir()
    for name in REAL_CLIPS:
        shutil.copy(shared("data", "videos", name), directory / name)
    return directory


def write_shards(
    directory: Path,
    clips_per_shard: list[int],
    fbank_frames: int | list[int] = 300,
    num_classes: int = 3,
    num_frames: int = 16,
    image_size: tuple[int, int] = (40, 32),
) -> list[str]:
    """Real shards (through `ShardWriter`) of synthetic clips and their manifest; returns the clip ids.

    Clip `c`: frame `i` is grey level `16 * i`; spectrogram row `t` is all `t` (so a window shows which
    rows it holds); labels `[c % num_classes]`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    frames = [
        encode_jpeg(np.full((image_size[1], image_size[0], 3), 16 * i, np.uint8)) for i in range(num_frames)
    ]
    ids, shards, clip = [], [], 0
    for index, count in enumerate(clips_per_shard):
        writer = ShardWriter(directory, index, max_bytes=None, max_clips=count)
        for _ in range(count):
            frames_count = fbank_frames[clip] if isinstance(fbank_frames, list) else fbank_frames
            fbank = np.repeat(np.arange(frames_count, dtype=np.float16)[:, None], 128, axis=1)
            clip_id = f"clip.{clip:03d}"
            metadata = {
                "id": clip_id,
                "num_frames": num_frames,
                "labels": [clip % num_classes],
                "fbank_frames": frames_count,
            }
            writer.write(encode_sample(sample_key(clip_id), frames, fbank, metadata))
            ids.append(clip_id)
            clip += 1
        record = writer.finish()
        shards.append(
            {"name": record.name, "clips": record.clips, "bytes": record.bytes, "sha256": record.sha256}
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": num_classes,
        "classes": [{"index": i, "mid": f"c{i}", "name": f"class {i}"} for i in range(num_classes)],
        "preprocessing": {"num_frames": num_frames},
        "shards": shards,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return ids


def authors_fbank(waveform: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """The authors' recipe, written out independently of avsync: DC removed, then torchaudio's Kaldi
    fbank (128 mel bins, Hanning window, 10-ms shift, no dither, no energy) of a `(1, N)` waveform."""
    return kaldi.fbank(
        waveform - waveform.double().mean().float(),
        htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_shift=10,
    )  # fmt: skip
