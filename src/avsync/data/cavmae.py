"""Converting an entry of the authors' CAV-MAE datafile: frames already extracted, audio as a wav.

Frames are taken as given from `video_path/frame_{i}/{video_id}.jpg`, `i < num_frames`; a JPEG whose
short side is within `short_side` is stored byte for byte, a larger or non-JPEG one is shrunk and
re-encoded like decoded frames. The wav goes through the same decoding and spectrogram path as video
audio. The clip duration is the wav's; frame times are the nominal `i * D / T` (the authors' frame
extraction used that rule), marked `frame_time_source: "nominal"`.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from avsync.data.audio import decode_audio
from avsync.data.clip import Clip, ExtractionOptions, check_duration
from avsync.data.errors import DecodeError
from avsync.data.fbank import log_mel_fbank
from avsync.data.images import encode_jpeg, scaled_size, shrink
from avsync.data.media import check_readable, open_media
from avsync.data.sources import ClipSource, InputError

log = logging.getLogger(__name__)

#: Clips whose frame folders are counted to say what a datafile's frames are, when none has them all.
_LAYOUT_SAMPLE = 20


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
    """The JPEG bytes to store for one given frame, its original and its stored size. The file is read
    once: its bytes are stored as they are, or decoded from memory."""
    check_readable(path)
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
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
    except UnidentifiedImageError as error:  # its message names the in-memory buffer, not the file
        raise DecodeError(path, "unreadable frame image: not an image format PIL identifies") from error
    except OSError as error:
        raise DecodeError(path, f"unreadable frame image: {error}") from error


def check_frame_folders(
    sources: Sequence[ClipSource], num_frames: int, datafiles: Sequence[str] = ()
) -> None:
    """Stop before any decoding when no clip of a CAV-MAE datafile has its last frame, `frame_{T-1}`.

    CAV-MAE's frame extractor (`src/preprocess/extract_video_frame.py`) writes 10 frames per clip, at
    `i * D / 10`; the Sync authors' own (`extract_video_frame_parallel.py`) and avsync read 16, at
    `i * D / 16`. Ten frames taken at other times cannot become sixteen without inventing frames, and
    such a datafile would otherwise fail clip after clip for hours and end with no shard. Clips that lack
    frames while others have them are only counted here: each is skipped with its reason, as before.
    Raises `InputError` with one line saying what is there, what is missing and what to do.
    """
    clips = [source for source in sources if source.kind == "cavmae"]
    if not clips:
        return
    last = num_frames - 1
    complete = sum(
        1 for source in clips if os.path.isfile(cavmae_frame_path(source.path, source.clip_id, last))
    )
    if complete == len(clips):
        return
    if complete:
        log.warning(
            "%d of %d datafile clips lack frame_%d (video_path/frame_%d/VIDEO_ID.jpg): they will be skipped, "
            "each listed in failures.jsonl",
            len(clips) - complete,
            len(clips),
            last,
            last,
        )
        return
    where = ", ".join(datafiles) if datafiles else "the CAV-MAE datafile"
    example = cavmae_frame_path(clips[0].path, clips[0].clip_id, last)
    counts = Counter(_frames_present(source, num_frames) for source in clips[:_LAYOUT_SAMPLE])
    found, _ = counts.most_common(1)[0]
    if found == 0:
        there = "no frame folders either (not even video_path/frame_0/VIDEO_ID.jpg)"
    else:
        origin = ", as CAV-MAE's extract_video_frame.py writes them" if found == 10 else ""
        there = (
            f"{found} frames per clip (frame_0..frame_{found - 1}{origin}), which cannot become the "
            f"{num_frames} taken at i*D/{num_frames} without inventing frames"
        )
    raise InputError(
        f"{where}: none of its {len(clips)} clips has frame_{last} (e.g. {example}): its frame folders hold "
        f"{there}; nothing was prepared. Prepare from the videos instead (avsync prepare VIDEOS OUT --labels "
        f"CSV --classes CSV, docs/audioset_retrieval.md), or extract {num_frames} frames per clip first"
    )


def _frames_present(source: ClipSource, num_frames: int) -> int:
    """How many of the frames `frame_0`, `frame_1`, ... a clip has in a row (at most `num_frames`)."""
    count = 0
    while count < num_frames and os.path.isfile(cavmae_frame_path(source.path, source.clip_id, count)):
        count += 1
    return count
