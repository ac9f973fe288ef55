"""What sound-prompted segmentation is scored on: prompts (an image, a sound, a mask, a class), read from a
CSV manifest (a synthetic set's included: `avsync synth` writes one per split), decoded into model inputs.

Three kinds of source, one per dataset item:
- `ImagePrompt`: an image prompted with a separate sound (ADE20K-Sound style). The sound is any file
  PyAV decodes; the window of `audio_length` spectrogram frames is centred on the middle of the sound,
  or starts at `audio_start` seconds. Frames of the window outside the sound hold the dataset mean (0
  after normalization), as the edge windows of training clips do.
- `FramePrompt`: the frame of a video at `frame_time`, prompted with the video's own sound around that
  time (the window centred on the same moment, SPEC §1's `clip` alignment); frame and sound come from
  one opening of the file (`clip.ClipSession`, as `avsync prepare` decodes).
- `ClipPrompts`: frames of a video chosen among its 16 SPEC frames (manifest rows `video` + `frame`; the
  synthetic sets give all 16), each with its aligned window, as training sees them: the clip is decoded
  once, through the same path as `avsync prepare` (`extract_video_clip`). Its frames go through the
  shards' JPEG and its spectrogram through their float16 on purpose: a model trained on shards is
  scored on the pixels and values it was trained on, so the JPEG is decoded again here.

Geometry: images go through the evaluation transform (short side to `image_size`, bicubic, centre crop);
masks go through DenseAV's label transform (`crop_mask`: short side to `image_size` nearest-neighbour,
the same centre crop), so heat maps and masks meet on the `image_size x image_size` model input. A video
mask must have the video's size (frames may be stored shrunk; the crop box is the same up to sub-pixel
rounding).

`LocalizationDataModule` serves the prompts to `trainer.test` (`avsync test --config
configs/localization/...`, `avsync localize`).

Errors never stop a run: a source that cannot be read becomes a `Rejection` (which source, why) that
travels in the batch, and the rest is scored.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from avsync.config_checks import check_count, check_number
from avsync.data.alignment import AlignmentMode, aligned_windows
from avsync.data.audio import decode_audio
from avsync.data.clip import ClipSession, ExtractionOptions, check_duration, extract_video_clip
from avsync.data.errors import DecodeError
from avsync.data.fbank import log_mel_fbank
from avsync.data.media import open_media
from avsync.data.member_paths import inside_path
from avsync.data.sources import printable, short_hash
from avsync.data.transforms import AUDIO_MEAN, AUDIO_STD, CenterFrame, frames_to_tensor

#: Longest prompt sound decoded (s); longer files are refused rather than read into memory whole.
MAX_AUDIO_SECONDS = 600.0
#: What `avsync synth` writes in its folder for this module to read (docs/localization.md): a manifest
#: per split (`train`, `test`, `all`) of `video` + `frame` rows, and the class names in index order.
SYNTH_MANIFEST, SYNTH_CLASSES = "localization_{split}.csv", "localization_classes.txt"
SYNTH_SPLITS = ("train", "test")


class Rejection(NamedTuple):
    """A source that was not scored: `source` names it (file or row), `reason` says why."""

    source: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class ImagePrompt:
    key: str
    image: Path
    mask: Path
    audio: Path
    class_index: int
    audio_start: float | None = None


@dataclass(frozen=True)
class FramePrompt:
    key: str
    video: Path
    frame_time: float
    mask: Path
    class_index: int


@dataclass(frozen=True)
class ClipPrompts:
    """Frames `frames` (SPEC frame numbers) of one video, with a mask and a class each."""

    key: str
    video: Path
    frames: tuple[int, ...]
    masks: tuple[Path, ...]
    class_indices: tuple[int, ...]


class _ClipFrame(NamedTuple):
    """One `video` + `frame` manifest row, before the rows of its video are gathered."""

    video: Path
    frame: int
    mask: Path
    class_index: int


Source = ImagePrompt | FramePrompt | ClipPrompts


@dataclass
class PromptSet:
    """Sources to score, the class names their indices refer to, and rows refused while reading."""

    sources: list[Source]
    class_names: list[str]
    rejected: list[Rejection]


# ---------------------------------------------------------------------------------------------- manifests
def read_manifest(
    path: str | Path, classes: Sequence[str] | None = None, audio_start: float | None = None
) -> PromptSet:
    """Read a CSV manifest: columns `mask`, `class`, and per row either `image` + `audio` (optional
    `audio_start`, seconds; default `audio_start`), `video` + `frame_time` (seconds) or `video` + `frame`
    (a SPEC frame number; the rows of one video become one `ClipPrompts`, decoded once). Paths are
    relative to the CSV's folder. `classes`: the known class names (rows naming another class are
    refused); default: the classes the manifest names, sorted. Raises `ValueError` for a manifest without
    the needed columns; refuses (and records) single bad rows."""
    path = Path(path)
    root = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: cannot read the manifest: {error}") from error
    if not rows:
        raise ValueError(f"{path}: the manifest has no rows")
    missing = {"mask", "class"} - columns
    forms = ({"image", "audio"}, {"video", "frame_time"}, {"video", "frame"})
    if missing or not any(form <= columns for form in forms):
        raise ValueError(
            f"{path}: a manifest needs the columns mask, class and one of image + audio, "
            f"video + frame_time or video + frame; it has {sorted(columns)}"
        )
    names = (
        list(classes)
        if classes is not None
        else sorted({(row.get("class") or "").strip() for row in rows} - {""})
    )
    index_of = {name: i for i, name in enumerate(names)}
    read: list[Source | list[_ClipFrame]] = []  # a video's frame rows gather where its first one is
    frames_of: dict[Path, list[_ClipFrame]] = {}
    rejected: list[Rejection] = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path.name} line {number}"
        try:
            source = _manifest_row(row, root, where, index_of, audio_start)
        except ValueError as error:
            rejected.append(Rejection(where, str(error)))
            continue
        if not isinstance(source, _ClipFrame):
            read.append(source)
        elif source.video in frames_of:
            frames_of[source.video].append(source)
        else:
            read.append(frames_of.setdefault(source.video, [source]))
    keys = _clip_keys(list(frames_of))
    sources = [
        ClipPrompts(
            keys[item[0].video],
            item[0].video,
            tuple(row.frame for row in item),
            tuple(row.mask for row in item),
            tuple(row.class_index for row in item),
        )
        if isinstance(item, list)
        else item
        for item in read
    ]
    return PromptSet(sources, names, rejected)


def _clip_keys(videos: list[Path]) -> dict[Path, str]:
    """A name per video of `video` + `frame` rows (its frames are keyed `<name>/fNN`): the file's stem,
    or, for a later video with the same stem, the stem and a hash of its path (as `avsync segment`)."""
    keys: dict[Path, str] = {}
    taken: set[str] = set()
    for video in videos:
        key = printable(video.stem)
        if key.casefold() in taken:
            key = f"{key}-{short_hash(str(video))}"
        taken.add(key.casefold())
        keys[video] = key
    return keys


def _manifest_row(
    row: dict, root: Path, where: str, index_of: dict[str, int], audio_start: float | None
) -> Source:
    def value(column: str) -> str:
        return (row.get(column) or "").strip()

    def existing(column: str) -> Path:
        if not value(column):
            raise ValueError(f"empty {column} column")
        file = inside_path(root, value(column), where)
        if not file.is_file():
            raise ValueError(f"{column} file {file} does not exist")
        return file

    name = value("class")
    if not name:
        raise ValueError("empty class column")
    if name not in index_of:
        raise ValueError(f"unknown class {name!r}")
    mask = existing("mask")
    if value("video") and value("frame"):
        if value("frame_time"):
            raise ValueError("give frame (a SPEC frame number) or frame_time (seconds), not both")
        try:
            frame = int(value("frame"))
        except ValueError as error:
            raise ValueError(f"frame {value('frame')!r} is not a frame number (0, 1, ...)") from error
        if frame < 0:
            raise ValueError(f"frame {frame} is negative")
        return _ClipFrame(existing("video"), frame, mask, index_of[name])
    if value("video"):
        try:
            frame_time = float(value("frame_time"))
        except ValueError as error:
            raise ValueError(f"frame_time {value('frame_time')!r} is not a number of seconds") from error
        if frame_time < 0:
            raise ValueError(f"frame_time {frame_time} is negative")
        return FramePrompt(where, existing("video"), frame_time, mask, index_of[name])
    start = audio_start
    if value("audio_start"):
        try:
            start = float(value("audio_start"))
        except ValueError as error:
            raise ValueError(f"audio_start {value('audio_start')!r} is not a number of seconds") from error
    return ImagePrompt(where, existing("image"), mask, existing("audio"), index_of[name], start)


def synth_prompt_set(synth_dir: str | Path, split: str | None = "test") -> PromptSet:
    """Every clip of a synthetic set (`avsync synth`), or of one split (None: all clips): its 16 frames,
    each prompted with its aligned window and scored against the synth mask; the class is the event's at
    that frame. Read from the manifest the generator writes beside its clips (`SYNTH_MANIFEST`), with
    its class list (`SYNTH_CLASSES`, in index order), so synthetic and real data take one path."""
    if split is not None and split not in SYNTH_SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SYNTH_SPLITS} or all")
    folder = Path(synth_dir)
    manifest, classes = folder / SYNTH_MANIFEST.format(split=split or "all"), folder / SYNTH_CLASSES
    for path in (manifest, classes):
        if path.is_file():
            continue
        if (folder / "synth.json").is_file():
            raise FileNotFoundError(
                f"{path}: not found; this synthetic set was written before avsync synth wrote localization "
                f"manifests: run avsync synth {folder} again with the same parameters (it adds them)"
            )
        raise FileNotFoundError(f"{folder} holds no synthetic set of avsync synth (no {path.name})")
    return read_manifest(manifest, read_class_list(classes))


# ---------------------------------------------------------------------------------------------- decoding
def crop_mask(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """A boolean mask `(H, W)` on the model input `(image_size, image_size)`, as DenseAV brings its
    ADE20K label maps there (torchvision `Resize(size, NEAREST)` + `CenterCrop(size)` on a PIL image):
    the short side to `image_size` nearest-neighbour (the long side truncated), then the centre crop
    (offsets rounded half to even, Python's `round`). Nearest-neighbour picks one label pixel per output
    pixel, so resizing the mask equals resizing the label map and comparing with the class."""
    height, width = mask.shape
    if width <= height:
        resized = (image_size, int(image_size * height / width))
    else:
        resized = (int(image_size * width / height), image_size)
    picture = Image.fromarray(mask.astype(np.uint8) * 255).resize(resized, Image.Resampling.NEAREST)
    left, top = int(round((resized[0] - image_size) / 2)), int(round((resized[1] - image_size) / 2))
    cropped = picture.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(cropped) > 0)


def read_mask(path: Path) -> np.ndarray:
    """A mask image as booleans `(H, W)`: nonzero = object (palette index, grey level, or any RGB channel)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA"):
                image = image.convert(image.mode[:-1])
            pixels = np.asarray(image)
    except (OSError, UnidentifiedImageError) as error:
        raise DecodeError(path, f"not a readable mask image: {error}") from error
    return pixels.any(axis=-1) if pixels.ndim == 3 else pixels != 0


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DecodeError(path, f"not a readable image: {error}") from error


def centred_window(fbank: torch.Tensor, centre: int, length: int, pad_value: float) -> torch.Tensor:
    """`(length, mel)` frames of `fbank` centred on frame `centre`; outside the sound: `pad_value`."""
    start = centre - length // 2
    before, after = max(0, -start), max(0, start + length - fbank.shape[0])
    window = fbank[max(0, start) : min(start + length, fbank.shape[0])]
    return F.pad(window, (0, 0, before, after), value=pad_value) if before or after else window


class PromptDataset(Dataset):
    """Sources -> dicts `audio (n, L, mel)`, `video (n, 3, S, S)`, `mask (n, S, S)` bool,
    `class_index (n,)`, `key` (n names); or `{"rejection": Rejection}` when the source cannot be read.

    Args:
        sources: what to decode (see the module docstring).
        image_size: the model's frame side `S`; audio_length: its window length `L`.
        alignment: frame-to-window alignment of `ClipPrompts` (SPEC §1).
        options: decoding options of videos (frames, durations, spectrogram; default: `avsync prepare`'s).
        mean, std: spectrogram normalization.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        image_size: int,
        audio_length: int,
        alignment: AlignmentMode = "clip",
        options: ExtractionOptions | None = None,
        mean: float = AUDIO_MEAN,
        std: float = AUDIO_STD,
    ) -> None:
        self.sources = list(sources)
        self.image_size, self.audio_length = image_size, audio_length
        self.alignment, self.options = alignment, options or ExtractionOptions()
        self.mean, self.std = mean, std
        self.image_geometry = CenterFrame(image_size)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index]
        try:
            if isinstance(source, ImagePrompt):
                return self._image_prompt(source)
            if isinstance(source, FramePrompt):
                return self._frame_prompt(source)
            return self._clip_prompts(source)
        except (DecodeError, ValueError) as error:  # a DecodeError's message starts with its file
            return {"rejection": Rejection(source.key, str(error))}

    # -- one kind of source each
    def _image_prompt(self, source: ImagePrompt) -> dict:
        image, mask = read_image(source.image), read_mask(source.mask)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"mask {source.mask.name} is {mask.shape[1]}x{mask.shape[0]}, image {source.image.name} is "
                f"{image.width}x{image.height}"
            )
        fbank = self._sound(source.audio)
        rate = 1000.0 / self.options.fbank.frame_shift_ms
        if source.audio_start is None:
            centre = fbank.shape[0] // 2
        else:
            start = round(source.audio_start * rate)
            if start >= fbank.shape[0]:
                raise ValueError(
                    f"audio_start {source.audio_start} s is past the end of {source.audio.name} "
                    f"({fbank.shape[0] / rate:.2f} s)"
                )
            centre = start + self.audio_length // 2
        window = centred_window(fbank, centre, self.audio_length, self.mean)
        return self._example([image], [mask], window[None], [source.class_index], [source.key])

    def _frame_prompt(self, source: FramePrompt) -> dict:
        with ClipSession(source.video) as session:  # the video is opened once, for frame and sound
            info = session.info
            check_duration(source.video, float(info.duration), self.options)
            if source.frame_time >= info.duration:
                raise ValueError(
                    f"frame_time {source.frame_time} s is past the video's end ({float(info.duration):.2f} s)"
                )
            frames = session.frames([Fraction(source.frame_time)], self.options.short_side)
            mask = read_mask(source.mask)
            width, height = frames.upright(info.width, info.height)  # a rotated video's frames are upright
            if mask.shape != (height, width):
                raise ValueError(
                    f"mask {source.mask.name} is {mask.shape[1]}x{mask.shape[0]}, video {source.video.name} "
                    f"is {width}x{height}"
                )
            waveform = session.audio(self.options.fbank.sample_rate, self.options.mono, MAX_AUDIO_SECONDS)
        fbank = self._fbank(waveform.samples, source.video)
        centre = round(source.frame_time * fbank.shape[0] / float(info.duration))
        window = centred_window(fbank, centre, self.audio_length, self.mean)
        image = Image.fromarray(frames.images[0])
        return self._example([image], [mask], window[None], [source.class_index], [source.key])

    def _clip_prompts(self, source: ClipPrompts) -> dict:
        frames = list(source.frames)
        if max(frames) >= self.options.num_frames:
            raise ValueError(f"frame {max(frames)} is past the clip's {self.options.num_frames} SPEC frames")
        clip = extract_video_clip(source.video, self.options)
        size = (clip.metadata["height"], clip.metadata["width"])
        masks = [read_mask(path) for path in source.masks]
        for path, mask in zip(source.masks, masks, strict=True):
            if mask.shape != size:
                raise ValueError(
                    f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, the video is {size[1]}x{size[0]}"
                )
        fbank = torch.from_numpy(clip.fbank).float()
        audio = aligned_windows(fbank, self.options.num_frames, self.audio_length, self.alignment, self.mean)
        audio = audio[frames]
        images = [Image.open(io.BytesIO(clip.frames[i])).convert("RGB") for i in frames]
        keys = [f"{source.key}/f{i:02d}" for i in frames]
        return self._example(images, masks, audio, list(source.class_indices), keys)

    # -- shared
    def _sound(self, path: Path) -> torch.Tensor:
        with open_media(path) as container:
            waveform = decode_audio(
                container, path, self.options.fbank.sample_rate, self.options.mono, MAX_AUDIO_SECONDS
            )
        return self._fbank(waveform.samples, path)

    def _fbank(self, samples: np.ndarray, path: Path) -> torch.Tensor:
        fbank = log_mel_fbank(samples, self.options.fbank)
        if fbank.shape[0] == 0:
            raise DecodeError(path, "sound shorter than one spectrogram frame")
        return fbank

    def _example(
        self,
        images: list[Image.Image],
        masks: list[np.ndarray],
        audio: torch.Tensor,
        classes: list[int],
        keys: list[str],
    ) -> dict:
        return {
            "audio": (audio - self.mean) / self.std,
            "video": frames_to_tensor([self.image_geometry(image) for image in images]),
            "mask": torch.stack([crop_mask(mask, self.image_size) for mask in masks]),
            "class_index": torch.tensor(classes, dtype=torch.long),
            "key": keys,
        }


class MismatchedSounds(Dataset):
    """A control for sound-prompted segmentation: the images, masks and classes of source `i`, prompted
    with the sounds of source `i + 1` (cyclically; a source with fewer sounds than images lends them
    in turn). Maps that follow the sound score lower than with the right sounds; maps that ignore it
    (objectness, a shared direction of the tokens) score the same.

    Sources are read in order, so the lender decoded for source `i` is kept to serve as source `i + 1`
    itself: each source is decoded once, not twice."""

    def __init__(self, prompts: PromptDataset) -> None:
        if len(prompts) < 2:
            raise ValueError("the mismatched-sound control needs at least two sources to swap sounds between")
        self.prompts = prompts
        self._last: tuple[int, dict] | None = None  # (index, decoded item) of the latest lender

    def __len__(self) -> int:
        return len(self.prompts)

    def _decoded(self, index: int) -> dict:
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        return self.prompts[index]

    def __getitem__(self, index: int) -> dict:
        item = self._decoded(index)
        if "rejection" in item:
            return item
        lender = (index + 1) % len(self.prompts)
        other = self._decoded(lender)
        self._last = (lender, other)
        if "rejection" in other:
            return {
                "rejection": Rejection(
                    self.prompts.sources[index].key,
                    f"its control sound comes from {other['rejection'].source}, which could not be read",
                )
            }
        sounds = other["audio"]
        return item | {"audio": sounds[torch.arange(len(item["audio"])) % len(sounds)]}


def collate_prompts(items: list[dict]) -> dict:
    """Concatenate the prompts of a batch of sources; `skipped` lists the sources that failed. With no
    readable source the tensors are absent (`audio` is None)."""
    good = [item for item in items if "rejection" not in item]
    batch: dict = {"skipped": [item["rejection"] for item in items if "rejection" in item]}
    if not good:
        return batch | {"audio": None, "video": None, "mask": None, "class_index": None, "key": []}
    for name in ("audio", "video", "mask", "class_index"):
        batch[name] = torch.cat([item[name] for item in good])
    batch["key"] = [key for item in good for key in item["key"]]
    return batch


def read_class_list(path: str | Path) -> list[str]:
    """Class names, one per line, or a CSV whose `name`/`display_name`/`mid` column holds them."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        return [str(name) for name in json.loads(text)]
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        for column in ("name", "display_name", "mid"):
            if rows and column in rows[0]:
                return [row[column].strip() for row in rows]
        raise ValueError(f"{path}: a class CSV needs a name, display_name or mid column")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- data module
class LocalizationDataModule(L.LightningDataModule):
    """The prompts of a sound-prompted segmentation run, for `trainer.test`.

    Args:
        manifest: a CSV manifest (see `read_manifest`); or
        synth: a synthetic set (`avsync synth`), every frame of a split prompted with its own window
            (the split's manifest that `avsync synth` writes there, `synth_prompt_set`).
        split: the synthetic split: `train`, `test` or `all`.
        classes: a class-list file (`read_class_list`) for a manifest; rows naming another class are
            refused. Default: the classes the manifest names, sorted.
        audio_start: seconds into each prompt sound where its window starts (default: centred).
        mismatched_sounds: the control of `MismatchedSounds` (each source prompted with the next one's
            sounds).
        batch_size: sources per batch (a synthetic clip is 16 prompts); num_workers: loader processes.
        alignment: frame-to-window alignment of synthetic clips (SPEC §1).
        image_size, audio_length: the model's frame side and window length; default: those of the
            test run's `LocalizationModule` backbone.
    """

    def __init__(
        self,
        manifest: str | None = None,
        synth: str | None = None,
        split: str = "test",
        classes: str | None = None,
        audio_start: float | None = None,
        mismatched_sounds: bool = False,
        batch_size: int = 4,
        num_workers: int = 0,
        alignment: AlignmentMode = "clip",
        image_size: int | None = None,
        audio_length: int | None = None,
    ) -> None:
        super().__init__()
        if manifest is not None and synth is not None:
            raise ValueError("give a manifest or a synthetic set (synth), not both")
        check_count("LocalizationDataModule", "batch_size", batch_size, 1)  # ConfigError naming the key
        check_count("LocalizationDataModule", "num_workers", num_workers, 0)
        check_count("LocalizationDataModule", "image_size", image_size, 1, optional=True)
        check_count("LocalizationDataModule", "audio_length", audio_length, 1, optional=True)
        check_number("LocalizationDataModule", "audio_start", audio_start, 0, optional=True)
        self.manifest, self.synth, self.split = manifest, synth, split
        self.classes, self.audio_start = classes, audio_start
        self.mismatched_sounds = mismatched_sounds
        self.batch_size, self.num_workers, self.alignment = batch_size, num_workers, alignment
        self.image_size, self.audio_length = image_size, audio_length
        #: how videos are decoded (default: `avsync prepare`'s); a Python-side setting, not a config key.
        self.options = ExtractionOptions()
        self._prompts: PromptSet | None = None

    @classmethod
    def from_prompts(cls, prompts: PromptSet, **kwargs) -> LocalizationDataModule:
        """A data module serving `prompts` already read (by `read_manifest` or `synth_prompt_set`)."""
        data = cls(**kwargs)
        data._prompts = prompts
        return data

    @property
    def prompts(self) -> PromptSet:
        """The sources, class names and refused rows; read on first use."""
        if self._prompts is None:
            if self.manifest is not None:
                names = read_class_list(self.classes) if self.classes else None
                self._prompts = read_manifest(self.manifest, names, self.audio_start)
            elif self.synth is not None:
                self._prompts = synth_prompt_set(self.synth, None if self.split == "all" else self.split)
            else:
                raise ValueError("LocalizationDataModule needs a manifest or a synthetic set (synth)")
            if self.mismatched_sounds and len(self._prompts.sources) < 2:
                raise ValueError(
                    "the mismatched-sound control needs at least two sources to swap sounds between"
                )
        return self._prompts

    @property
    def class_names(self) -> list[str]:
        return self.prompts.class_names

    @property
    def rejected(self) -> list[Rejection]:
        """Manifest rows refused while reading (sources that fail to decode travel in the batches)."""
        return self.prompts.rejected

    def describe(self) -> dict:
        """What was scored, for reports."""
        if self.manifest is not None:
            return {"manifest": str(self.manifest)}
        if self.synth is not None:
            return {"synth": str(self.synth), "split": self.split}
        return {"prompts": len(self.prompts.sources)}

    def setup(self, stage: str) -> None:
        backbone = getattr(self.trainer.lightning_module, "backbone", None) if self.trainer else None
        if self.image_size is None and backbone is not None:
            self.image_size = backbone.image_size
        if self.audio_length is None and backbone is not None:
            self.audio_length = backbone.audio_length
        self.prompts  # noqa: B018 - read the manifest now: its errors before any batch

    def test_dataloader(self) -> DataLoader:
        if self.image_size is None or self.audio_length is None:
            raise ValueError(
                "LocalizationDataModule needs image_size and audio_length (or a backbone to read)"
            )
        dataset: Dataset = PromptDataset(
            self.prompts.sources, self.image_size, self.audio_length, self.alignment, self.options
        )
        if self.mismatched_sounds:
            dataset = MismatchedSounds(dataset)
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_prompts
        )
