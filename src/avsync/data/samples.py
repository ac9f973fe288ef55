"""From a raw shard sample (member name -> bytes) to a model example, decoding only what is used.

Two shapes (the batch contract of `AVShardDataModule`):
- `train`: one frame `i` of `T` and its aligned window: `video (3, H, W)`, `audio (L, mel)`,
  `frame_index ()`. Only that frame's JPEG is decoded. On the train split `i` is drawn at random
  (torch's RNG, seeded per DataLoader worker); on other splits it is the middle frame `T // 2`.
- `eval`: all `T` frames and windows: `video (T, 3, H, W)`, `audio (T, L, mel)`, `frame_index (T,)`.
Both carry `label` (multi-hot float `(C,)` or an int64 class index) and `key` (the clip id).
With `pixels=True` (what `AVShardDataModule`'s pipeline uses) `video` stays uint8 `(…, H, W, 3)` and
`collate` normalizes the whole batch in one write, into shared memory in a DataLoader worker: the
float frames are written once instead of once per clip and again by the stack.

Shards may hold more frames than `T` (e.g. 16 stored, `T = 8`): frame `i` of `T` is stored frame
`i * stored / T`, which lies at the same time `i * D / T`; `stored` must be a multiple of `T`.
JPEGs are opened with PIL's `draft`, which lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the
result still has a short side of at least `image_size` (free downscaling for small models).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import default_collate, get_worker_info

from avsync.data.schema import FBANK_FIELD, METADATA_FIELD, decode_npy, frame_field
from avsync.data.transforms import AudioAugmentation, AudioWindows, frames_to_pixels, normalize_pixels

SampleShape = Literal["train", "eval"]
LabelFormat = Literal["multi_hot", "index"]
#: The member names `frame_field` gives.
_FRAME_MEMBER = re.compile(r"f\d{2,}\.jpg")


class ClipDecoder:
    """Callable turning one raw sample into an example dict; raises `SampleError` (with a `reason`
    from `SKIP_REASONS`) on anything the model cannot take, so that the pipeline's handler skips and
    counts the sample instead of a batch failing to stack or training on padding: a frame count in the
    metadata beyond the sample's members (checked before the count sizes anything), members missing,
    member names reaching outside the shard (`../`, absolute), undecodable JPEGs or arrays, a
    spectrogram that is not float `(S, mel_bins)`, is shorter than `min_audio_frames` rows, disagrees
    with the length its metadata records, or holds NaN/inf, and labels outside the class range.

    `min_audio_frames`: fewest spectrogram rows (10 ms each) accepted; an empty or near-empty
    spectrogram would give windows of padding only, which train on nothing while looking normal.
    """

    def __init__(
        self,
        shape: SampleShape,
        num_frames: int,
        image_size: int,
        image_transform,
        audio_windows: AudioWindows,
        audio_augmentation: AudioAugmentation | None = None,
        random_frame: bool = False,
        label_format: LabelFormat = "multi_hot",
        num_classes: int = 0,
        pixels: bool = False,
        mel_bins: int = 128,
        min_audio_frames: int = 1,
    ) -> None:
        if shape not in ("train", "eval"):
            raise ValueError(f"shape must be 'train' or 'eval', got {shape!r}")
        if label_format not in ("multi_hot", "index"):
            raise ValueError(f"label_format must be 'multi_hot' or 'index', got {label_format!r}")
        self.shape, self.num_frames, self.image_size = shape, num_frames, image_size
        self.image_transform, self.audio_windows = image_transform, audio_windows
        self.audio_augmentation = (
            audio_augmentation if audio_augmentation and audio_augmentation.active else None
        )
        self.random_frame, self.label_format, self.num_classes = random_frame, label_format, num_classes
        self.pixels = pixels
        if min_audio_frames < 1:
            raise ValueError(f"min_audio_frames must be at least 1, got {min_audio_frames}")
        self.mel_bins, self.min_audio_frames = mel_bins, min_audio_frames

    def pick(self, sample: dict) -> dict:
        """Keep only what the example needs: the parsed metadata, the spectrogram and the chosen frame
        JPEG(s). Run before a shuffle buffer, this keeps the buffer small (one JPEG instead of 16)."""
        if "__metadata__" in sample:
            return sample
        with _naming(sample):
            return self._pick(sample)

    def _pick(self, sample: dict) -> dict:
        key = PurePosixPath(str(sample.get("__key__")))
        if key.is_absolute() or ".." in key.parts:
            raise BadSample(
                "unsafe member name", "member names point outside the shard (absolute or '..'): refused"
            )
        missing = [field for field in (METADATA_FIELD, FBANK_FIELD) if field not in sample]
        if missing:
            fields = " or ".join(missing)
            raise BadSample(
                "missing member", f"no {fields} member (a shard cut short, or not written by avsync prepare)"
            )
        metadata = _metadata(sample[METADATA_FIELD])
        stored = metadata["num_frames"]
        stride = self._stride(metadata)
        if stored > len(sample):  # before `stored` sizes anything: the sample's own members bound it
            frames = sum(1 for name in sample if _FRAME_MEMBER.fullmatch(name))
            raise BadSample(
                "frame count", f"metadata says {stored} frames, the sample holds {frames} frame members"
            )
        absent = [frame_field(i) for i in range(stored) if frame_field(i) not in sample]
        if absent:
            raise BadSample(
                "missing member",
                f"metadata says {stored} frames but {len(absent)} frame member(s) are missing: "
                + ", ".join(absent[:4]),
            )
        if self.shape == "train":
            indices = [int(torch.randint(self.num_frames, ())) if self.random_frame else self.num_frames // 2]
        else:
            indices = list(range(self.num_frames))
        return {
            "__key__": sample.get("__key__"),
            "__url__": sample.get("__url__"),
            "__metadata__": metadata,
            "__frame_indices__": indices,
            "__jpegs__": [sample[frame_field(i * stride)] for i in indices],
            FBANK_FIELD: sample[FBANK_FIELD],
        }

    def __call__(self, sample: dict) -> dict:
        sample = self.pick(sample)
        with _naming(sample):
            return self._example(sample)

    def _example(self, sample: dict) -> dict:
        metadata = sample["__metadata__"]
        fbank = self._spectrogram(sample[FBANK_FIELD], metadata)
        images = []
        for index, jpeg in zip(sample["__frame_indices__"], sample["__jpegs__"], strict=True):
            try:
                images.append(self._image(jpeg))
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
                raise BadSample(
                    "undecodable frame", f"frame {index}: {type(error).__name__}: {error}"
                ) from error
        video = frames_to_pixels(images)
        expected = (len(images), self.image_size, self.image_size, 3)
        if tuple(video.shape) != expected or video.dtype != torch.uint8:
            raise BadSample(
                "frame shape",
                f"frames decode to {video.dtype} {tuple(video.shape)}, expected uint8 {expected}",
            )
        if not self.pixels:
            video = normalize_pixels(video)
        if self.shape == "train":
            (index,) = sample["__frame_indices__"]
            video, audio = video[0], self.audio_windows.window(fbank, index)
            frame_index = torch.tensor(index)
        else:
            audio = self.audio_windows.windows(fbank)
            frame_index = torch.tensor(sample["__frame_indices__"])
        if self.audio_augmentation is not None:
            audio = self.audio_augmentation(audio)
        return {
            "audio": audio,
            "video": video,
            "label": self._label(metadata),
            "key": metadata["id"],
            "frame_index": frame_index,
        }

    def _spectrogram(self, data: bytes, metadata: dict) -> torch.Tensor:
        """The stored spectrogram as float32 `(S, mel_bins)`, or `BadSample` saying what is wrong with it."""
        try:
            array = decode_npy(data)
        except Exception as error:
            raise BadSample("undecodable spectrogram", f"{type(error).__name__}: {error}") from error
        if array.dtype.kind != "f":
            raise BadSample("spectrogram dtype", f"spectrogram is {array.dtype}, expected floating point")
        if array.ndim != 2 or array.shape[1] != self.mel_bins:
            raise BadSample(
                "spectrogram shape",
                f"spectrogram has shape {array.shape}, expected (frames, {self.mel_bins}) for this model",
            )
        rows = array.shape[0]
        if rows < self.min_audio_frames:
            what = "empty" if rows == 0 else f"{rows} frame(s) long"
            raise BadSample(
                "spectrogram too short",
                f"spectrogram is {what}, shorter than min_audio_frames={self.min_audio_frames}",
            )
        recorded = metadata.get("fbank_frames")
        if recorded is not None and int(recorded) != rows:
            raise BadSample(
                "spectrogram length", f"spectrogram has {rows} frames, its metadata records {recorded}"
            )
        fbank = torch.from_numpy(array).float()
        broken = _count_non_finite(fbank)
        if broken:
            raise BadSample("non-finite spectrogram", f"spectrogram holds {broken} NaN or infinite value(s)")
        return fbank

    def _stride(self, metadata: dict) -> int:
        stored = metadata["num_frames"]
        if stored < 1 or stored % self.num_frames:
            raise BadSample(
                "frame count",
                f"clip {metadata.get('id')!r} stores {stored} frames, not a multiple of {self.num_frames}",
            )
        return stored // self.num_frames

    def _image(self, jpeg: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(jpeg))
        image.draft("RGB", (self.image_size, self.image_size))
        return self.image_transform(image if image.mode == "RGB" else image.convert("RGB"))

    def _label(self, metadata: dict) -> torch.Tensor:
        labels = metadata["labels"]
        if any(not 0 <= i < self.num_classes for i in labels):
            raise BadSample(
                "label", f"clip {metadata['id']!r} has labels {labels} outside 0..{self.num_classes - 1}"
            )
        if self.label_format == "index":
            if len(labels) != 1:
                raise BadSample(
                    "label",
                    f"clip {metadata['id']!r} has {len(labels)} labels; label_format='index' needs one",
                )
            return torch.tensor(labels[0], dtype=torch.int64)
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[labels] = 1.0
        return target


def _metadata(data: bytes) -> dict:
    """The parsed metadata member, with the fields the decoder relies on checked for type."""
    try:
        metadata = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadSample("bad metadata", f"metadata is not JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise BadSample("bad metadata", f"metadata is a JSON {type(metadata).__name__}, not an object")
    problems = []
    if not isinstance(metadata.get("id"), str):
        problems.append(f"id {metadata.get('id')!r} is not a string")
    if not _is_int(metadata.get("num_frames")):
        problems.append(f"num_frames {metadata.get('num_frames')!r} is not an integer")
    labels = metadata.setdefault("labels", [])
    if not isinstance(labels, list) or not all(_is_int(i) for i in labels):
        problems.append(f"labels {labels!r} is not a list of class indices")
    if "fbank_frames" in metadata and not _is_int(metadata["fbank_frames"]):
        problems.append(f"fbank_frames {metadata['fbank_frames']!r} is not an integer")
    if problems:
        raise BadSample("bad metadata", "; ".join(problems))
    return metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_non_finite(values: torch.Tensor) -> int:
    """How many values are NaN or infinite, with a fast path for the usual answer, none.

    A finite sum proves every value finite (a NaN or inf would propagate into it), and for stored
    spectrograms (float16, |x| <= 65504) the float32 sum cannot overflow, so one reduction settles it,
    about 20x faster than `isfinite` and a count (0.01 vs 0.17 ms for a 10-s clip on one core). Only a
    non-finite sum pays for the count."""
    if torch.isfinite(values.sum()):
        return 0
    return int((~torch.isfinite(values)).sum())


#: Why a sample is skipped: the categories that skip counts and summaries group by (`skips.py`).
SKIP_REASONS = (
    "unsafe member name",
    "missing member",
    "bad metadata",
    "frame count",
    "undecodable frame",
    "frame shape",
    "undecodable spectrogram",
    "spectrogram dtype",
    "spectrogram shape",
    "spectrogram too short",
    "spectrogram length",
    "non-finite spectrogram",
    "label",
    "other",
)


class BadSample(ValueError):
    """A sample the model cannot take, with `reason`, one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason if reason in SKIP_REASONS else "other"


class SampleError(ValueError):
    """A shard sample that cannot be decoded; the message names its key and shard, `reason` says why
    (one of `SKIP_REASONS`)."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


@contextmanager
def _naming(sample: dict) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"
        # BadSample shows as its public base, ValueError: the reason is carried apart, as `.reason`
        kind, reason = (
            ("ValueError", error.reason) if isinstance(error, BadSample) else (type(error).__name__, "other")
        )
        raise SampleError(f"{where}: {kind}: {error}", reason) from error


def collate(examples: list[dict], normalize: bool = True) -> dict:
    """Stack a list of examples into the batch dict (`key` stays a list of strings); uint8 `video`
    pixels are normalized on the way (see the module docstring), or with `normalize=False` stay uint8
    `(B, ..., H, W, 3)` for the device to normalize (`transforms.normalize_batch_video`).

    Batches are written straight into shared memory in a DataLoader worker (as `default_collate`
    does); a plain `torch.stack` would be copied there once more on its way to the main process (a
    38-MB copy per evaluation batch of 4 clips)."""
    names = ("audio", "label", "frame_index")
    _check_stackable(examples, (*names, "video"))
    stacked = {name: default_collate([e[name] for e in examples]) for name in names}
    frames = [e["video"] for e in examples]
    if frames[0].dtype == torch.uint8 and not normalize:
        video = default_collate(frames)
    elif frames[0].dtype == torch.uint8:
        *lead, height, width, channels = frames[0].shape
        video = _batch_tensor((len(frames), *lead, channels, height, width))
        for clip, pixels in zip(video, frames, strict=True):
            normalize_pixels(pixels, out=clip)
    else:
        video = default_collate(frames)
    return {**stacked, "video": video, "key": [e["key"] for e in examples]}


def _check_stackable(examples: list[dict], names: tuple[str, ...]) -> None:
    """Refuse, naming the clips, examples that cannot share a batch (the decoder's checks make this
    unreachable from shards; it guards other decoders against torch's opaque resize error)."""
    first = examples[0]
    for name in names:
        for example in examples[1:]:
            a, b = first[name], example[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"cannot batch {name!r} of clip {example.get('key')!r} ({b.dtype} {tuple(b.shape)}) with "
                    f"that of clip {first.get('key')!r} ({a.dtype} {tuple(a.shape)})"
                )


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized float32 tensor, in shared memory inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(shape)
