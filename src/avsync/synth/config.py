"""The parameters that define a synthetic set: validated once, compared to decide whether a set is cached.

Everything that changes a single pixel or sample of the output is a field here, so that two sets with
equal configs (and equal :data:`SYNTH_VERSION`) are the same set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from avsync.synth.classes import MAX_CLASSES

#: Bump whenever the rendering changes what a given config produces, so that cached sets are rebuilt.
SYNTH_VERSION = 1

#: The kinds of set `avsync synth` makes: `tones` (the demo's: pure-ish tones, still objects on a
#: grey, lightly cluttered square frame) and `speechlike` (formant-synthesized syllables over noise,
#: moving objects with a silent distractor on a busy frame; stereo, 22.05 kHz, 320x240, 8 fps).
KINDS = ("tones", "speechlike")

#: What each kind takes when a parameter is not given: the demo's small mono clips, and for
#: `speechlike` the shape of a common web video (stereo 22.05 kHz, 320x240, 8 fps) with louder noise.
KIND_DEFAULTS: dict[str, dict] = {
    "tones": dict(fps="10", size=128, sample_rate=16000, channels=1, video_noise=4.0, audio_snr_db=30.0),
    "speechlike": dict(
        fps="8", size="320x240", sample_rate=22050, channels=2, video_noise=6.0, audio_snr_db=12.0
    ),
}

#: Sample rates the AAC encoder accepts (MPEG-4 sampling-frequency table).
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def parse_fps(value: float | int | str | Fraction) -> Fraction:
    """Frame rate as an exact fraction (`10`, `12.5`, `"30000/1001"`), so timestamps are exact."""
    try:
        fps = Fraction(str(value))
    except (ValueError, ZeroDivisionError) as error:
        raise ValueError(f"fps must be a number or a fraction like 30000/1001, got {value!r}") from error
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {value!r}")
    return fps


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize. Sizes in pixels, times in seconds, noise levels in 8-bit pixel units and dB."""

    clips: int
    classes: int
    seed: int = 0
    duration: float = 10.0
    fps: Fraction = Fraction(10)
    size: int = 128
    sample_rate: int = 16000
    holdout: float = 0.2
    events: tuple[int, int] = (2, 4)
    min_event: float = 1.5
    annotated_frames: int = 16
    video_noise: float = 4.0
    audio_snr_db: float = 30.0
    crf: int = 18
    kind: str = "tones"
    height: int | None = None
    channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "fps", parse_fps(self.fps))
        object.__setattr__(self, "events", tuple(int(n) for n in self.events))
        problems = []
        if self.clips < 1:
            problems.append(f"--clips must be at least 1, got {self.clips}")
        if not 1 <= self.classes <= MAX_CLASSES:
            problems.append(f"--classes must be between 1 and {MAX_CLASSES}, got {self.classes}")
        if self.duration <= 0:
            problems.append(f"--duration must be positive, got {self.duration}")
        elif abs(self.duration * self.fps - round(self.duration * self.fps)) > 1e-6:
            problems.append(
                f"--duration {self.duration} s at {self.fps} fps is not a whole number of frames "
                f"({float(self.duration * self.fps):.3f}); pick a duration that is"
            )
        if self.kind not in KINDS:
            problems.append(f"--kind must be one of {KINDS}, got {self.kind!r}")
        for side in sorted({self.size, self.frame_height}):
            if side < 16 or side % 2:
                problems.append(
                    f"--size sides must be even numbers of pixels >= 16 (H.264 4:2:0), got {side}"
                )
        if self.channels not in (1, 2):
            problems.append(f"--channels must be 1 or 2, got {self.channels}")
        if self.sample_rate not in AAC_SAMPLE_RATES:
            problems.append(
                f"--sample-rate {self.sample_rate} is not an AAC rate; use one of {AAC_SAMPLE_RATES}"
            )
        if not 0 <= self.holdout < 1:
            problems.append(f"--holdout must be in [0, 1), got {self.holdout}")
        if len(self.events) != 2 or not 1 <= self.events[0] <= self.events[1]:
            problems.append(f"--events must be MIN MAX with 1 <= MIN <= MAX, got {self.events}")
        if self.min_event <= 0:
            problems.append(f"--min-event must be positive, got {self.min_event}")
        if self.annotated_frames < 1:
            problems.append(f"annotated_frames must be at least 1, got {self.annotated_frames}")
        if not 0 <= self.crf <= 51:
            problems.append(f"crf must be in [0, 51], got {self.crf}")
        if problems:
            raise ValueError("invalid synth parameters: " + "; ".join(problems))

    @property
    def frame_height(self) -> int:
        """`size` is the frame width; the height is `height`, or `size` (square) when not given."""
        return self.size if self.height is None else self.height

    @property
    def num_video_frames(self) -> int:
        return round(self.duration * self.fps)

    @property
    def num_audio_samples(self) -> int:
        return round(self.duration * self.sample_rate)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (fps as an exact fraction string); the form stored in `synth.json`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["fps"] = str(self.fps)
        values["events"] = list(self.events)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})
