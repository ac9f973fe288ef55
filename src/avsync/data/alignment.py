"""Temporal alignment (paper §3.3): which frames a clip contributes and which audio window goes with each.

CAV-MAE contrasts one frame with the whole clip's audio; CAV-MAE Sync pairs frame `i` of `T` with
the spectrogram window centred on the same moment, so that every audio token describes what the
frame shows. This module is the single definition of that pairing (SPEC §1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

#: `clip`: frames and windows spread over the clip's own duration and spectrogram (avsync default);
#: `authors`: the authors' fixed 1024-frame spectrogram (exact reproduction; right only for 10-s clips).
AlignmentMode = Literal["clip", "authors"]
AUTHORS_SPECTROGRAM_FRAMES = 1024


def frame_times(duration: float, num_frames: int = 16) -> list[float]:
    """Times (s) of the `num_frames` frames sampled uniformly over a clip: frame `i` at `i * D / T`."""
    if duration <= 0 or num_frames <= 0:
        raise ValueError(f"need a positive duration and frame count, got {duration} s and {num_frames}")
    return [i * duration / num_frames for i in range(num_frames)]


def window_center(frame_index: int, num_frames: int, spectrogram_length: int) -> int:
    """Spectrogram frame at the centre of frame `i`'s window: `round(i * S / T)` (Python rounding, as the
    authors' code)."""
    return round(frame_index * spectrogram_length / num_frames)


def window_bounds(
    frame_index: int, num_frames: int, spectrogram_length: int, window_length: int
) -> tuple[int, int]:
    """The authors' window `[start, end)` for frame `i`: centred, then shifted inside `[0, S)` at the edges.

    `start = max(0, c - L//2)`, `end = start + L`; if `end > S`: `end = S`, `start = max(0, S - L)`.
    """
    start = max(0, window_center(frame_index, num_frames, spectrogram_length) - window_length // 2)
    end = start + window_length
    if end > spectrogram_length:
        end = spectrogram_length
        start = max(0, end - window_length)
    return start, end


def fit_length(fbank: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad `(S, mel)` at the end to `length` frames (padding happens before normalization)."""
    if fbank.shape[0] >= length:
        return fbank[:length]
    return F.pad(fbank, (0, 0, 0, length - fbank.shape[0]))


def aligned_window(
    fbank: torch.Tensor,
    frame_index: int,
    num_frames: int,
    window_length: int,
    mode: AlignmentMode = "clip",
    pad_value: float = 0.0,
) -> torch.Tensor:
    """The `(window_length, mel)` window of a clip's spectrogram `(S, mel)` that goes with frame `i`.

    `authors`: the spectrogram is first cut/zero-padded to 1024 frames, then the edge-shifted window of
    :func:`window_bounds` is taken. `clip`: the clip's own `S`; the window stays centred on the frame
    and whatever falls outside the clip is filled with `pad_value`.
    """
    if mode == "authors":
        fbank = fit_length(fbank, AUTHORS_SPECTROGRAM_FRAMES)
        start, end = window_bounds(frame_index, num_frames, fbank.shape[0], window_length)
        return fit_length(fbank[start:end], window_length)
    if mode != "clip":
        raise ValueError(f"unknown alignment mode {mode!r}; use 'clip' or 'authors'")
    start = window_center(frame_index, num_frames, fbank.shape[0]) - window_length // 2
    end = start + window_length
    before, after = max(0, -start), max(0, end - fbank.shape[0])
    window = fbank[max(0, start) : min(end, fbank.shape[0])]
    if before or after:
        window = F.pad(window, (0, 0, before, after), value=pad_value)
    return window


def aligned_windows(
    fbank: torch.Tensor,
    num_frames: int,
    window_length: int,
    mode: AlignmentMode = "clip",
    pad_value: float = 0.0,
) -> torch.Tensor:
    """All `num_frames` windows of a clip, `(T, window_length, mel)`."""
    return torch.stack(
        [aligned_window(fbank, i, num_frames, window_length, mode, pad_value) for i in range(num_frames)]
    )


def default_alignment(audio_length: int) -> AlignmentMode:
    """`authors` for a model whose window is the authors' whole 1024-frame clip (original CAV-MAE): every
    frame then gets the whole clip's spectrogram, as that model was trained; `clip` (SPEC §1) otherwise."""
    return "authors" if audio_length >= AUTHORS_SPECTROGRAM_FRAMES else "clip"
