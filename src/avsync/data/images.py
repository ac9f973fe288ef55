"""Stored-frame conventions: short side brought down to a size with PIL bicubic, never upscaled; JPEG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """`(width, height)` with the short side brought down to `short_side`, aspect kept; never upscaled."""
    if short_side is None or min(width, height) <= short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def shrink(image: Image.Image, short_side: int | None) -> Image.Image:
    """`image` with its short side at most `short_side` (bicubic, antialiased by PIL's filter support)."""
    size = scaled_size(image.width, image.height, short_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def encode_jpeg(image: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    """Baseline JPEG bytes of an RGB image (deterministic for a given libjpeg)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
