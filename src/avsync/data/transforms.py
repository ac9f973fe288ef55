"""What a stored frame and a stored spectrogram become on their way into the model (SPEC §1).

Images: evaluation resizes the short side to `image_size` (bicubic) and centre-crops; training may use
RandomResizedCrop (scale 0.08-1, ratio 0.9-1.1) and a horizontal flip; both end with ImageNet
normalization. The geometry runs on PIL images, as torchvision's transforms do on PIL input, with
two shortcuts for speed: the evaluation resize-and-crop is one `resize(..., box=...)` whose box is the
source region that resize-then-crop keeps (same pixels to within rounding, without resizing what is
cropped away; see the tests; frames stored at `size` are only cropped), and frames are normalized
in one pass per batch (`normalize_pixels`) - this is the hot loop of evaluation, 16 frames per clip.
Training crops are drawn by torchvision's `RandomResizedCrop.get_params` (torch's RNG, seeded per
DataLoader worker) and applied exactly as torchvision does.

Audio: the window that goes with frame `i` (`avsync.data.alignment`) is cut from the raw clip
spectrogram, then normalized `(x - mean) / std`. In `clip` alignment the part of a window outside the
clip is filled with `mean` before normalizing, i.e. with 0 after: the dataset mean, not a made-up
sound. Training may mask frequency bands and time spans (set to 0, the mean), add noise, and shift
each window in time (CAV-MAE's random time shift, `random_time_shift`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchaudio.transforms as audio_transforms
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from avsync.data.alignment import (
    AUTHORS_SPECTROGRAM_FRAMES,
    AlignmentMode,
    aligned_window,
    aligned_windows,
    fit_length,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Dataset statistics of the log-Mel spectrogram (supplementary Table 9).
AUDIO_MEAN = -5.081
AUDIO_STD = 4.4849

_SCALE = (1 / (255 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_SHIFT = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


class CenterFrame:
    """Short side resized to `size` (bicubic), centre `size x size` crop - as torchvision's
    `Resize(size)` + `CenterCrop(size)`, in one resampling pass."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height, size = image.width, image.height, self.size
        if width <= height:  # torchvision's output size: the long side truncated
            resized_width, resized_height = size, int(size * height / width)
        else:
            resized_width, resized_height = int(size * width / height), size
        left, top = int(round((resized_width - size) / 2)), int(round((resized_height - size) / 2))
        if (resized_width, resized_height) == (width, height):
            # Stored at the model's size (`prepare --short-side 224`): the resize is the identity (PIL's
            # bicubic at scale 1 samples the pixels themselves), so only the crop is left to do.
            return image.crop((left, top, left + size, top + size))
        x_scale, y_scale = resized_width / width, resized_height / height
        box = (left / x_scale, top / y_scale, (left + size) / x_scale, (top + size) / y_scale)
        return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


class RandomFrame:
    """Training geometry: RandomResizedCrop (or the centre crop) to `size`, then a random flip."""

    def __init__(
        self,
        size: int,
        random_resized_crop: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (0.9, 1.1),
        horizontal_flip: bool = True,
    ) -> None:
        self.size, self.random_resized_crop = size, random_resized_crop
        self.crop_scale, self.crop_ratio = list(crop_scale), list(crop_ratio)
        self.horizontal_flip = horizontal_flip
        self.center = CenterFrame(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.random_resized_crop:
            top, left, height, width = RandomResizedCrop.get_params(image, self.crop_scale, self.crop_ratio)
            image = image.crop((left, top, left + width, top + height))  # as torchvision: crop, then resize
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:
            image = self.center(image)
        if self.horizontal_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def frames_to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB images -> their uint8 pixels `(N, H, W, 3)`, one copy."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images]))


def normalize_pixels(pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels `(..., H, W, 3)` -> ImageNet-normalized float32 `(..., 3, H, W)`, written into `out`
    when given (a slice of a batch): one layout-changing copy and one fused scale-and-shift, on the
    pixels' device."""
    *lead, height, width, _ = pixels.shape
    if out is None:
        out = torch.empty((*lead, 3, height, width), dtype=torch.float32, device=pixels.device)
    out.copy_(pixels.movedim(-1, -3))
    return out.mul_(_SCALE.to(out.device)).add_(_SHIFT.to(out.device))


def normalize_batch_video(batch):
    """A batch dict whose `video` is uint8 pixels `(..., H, W, 3)` (sent to the device as bytes, a
    quarter of float32's) with `video` normalized where it is; any other batch as it is."""
    video = batch.get("video") if isinstance(batch, dict) else None
    if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
        batch = {**batch, "video": normalize_pixels(video)}
    return batch


def frames_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB images -> ImageNet-normalized float32 `(N, 3, H, W)`."""
    return normalize_pixels(frames_to_pixels(images))


class AudioWindows:
    """Raw clip spectrogram `(S, mel)` -> normalized window(s) aligned with frame(s) of `num_frames`."""

    def __init__(
        self,
        num_frames: int,
        window_length: int,
        alignment: AlignmentMode = "clip",
        mean: float = AUDIO_MEAN,
        std: float = AUDIO_STD,
    ) -> None:
        self.num_frames, self.window_length, self.alignment = num_frames, window_length, alignment
        self.mean, self.std = mean, std

    def window(self, fbank: torch.Tensor, frame_index: int) -> torch.Tensor:
        """`(window_length, mel)` for frame `frame_index`."""
        window = aligned_window(
            fbank, frame_index, self.num_frames, self.window_length, self.alignment, self.mean
        )
        return (window - self.mean) / self.std

    def windows(self, fbank: torch.Tensor) -> torch.Tensor:
        """`(num_frames, window_length, mel)`, one window per frame.

        The (smaller) spectrogram is normalized before the (overlapping) windows are cut; the values
        are the same as cutting first: `authors` zero-pads to 1024 frames before normalizing, and the
        `clip` padding is the normalized mean, 0."""
        if self.alignment == "authors":
            fbank = fit_length(fbank, AUTHORS_SPECTROGRAM_FRAMES)
        normalized = (fbank - self.mean) / self.std
        return aligned_windows(normalized, self.num_frames, self.window_length, self.alignment, 0.0)


def random_time_shift(windows: torch.Tensor) -> torch.Tensor:
    """CAV-MAE's random time shift (`src/dataloader.py`, `AudiosetDataset.__getitem__`, under `noise`):
    each normalized model input `(L, mel)` rolled circularly along time by `k` drawn uniformly from
    `[-L, L)` (numpy's `randint(-L, L)`; here torch's RNG, seeded per DataLoader worker).

    CAV-MAE's input is the whole clip (`L` = 1024); CAV-MAE Sync's is the window aligned with one frame,
    so the window is what rolls: rolling the clip before cutting would pair the frame with other moments'
    audio. `(..., L, mel)`: every window draws its own shift."""
    length = windows.shape[-2]
    flat = windows.reshape(-1, length, windows.shape[-1])
    shifts = torch.randint(-length, length, (flat.shape[0],)).tolist()
    rolled = [torch.roll(window, shift, dims=0) for window, shift in zip(flat, shifts, strict=True)]
    return torch.stack(rolled).view(windows.shape)


class AudioAugmentation:
    """SpecAugment-style masking (torchaudio), Gaussian noise and the random time shift, in that order, on
    normalized `(..., L, mel)` windows; the shift comes last, as in CAV-MAE."""

    def __init__(
        self, freq_mask: int = 0, time_mask: int = 0, noise_std: float = 0.0, time_shift: bool = False
    ) -> None:
        self.freq_mask = audio_transforms.FrequencyMasking(freq_mask) if freq_mask > 0 else None
        self.time_mask = audio_transforms.TimeMasking(time_mask) if time_mask > 0 else None
        self.noise_std, self.time_shift = noise_std, time_shift

    @property
    def active(self) -> bool:
        return (
            self.freq_mask is not None or self.time_mask is not None or self.noise_std > 0 or self.time_shift
        )

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        spectrogram = window.transpose(-1, -2)  # torchaudio masks (..., freq, time)
        if self.freq_mask is not None:
            spectrogram = self.freq_mask(spectrogram)
        if self.time_mask is not None:
            spectrogram = self.time_mask(spectrogram)
        window = spectrogram.transpose(-1, -2)
        if self.noise_std > 0:
            window = window + self.noise_std * torch.randn_like(window)
        if self.time_shift:
            window = random_time_shift(window)
        return window
