"""The synthetic classes: what each one looks like and what it sounds like.

A class is fixed by its index and the number of classes alone (never by the seed), so `synth_3` is the
same object and the same sound in every set of the same size. The designs keep both modalities apart on
their own: every class has its own colour-and-shape pair and its own pitch (log-spaced, several Mel bins
apart at 16 kHz), and texture and timbre vary on top so the classes are not told apart by one feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Saturated colours about 45 degrees of hue apart; the background is kept grey-ish so they stand out.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (225, 215, 30),
    "green": (40, 180, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 80, 230),
    "purple": (140, 60, 220),
    "magenta": (220, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
TEXTURES = ("solid", "striped", "checkered", "dotted")
#: tone: fundamental + weak 2nd harmonic; buzz: six decaying harmonics; pulses: 4-Hz amplitude
#: modulation (level between 0.2 and 1); warble: 5-Hz vibrato of +-2 %. The fundamental is always
#: the strongest partial (it is what the pitch in the display name means).
TIMBRES = ("tone", "buzz", "pulses", "warble")
#: Pitches span four octaves; with 32 classes neighbours are still 9 % (about 1.5 semitones) apart.
LOWEST_PITCH_HZ, HIGHEST_PITCH_HZ = 200.0, 3200.0
MAX_CLASSES = 32


@dataclass(frozen=True)
class SynthClass:
    index: int
    colour: str
    shape: str
    texture: str
    pitch_hz: float
    timbre: str

    @property
    def mid(self) -> str:
        return f"synth_{self.index}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.colour]

    @property
    def display_name(self) -> str:
        texture = "" if self.texture == "solid" else f"{self.texture} "
        return f"{self.colour} {texture}{self.shape} / {self.pitch_hz:g} Hz {self.timbre}"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "mid": self.mid,
            "display_name": self.display_name,
            "colour": self.colour,
            "rgb": list(self.rgb),
            "shape": self.shape,
            "texture": self.texture,
            "pitch_hz": self.pitch_hz,
            "timbre": self.timbre,
        }


def class_catalogue(num_classes: int) -> list[SynthClass]:
    """The `num_classes` class designs.

    Colour cycles every 8 classes and the shape is shifted by one on each cycle, so (colour, shape) never
    repeats below 64 classes; with 8 classes or fewer every class has its own colour *and* its own shape.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the synthetic set supports 1 to {MAX_CLASSES} classes, got {num_classes}")
    colours = list(PALETTE)
    span = HIGHEST_PITCH_HZ / LOWEST_PITCH_HZ
    return [
        SynthClass(
            index=k,
            colour=colours[k % len(colours)],
            shape=SHAPES[(k + k // len(colours)) % len(SHAPES)],
            texture=TEXTURES[k % len(TEXTURES)],
            pitch_hz=float(round(LOWEST_PITCH_HZ * span ** (k / max(1, num_classes - 1)))),
            timbre=TIMBRES[(k + k // len(TIMBRES)) % len(TIMBRES)],
        )
        for k in range(num_classes)
    ]
