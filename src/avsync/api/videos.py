"""A video file -> the backbone's inputs, by exactly the path that `avsync prepare` and the shard
reader take: `extract_video_clip` (frames at `i * D / T` stored as JPEG, whole-clip spectrogram), then
the evaluation decoder of `AVShardDataModule` (`ClipDecoder`). So embedding a video directly gives the
same numbers as embedding its prepared shard sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from avsync.data.alignment import AlignmentMode
from avsync.data.clip import ExtractionOptions, extract_video_clip
from avsync.data.errors import DecodeError
from avsync.data.samples import ClipDecoder
from avsync.data.schema import encode_sample, sample_key
from avsync.data.sources import printable, short_hash
from avsync.data.transforms import AudioWindows, CenterFrame


@dataclass
class VideoInputs:
    """One decoded video: `audio (T, L, mel)` windows and `video (T, 3, H, W)` frames, normalized as the
    model expects, and the clip's metadata (`duration`, `frame_times`, sizes, audio facts)."""

    key: str
    path: str
    audio: torch.Tensor
    video: torch.Tensor
    metadata: dict
    fbank: np.ndarray | None = None  # the whole clip's `(S, mel)` log-Mel spectrogram, unnormalized


@dataclass(frozen=True)
class Failure:
    """A video that could not be embedded, and why (for a person reading the report)."""

    path: str
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


class VideoReader:
    """Decodes a video file into `VideoInputs` for a backbone of `image_size` and `audio_length`.

    Raises `DecodeError` (naming the file) for anything `prepare` would skip.
    """

    def __init__(
        self,
        image_size: int,
        audio_length: int,
        alignment: AlignmentMode,
        options: ExtractionOptions | None = None,
    ) -> None:
        self.options, self.alignment = options or ExtractionOptions(), alignment
        self.decoder = ClipDecoder(
            "eval",
            self.options.num_frames,
            image_size,
            CenterFrame(image_size),
            AudioWindows(self.options.num_frames, audio_length, alignment),
        )

    def __call__(self, path: str | Path, key: str | None = None) -> VideoInputs:
        """`key`: the name of the result, by default the clip id `prepare` gives the file."""
        clip = extract_video_clip(path, self.options)
        key = key or printable(Path(path).stem)
        metadata = {"id": key, "num_frames": self.options.num_frames, **clip.metadata}
        try:
            example = self.decoder(encode_sample(sample_key(key), clip.frames, clip.fbank, metadata))
        except Exception as error:  # a frame that decodes in PyAV but not as a stored JPEG, say
            cause = error.__cause__ or error
            raise DecodeError(path, f"decoded but not usable: {type(cause).__name__}: {cause}") from error
        fbank = clip.fbank.astype(np.float32)
        return VideoInputs(key, str(path), example["audio"], example["video"], clip.metadata, fbank)


def unique_keys(paths: Sequence[str | Path]) -> list[str]:
    """One key per path: its clip id (file name without extension), unless an earlier path has that id
    (`a/x.mp4`, `b/x.mp4`): then the id and a hash of the path as given, `x-1a2b3c4d`. Stable for the
    same input list, never shared, so no video has to be dropped for its name."""
    keys: list[str] = []
    taken: set[str] = set()
    for path in paths:
        clip_id = printable(Path(path).stem)
        key, attempt = clip_id, 0
        while key in taken:
            attempt += 1
            key = f"{clip_id}-{short_hash(str(path) if attempt == 1 else f'{path}#{attempt}')}"
        taken.add(key)
        keys.append(key)
    return keys


class VideoFiles(Dataset):
    """`VideoInputs` per path, or the `Failure` that says why not: a batch job skips it and goes on."""

    def __init__(self, paths: Sequence[str | Path], reader: VideoReader) -> None:
        self.paths, self.reader = [str(p) for p in paths], reader
        self.keys = unique_keys(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> VideoInputs | Failure:
        path = self.paths[index]
        try:
            return self.reader(path, self.keys[index])
        except DecodeError as error:
            return Failure(path, error.reason)
        except Exception as error:  # a library surprise on odd data: reported like `prepare` does
            return Failure(path, f"unexpected {type(error).__name__}: {error}")
