"""Converting an entry of the authors' CAV-MAE datafile: frames already extracted, audio as a wav.

Frames are taken as given from `video_path/frame_{i}/{video_id}.jpg`, `i < num_frames`; a JPEG whose
short side is within `short_side` is stored byte for byte, a larger or non-JPEG one is shrunk and
re-encoded like decoded frames. The wav goes through the same decoding and spectrogram path as video
audio. The clip duration is the wav's; frame times are the nominal `i * D / T` (the authors' frame
extraction used that rule), marked `frame_time_source: "nominal"`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from avsync.data.audio import decode_audio
from avsync.data.clip import Clip, ExtractionOptions, check_duration
from avsync.data.errors import DecodeError
from avsync.data.fbank import log_mel_fbank
from avsync.data.images import encode_jpeg, scaled_size, shrink
from avsync.data.media import check_readable, open_media


def cavmae_frame_path(video_path: str | Path, video_id: str, index: int) -> Path:
    return Path(video_path) / f"frame_{index}" / f"{video_id}.jpg"


def extract_cavmae_clip(
    video_id: str, video_path: str | Path, wav: str | Path, options: ExtractionOptions | None = None
) -> Clip:
    """The clip of one datafile entry (see the module docstring); raises `DecodeError` naming the file."""
    options = options or ExtractionOptions()
    with open_media(wav) as container:
        waveform = decode_audio(container, wav, options.fbank.sample_rate, options.mono, options.max_duration)
    check_duration(wav, waveform.duration, options)
    frames, sizes = [], []
    for index in range(options.num_frames):
        jpeg, size = _stored_frame(cavmae_frame_path(video_path, video_id, index), options)
        frames.append(jpeg)
        sizes.append(size)
    fbank = log_mel_fbank(waveform.samples, options.fbank)
    duration = waveform.duration
    (width, height), (frame_width, frame_height) = sizes[0]
    metadata = {
        "duration": duration,
        "fps": None,
        "frame_times": [i * duration / options.num_frames for i in range(options.num_frames)],
        "frame_time_source": "nominal",
        "width": width,
        "height": height,
        "frame_width": frame_width,
        "frame_height": frame_height,
        "video_start": 0.0,
        "audio_offset": 0.0,
        "has_audio": True,
        "silent": not np.any(waveform.samples),
        "sample_rate": waveform.source_sample_rate,
        "channels": waveform.source_channels,
        "audio_duration": duration,
        "fbank_frames": int(fbank.shape[0]),
    }
    return Clip(frames=frames, fbank=fbank.numpy().astype(np.float16), metadata=metadata)


def _stored_frame(
    path: Path, options: ExtractionOptions
) -> tuple[bytes, tuple[tuple[int, int], tuple[int, int]]]:
    """The JPEG bytes to store for one given frame, its original and its stored size."""
    check_readable(path)
    data = path.read_bytes()
    try:
        with Image.open(path) as image:
            image.load()
            original = image.size
            if (
                image.format == "JPEG"
                and image.mode == "RGB"
                and scaled_size(*original, options.short_side) == original
            ):
                return data, (original, original)
            stored = shrink(image.convert("RGB"), options.short_side)
            return encode_jpeg(stored, options.jpeg_quality), (original, stored.size)
    except (UnidentifiedImageError, OSError) as error:
        raise DecodeError(path, f"unreadable frame image: {error}") from error
