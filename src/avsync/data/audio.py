"""Decoding a clip's audio track to the mono 16-kHz waveform that the spectrogram is computed from.

The whole track is decoded (clips are short: `max_duration` refuses long ones before they fill
memory) and resampled with PyAV's `AudioResampler` (libswresample), keeping the source's channels.
Mono is then taken explicitly: `mean` averages the channels (avsync's default; resampling is linear,
so this equals resampling the average), `first` keeps channel 0 (what the authors' `sox remix 1`
did). swresample's own mono downmix is not used because it scales stereo by 1/sqrt(2), not 1/2.
Resampled frames are packed (interleaved), not planar: PyAV 18 crashes (SIGSEGV) turning a planar
frame of 8 channels (7.1) into an array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import av.container
import numpy as np

from avsync.data.errors import DecodeError

MonoMode = Literal["mean", "first"]

#: Largest accepted sample magnitude, 1000 x full scale (+60 dBFS). Decoded samples lie in [-1, 1];
#: float PCM may go past it a little, never this far unless it was written unscaled (integer values in
#: a float file) or is corrupt: its spectrogram would be off any scale the model knows and, from about
#: 1e19, NaN throughout (the power spectrum overflows float32).
MAX_PEAK = 1000.0


@dataclass
class Waveform:
    """Mono `float32` samples in [-1, 1] at `sample_rate`, and what the source track was."""

    samples: np.ndarray
    sample_rate: int
    source_sample_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def decode_audio(
    container: av.container.InputContainer,
    path: str | Path,
    sample_rate: int = 16000,
    mono: MonoMode = "mean",
    max_duration: float | None = None,
) -> Waveform:
    """The first audio stream of `container` as a mono waveform at `sample_rate`.

    Raises `DecodeError` when there is no audio stream, nothing decodes, the stream is corrupt or
    decodes to NaN/infinite samples or to samples beyond `MAX_PEAK`, or it runs longer than
    `max_duration` seconds (decoding stops there, so memory stays bounded).
    """
    if mono not in ("mean", "first"):
        raise ValueError(f"mono must be 'mean' or 'first', got {mono!r}")
    if not container.streams.audio:
        raise DecodeError(path, "no audio stream")
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", rate=sample_rate)
    limit = None if max_duration is None else int(max_duration * sample_rate) + sample_rate
    chunks: list[np.ndarray] = []
    total, peak = 0, 0.0
    channels = stream.codec_context.channels
    source_rate = stream.codec_context.sample_rate
    try:
        for frame in container.decode(stream):
            channels, source_rate = len(frame.layout.channels), frame.sample_rate
            for chunk, chunk_peak in _mono_chunks(resampler.resample(frame), mono):
                chunks.append(chunk)
                total += len(chunk)
                peak = max(peak, chunk_peak)
            if limit is not None and total > limit:
                raise DecodeError(path, f"audio longer than the {max_duration:g}-s maximum")
        for chunk, chunk_peak in _mono_chunks(resampler.resample(None), mono):
            chunks.append(chunk)
            peak = max(peak, chunk_peak)
    except av.FFmpegError as error:
        raise DecodeError(path, f"truncated or corrupt audio stream: {error.strerror or error}") from error
    except ValueError as error:  # the resampler refuses a mid-stream change of format or layout
        raise DecodeError(path, f"audio stream changes format mid-stream: {error}") from error
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise DecodeError(path, "audio stream has no decodable samples")
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if math.isfinite(peak) and peak > MAX_PEAK:  # before the NaN check: a mixdown of huge ones overflows
        raise DecodeError(
            path,
            f"audio samples reach {peak:.3g}, beyond {MAX_PEAK:g} x full scale (float PCM written unscaled, "
            "or corrupt); its spectrogram would be meaningless (NaN from about 1e19)",
        )
    broken = int(np.count_nonzero(~np.isfinite(samples)))
    if broken:  # float PCM can carry them; the spectrogram would be NaN throughout
        raise DecodeError(path, f"audio stream decodes to {broken} NaN or infinite sample(s)")
    return Waveform(
        samples=samples,
        sample_rate=sample_rate,
        source_sample_rate=int(source_rate or 0),
        source_channels=int(channels or 0),
    )


def declared_audio_duration(container: av.container.InputContainer) -> float | None:
    """The audio stream's duration as its container declares it (seconds), when it does."""
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _mono_chunks(frames: list[av.AudioFrame], mono: MonoMode) -> list[tuple[np.ndarray, float]]:
    """Each frame as mono samples, with the largest magnitude over its channels (before any mixing)."""
    chunks = []
    for frame in frames:  # packed float32: (1, samples * channels) -> (samples, channels)
        samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
        peak = float(np.abs(samples).max(initial=0.0))
        chunks.append((samples[:, 0] if mono == "first" else samples.mean(axis=1, dtype=np.float32), peak))
    return chunks
