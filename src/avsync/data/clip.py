"""From one video file to what a shard stores for it: SPEC §1's frames as JPEG, the clip spectrogram,
and metadata. Every way a file can fail becomes a `DecodeError` with a reason; nothing is padded in
place of data that could not be read.

Long inputs are refused rather than cut: `max_duration` (default 60 s) is checked from the container
before anything is decoded, and again while audio decodes, so a 3-hour file costs one header read.
Frames spread over hours would not make a training clip; cut such videos into clips first.

A clip's file is opened once (`ClipSession`): the probe, the frames and the audio come from one
container, the audio read from its first packet again after the frames (`media.rewind`), so the bytes
are those of decoding each from a fresh open. Everything that decodes a video clip (`prepare`, the
API's `embed`, segmentation, localization) goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from avsync.data.audio import MonoMode, Waveform, decode_audio
from avsync.data.errors import DecodeError
from avsync.data.fbank import FbankConfig, log_mel_fbank
from avsync.data.images import encode_jpeg
from avsync.data.media import MediaInfo, open_media, probe, rewind
from avsync.data.video import SampledFrames, sample_frames


@dataclass(frozen=True)
class ExtractionOptions:
    """Every parameter that decides a clip's stored content (`prepare` writes them to the manifest).

    Args:
        num_frames: frames per clip, frame `i` at `i * D / num_frames` (SPEC §1: 16).
        short_side: stored frames are shrunk so their short side is at most this (never upscaled).
            The default is ViT-B's input side: evaluation then only centre-crops (one bicubic
            resampling from the source, as SPEC §1 describes, instead of two) and decodes fewer pixels;
            the authors' own frames are 224 x 224 crops.
        jpeg_quality: quality of the stored JPEG frames.
        mono: how channels become one (`mean` or `first`, see `audio.py`).
        min_duration / max_duration: accepted clip durations in seconds (video stream).
        max_av_mismatch: largest accepted difference (s) between the audio and video durations; beyond
            it the frame-to-window alignment, which spreads both over the same clip, would be wrong.
        allow_silent: keep clips without an audio stream, with the spectrogram of digital silence over
            the video's duration, flagged `silent` and `has_audio: false` (default: skip them).
        fbank: spectrogram parameters.
    """

    num_frames: int = 16
    short_side: int | None = 224
    jpeg_quality: int = 90
    mono: MonoMode = "mean"
    min_duration: float = 2.0
    max_duration: float = 60.0
    max_av_mismatch: float = 1.0
    allow_silent: bool = False
    fbank: FbankConfig = field(default_factory=FbankConfig)

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be positive, got {self.short_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0 < self.min_duration <= self.max_duration:
            raise ValueError(
                f"need 0 < min_duration <= max_duration, got {self.min_duration}, {self.max_duration}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    """A decoded clip: JPEG frames, the `(S, mel)` float16 spectrogram, and JSON-ready metadata."""

    frames: list[bytes]
    fbank: np.ndarray
    metadata: dict


def frame_targets(duration: Fraction, num_frames: int) -> list[Fraction]:
    """SPEC §1 frame times `i * D / T`, exactly."""
    return [duration * i / num_frames for i in range(num_frames)]


def check_duration(path: str | Path, duration: float, options: ExtractionOptions) -> None:
    if duration < options.min_duration:
        raise DecodeError(path, f"too short: {duration:.3f} s (minimum {options.min_duration:g} s)")
    if duration > options.max_duration:
        raise DecodeError(
            path,
            f"too long: {duration:.3f} s (maximum {options.max_duration:g} s; cut long videos into clips "
            "or raise --max-duration)",
        )


class ClipSession:
    """A video file opened once, for its probe (`info`), its frames and its audio; a context manager
    that closes it. Frames come first (their seeks stay in the video stream), then the audio, from its
    first packet."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.container = open_media(path)
        try:
            self.info: MediaInfo = probe(self.container, path)
        except BaseException:
            self.container.close()
            raise

    def __enter__(self) -> ClipSession:
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    def frames(self, targets: Sequence[Fraction], short_side: int | None) -> SampledFrames:
        """The frames at `targets` (seconds from the video's start; `video.sample_frames`)."""
        return sample_frames(self.container, self.path, targets, self.info.video_start, short_side)

    def audio(self, sample_rate: int, mono: MonoMode, max_duration: float | None) -> Waveform:
        """The whole first audio stream (`audio.decode_audio`), decoded from its first packet."""
        if self.container.streams.audio:
            rewind(self.container, self.container.streams.audio[0], self.path)
        return decode_audio(self.container, self.path, sample_rate, mono, max_duration)


def extract_video_clip(path: str | Path, options: ExtractionOptions = ExtractionOptions()) -> Clip:
    """Decode `path` into a `Clip` (see the module docstring for what is refused)."""
    with ClipSession(path) as session:
        info = session.info
        check_duration(path, float(info.duration), options)
        if not info.has_audio and not options.allow_silent:
            raise DecodeError(
                path, "no audio stream (pass --allow-silent to keep such clips, flagged silent)"
            )
        frames = session.frames(frame_targets(info.duration, options.num_frames), options.short_side)
        waveform = _clip_audio(session, options)
    fbank = log_mel_fbank(waveform.samples, options.fbank)
    height, width = frames.images[0].shape[:2]
    source_width, source_height = frames.upright(info.width, info.height)
    metadata = {
        "duration": float(info.duration),
        "fps": info.fps,
        "frame_times": frames.times,
        "frame_time_source": "pts",
        "width": source_width,
        "height": source_height,
        "frame_width": width,
        "frame_height": height,
        "rotation": frames.rotation,
        "mirrored": frames.mirrored,
        "video_start": float(info.video_start),
        "audio_offset": float(info.audio_start - info.video_start) if info.has_audio else None,
        "has_audio": info.has_audio,
        "silent": not np.any(waveform.samples),
        "sample_rate": waveform.source_sample_rate if info.has_audio else None,
        "channels": waveform.source_channels if info.has_audio else None,
        "audio_duration": waveform.duration,
        "fbank_frames": int(fbank.shape[0]),
    }
    return Clip(
        frames=[encode_jpeg(image, options.jpeg_quality) for image in frames.images],
        fbank=fbank.numpy().astype(np.float16),
        metadata=metadata,
    )


def _clip_audio(session: ClipSession, options: ExtractionOptions) -> Waveform:
    path, info, rate = session.path, session.info, options.fbank.sample_rate
    if not info.has_audio:
        silence = np.zeros(round(float(info.duration) * rate), dtype=np.float32)
        return Waveform(samples=silence, sample_rate=rate, source_sample_rate=0, source_channels=0)
    waveform = session.audio(rate, options.mono, options.max_duration)
    mismatch = abs(waveform.duration - float(info.duration))
    if mismatch > options.max_av_mismatch:
        raise DecodeError(
            path,
            f"audio ({waveform.duration:.3f} s) and video ({float(info.duration):.3f} s) durations differ by "
            f"more than {options.max_av_mismatch:g} s (truncated stream?)",
        )
    return waveform
