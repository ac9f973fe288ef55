"""Pixels and samples of the synthetic clips: a cluttered background, class objects, class sounds.

Objects are drawn without anti-aliasing, so their masks are exact. The background is kept low in
saturation (greys with a faint tint) and the objects saturated, so a class's colour only appears where
its object is; clutter shapes and grain make the frames more than a flat colour field.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from avsync.synth.classes import SynthClass

#: Brightness of the dark parts of a texture, relative to the class colour (same hue, darker).
TEXTURE_SHADE = 0.55
#: Objects take this fraction of the frame side.
OBJECT_SCALE = (0.3, 0.5)
#: Event sounds fade in and out over this long, so boundaries do not click.
FADE_SECONDS = 0.01
#: Nominal loudness (RMS) of an event sound; each event draws its level from this range.
SOUND_RMS = (0.05, 0.1)


def render_background(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """`(H, W, 3)` float32: a smooth grey field with a faint tint, grey clutter shapes and grain."""
    width, height = frame_dims(size)
    dims = np.array([width, height], dtype=np.float64)
    grey = rng.uniform(70, 180, (5, 5, 1))
    tint = rng.normal(0, 8, (5, 5, 3))
    coarse = Image.fromarray(np.clip(grey + tint, 0, 255).astype(np.uint8), "RGB")
    image = coarse.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):
        level = rng.uniform(30, 230) + rng.normal(0, 6, 3)
        fill = tuple(int(v) for v in np.clip(level, 0, 255))
        side = rng.uniform(0.08, 0.3, 2) * dims
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * dims
        box = [x0, y0, x0 + side[0], y0 + side[1]]
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.line(box, fill=fill, width=int(rng.integers(1, 4)))
    grain = rng.normal(0, 5, (height, width, 1))
    return np.asarray(image, dtype=np.float32) + grain.astype(np.float32)


def place_object(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[int, int, int]:
    """A random square box `(x0, y0, side)` that lies wholly inside the frame (side: of the short side)."""
    width, height = frame_dims(size)
    side = int(round(rng.uniform(*OBJECT_SCALE) * min(width, height)))
    if width == height:
        x0, y0 = (int(v) for v in rng.integers(0, width - side + 1, 2))
    else:
        x0, y0 = (int(v) for v in rng.integers(0, [width - side + 1, height - side + 1]))
    return x0, y0, side


def frame_dims(size: int | tuple[int, int]) -> tuple[int, int]:
    """`(width, height)` of a frame given as one side (square) or as `(width, height)`."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def shape_mask(shape: str, size: int | tuple[int, int], box: tuple[int, int, int]) -> np.ndarray:
    """`(height, width)` bool: the pixels of `shape` drawn in `box` (`size`: a square's side or `(w, h)`)."""
    x0, y0, side = box
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy, radius = x0 + (side - 1) / 2, y0 + (side - 1) / 2, (side - 1) / 2
    image = Image.new("L", frame_dims(size), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        inset = 0.1 * side
        draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "cross":
        arm = side / 6
        draw.rectangle([x0, cy - arm, x1, cy + arm], fill=255)
        draw.rectangle([cx - arm, y0, cx + arm, y1], fill=255)
    elif shape == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=255)
        hole = 0.5 * radius
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [radius, 0.45 * radius] * 5), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [radius] * 6), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(image) > 0


def _polygon(cx: float, cy: float, radii: list[float]) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced in angle, the first pointing up."""
    step = 2 * math.pi / len(radii)
    return [
        (cx + r * math.cos(-math.pi / 2 + i * step), cy + r * math.sin(-math.pi / 2 + i * step))
        for i, r in enumerate(radii)
    ]


def texture_shading(texture: str, size: int | tuple[int, int], box: tuple[int, int, int]) -> np.ndarray:
    """`(height, width)` float32 brightness factors (1 or :data:`TEXTURE_SHADE`), anchored to the object."""
    x0, y0, side = box
    cell = max(2, side // 8)
    width, height = frame_dims(size)
    yy, xx = np.mgrid[0:height, 0:width]
    u, v = xx - x0, yy - y0
    if texture == "solid":
        dark = np.zeros((height, width), dtype=bool)
    elif texture == "striped":
        dark = ((u + v) // cell) % 2 == 1
    elif texture == "checkered":
        dark = (u // cell + v // cell) % 2 == 1
    elif texture == "dotted":
        du, dv = u % (2 * cell) - cell + 0.5, v % (2 * cell) - cell + 0.5
        dark = du**2 + dv**2 <= (0.7 * cell) ** 2
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(dark, TEXTURE_SHADE, 1.0).astype(np.float32)


def draw_object(
    background: np.ndarray, synth_class: SynthClass, box: tuple[int, int, int], brightness: float
) -> tuple[np.ndarray, np.ndarray]:
    """The background with the class object in `box` (float32 `(H, W, 3)`), and the object's mask."""
    size = (background.shape[1], background.shape[0])
    mask = shape_mask(synth_class.shape, size, box)
    shading = texture_shading(synth_class.texture, size, box)
    colour = np.asarray(synth_class.rgb, dtype=np.float32) * brightness
    frame = np.where(mask[..., None], shading[..., None] * colour, background)
    return frame.astype(np.float32), mask


def render_sound(
    synth_class: SynthClass, rng: np.random.Generator, num_samples: int, sample_rate: int
) -> np.ndarray:
    """One event's sound, float32 `(num_samples,)`: the class timbre at the class pitch (+-1 %)."""
    t = np.arange(num_samples) / sample_rate
    pitch = synth_class.pitch_hz * (1 + rng.uniform(-0.01, 0.01))
    phase = 2 * math.pi * pitch * t
    envelope = np.ones_like(t)
    partials = [1.0, 0.3]
    if synth_class.timbre == "buzz":
        partials = [1 / h**1.1 for h in range(1, 7)]
    elif synth_class.timbre == "pulses":
        partials = [1.0, 0.4, 0.2]
        envelope = 0.6 + 0.4 * np.cos(2 * math.pi * 4.0 * t + rng.uniform(0, 2 * math.pi))
    elif synth_class.timbre == "warble":
        rate, depth = 5.0, 0.02  # instantaneous pitch: pitch * (1 + depth * sin(2 pi rate t))
        phase = phase - pitch * depth / rate * np.cos(2 * math.pi * rate * t + rng.uniform(0, 2 * math.pi))
    wave = np.zeros_like(t)
    for harmonic, amplitude in enumerate(partials, start=1):
        if harmonic * pitch * 1.03 < 0.45 * sample_rate:  # keep every partial clear of Nyquist
            wave += amplitude * np.sin(harmonic * phase + rng.uniform(0, 2 * math.pi))
    wave *= envelope
    wave *= rng.uniform(*SOUND_RMS) / max(float(np.sqrt(np.mean(wave**2))), 1e-12)
    fade = min(int(FADE_SECONDS * sample_rate), num_samples // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        wave[:fade] *= ramp
        wave[num_samples - fade :] *= ramp[::-1]
    return wave.astype(np.float32)


def background_hiss(rng: np.random.Generator, num_samples: int, snr_db: float) -> np.ndarray:
    """White noise `snr_db` below the loudest event level, under the whole clip."""
    rms = SOUND_RMS[1] * 10 ** (-snr_db / 20)
    return (rng.standard_normal(num_samples) * rms).astype(np.float32)
