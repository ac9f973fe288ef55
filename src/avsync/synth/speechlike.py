"""The `speechlike` kind: spoken-word-like sounds over noise, moving objects on busy frames.

A second set built differently from the demo's `tones`, for checking that a recipe learns on more than
its own data. Each class is a "word": two or three syllables, each a consonant-like noise burst and a
formant-synthesized vowel, under a class pitch contour (level, rising, falling, ...). An event repeats
its class's word with a randomly varied speaker (pitch, vocal-tract length, tempo) while the class's
object moves across the frame, a silent object of another class (the distractor) moves behind it, and
the background is a tinted field under many clutter shapes. Noise (pink, plus a low rumble) runs under
the whole clip, independently drawn per channel; the voice is panned with the sounding object's
horizontal position, so the two channels differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from avsync.synth.classes import MAX_CLASSES, PALETTE, SHAPES, TEXTURES, SynthClass
from avsync.synth.render import SOUND_RMS, draw_object, frame_dims

#: Vowel formants F1, F2, F3 in Hz (adult-male averages of the classic Peterson & Barney table).
VOWELS: dict[str, tuple[float, float, float]] = {
    "a": (730, 1090, 2440),
    "i": (270, 2290, 3010),
    "u": (300, 870, 2240),
    "e": (530, 1840, 2480),
    "o": (570, 840, 2410),
    "ae": (660, 1720, 2410),
    "er": (490, 1350, 1690),
    "uh": (520, 1190, 2390),
}
#: Formant bandwidths (Hz) and relative gains.
BANDWIDTHS = (90.0, 110.0, 170.0)
FORMANT_GAINS = (1.0, 0.5, 0.25)
#: Consonant onsets: centre (Hz) and width (Hz) of the noise band, or None for a voiced-only onset.
CONSONANTS: dict[str, tuple[float, float] | None] = {
    "s": (6500.0, 2500.0),
    "sh": (3200.0, 1200.0),
    "f": (4500.0, 4000.0),
    "h": (1500.0, 1500.0),
    "k": (2200.0, 600.0),
    "m": None,
}
#: Pitch contours over a word: multipliers of the base pitch at its start, middle and end.
CONTOURS: dict[str, tuple[float, float, float]] = {
    "level": (1.0, 1.0, 1.0),
    "rising": (0.85, 1.0, 1.35),
    "falling": (1.3, 1.05, 0.8),
    "rise-fall": (0.9, 1.35, 0.85),
    "fall-rise": (1.2, 0.85, 1.2),
}
#: Base pitches span this range (a low male to a child's voice).
LOWEST_F0_HZ, HIGHEST_F0_HZ = 95.0, 280.0
#: Harmonics are synthesized up to this frequency.
VOICE_BAND_HZ = 5000.0


@dataclass(frozen=True)
class SpeechClass(SynthClass):
    """A class of the speechlike kind: its object (colour, shape, texture, as for tones) and its word.

    `pitch_hz` is the base pitch of the word and `timbre` its pitch contour; `syllables` pairs each
    consonant onset with its vowel.
    """

    syllables: tuple[tuple[str, str], ...] = ()

    @property
    def word(self) -> str:
        return "-".join(consonant + vowel for consonant, vowel in self.syllables)

    @property
    def display_name(self) -> str:
        texture = "" if self.texture == "solid" else f"{self.texture} "
        return f"{self.colour} {texture}{self.shape} / '{self.word}' {self.timbre} {self.pitch_hz:g} Hz"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "word": self.word, "syllables": [list(s) for s in self.syllables]}


def speech_catalogue(num_classes: int) -> list[SpeechClass]:
    """`num_classes` designs, fixed by index and count alone. Shapes are paired with colours differently
    from the tones kind, and neighbouring classes differ in vowels, consonants, contour and pitch."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the synthetic set supports 1 to {MAX_CLASSES} classes, got {num_classes}")
    colours, vowels, consonants, contours = list(PALETTE), list(VOWELS), list(CONSONANTS), list(CONTOURS)
    span = HIGHEST_F0_HZ / LOWEST_F0_HZ
    classes = []
    for k in range(num_classes):
        count = 2 + k % 2
        syllables = tuple(
            (
                consonants[(k + 2 * j + k // 6) % len(consonants)],
                vowels[(3 * k + 5 * j + k // 8) % len(vowels)],
            )
            for j in range(count)
        )
        classes.append(
            SpeechClass(
                index=k,
                colour=colours[k % len(colours)],
                shape=SHAPES[(3 * k + 1 + k // len(colours)) % len(SHAPES)],
                texture=TEXTURES[(k + 1) % len(TEXTURES)],
                pitch_hz=float(
                    round(LOWEST_F0_HZ * span ** (((5 * k) % num_classes) / max(1, num_classes - 1)))
                ),
                timbre=contours[k % len(contours)],
                syllables=syllables,
            )
        )
    return classes


# ------------------------------------------------------------------------------------------------ sound
def render_word(
    speech_class: SpeechClass,
    rng: np.random.Generator,
    sample_rate: int,
    pitch: float,
    formant: float,
    tempo: float,
) -> np.ndarray:
    """One utterance of the class's word, float32: per syllable a noise-band onset and a voiced vowel.

    Additive synthesis: every harmonic of the (contoured) pitch is weighted by the vocal-tract envelope
    (three resonances, gliding between vowels over 40 ms), so the formants stay put while the pitch moves.
    """
    onsets, vowels = [], []
    for consonant, vowel in speech_class.syllables:
        onsets.append(CONSONANTS[consonant])
        vowels.append(np.asarray(VOWELS[vowel]) * formant)
    onset_len = int(0.07 * tempo * sample_rate)
    vowel_len = int(rng.uniform(0.17, 0.24) * tempo * sample_rate)
    syllable_len = onset_len + vowel_len
    n = syllable_len * len(vowels)
    t = np.arange(n) / n
    contour = np.asarray(CONTOURS[speech_class.timbre])
    f0 = pitch * np.interp(t, [0.0, 0.5, 1.0], contour)
    # Formant tracks: each syllable's vowel, with a glide from the previous one.
    formants = np.repeat(np.stack(vowels), syllable_len, axis=0)  # (n, 3)
    glide = int(0.04 * sample_rate)
    for j in range(1, len(vowels)):
        start = j * syllable_len
        ramp = np.linspace(0, 1, glide)[:, None]
        formants[start : start + glide] = vowels[j - 1] + ramp * (vowels[j] - vowels[j - 1])
    voiced = np.zeros(n)
    noisy = np.zeros(n)
    attack, release = int(0.015 * sample_rate), int(0.04 * sample_rate)
    for j, onset in enumerate(onsets):
        start = j * syllable_len
        envelope = np.ones(vowel_len)
        envelope[:attack] = np.linspace(0, 1, attack)
        envelope[-release:] = np.linspace(1, 0, release)
        voiced[start + onset_len : start + syllable_len] = envelope
        if onset is None:  # a nasal-like voiced onset: the vowel starts early and softly
            voiced[start : start + onset_len] = np.linspace(0, 0.5, onset_len)
    phase = 2 * math.pi * np.cumsum(f0) / sample_rate + rng.uniform(0, 2 * math.pi)
    wave = np.zeros(n)
    top = min(VOICE_BAND_HZ, 0.45 * sample_rate)
    for h in range(1, int(top / f0.min()) + 1):
        freq = h * f0
        gain = np.zeros(n)
        for i in range(3):
            gain += FORMANT_GAINS[i] / (1 + ((freq - formants[:, i]) / (BANDWIDTHS[i] / 2)) ** 2)
        gain *= (freq < top) / math.sqrt(h)
        wave += gain * np.sin(h * phase)
    wave *= voiced
    # Consonant onsets: band-limited noise bursts, shaped in the frequency domain.
    for j, onset in enumerate(onsets):
        if onset is None:
            continue
        centre, width = onset
        burst = rng.standard_normal(onset_len)
        spectrum = np.fft.rfft(burst)
        freqs = np.fft.rfftfreq(onset_len, 1 / sample_rate)
        spectrum *= np.exp(-0.5 * ((freqs - min(centre, 0.4 * sample_rate)) / (width / 2)) ** 2)
        burst = np.fft.irfft(spectrum, onset_len) * np.hanning(onset_len)
        noisy[j * syllable_len : j * syllable_len + onset_len] = burst
    voiced_rms = math.sqrt(float(np.mean(wave[voiced > 0.5] ** 2))) if (voiced > 0.5).any() else 1.0
    noise_rms = math.sqrt(float(np.mean(noisy**2))) or 1.0
    return (wave / voiced_rms + 0.5 * noisy / noise_rms).astype(np.float32)


def render_speech(
    speech_class: SpeechClass, rng: np.random.Generator, num_samples: int, sample_rate: int
) -> np.ndarray:
    """One event's sound, float32 `(num_samples,)`: the word said over and over by one varied speaker,
    with pauses between repetitions, at an RMS drawn from :data:`SOUND_RMS`."""
    pitch = speech_class.pitch_hz * rng.uniform(0.93, 1.07)
    formant, tempo = rng.uniform(0.94, 1.06), rng.uniform(0.9, 1.1)
    out = np.zeros(num_samples, dtype=np.float32)
    position = int(rng.uniform(0.02, 0.15) * sample_rate)
    while position < num_samples:
        word = render_word(speech_class, rng, sample_rate, pitch, formant, tempo)
        end = min(num_samples, position + len(word))
        out[position:end] = word[: end - position]
        position = end + int(rng.uniform(0.12, 0.3) * sample_rate)
    out *= rng.uniform(*SOUND_RMS) / max(float(np.sqrt(np.mean(out**2))), 1e-12)
    fade = min(int(0.01 * sample_rate), num_samples // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
        out[:fade] *= ramp
        out[num_samples - fade :] *= ramp[::-1]
    return out


def background_noise(
    rng: np.random.Generator, num_samples: int, sample_rate: int, snr_db: float
) -> np.ndarray:
    """`(2, num_samples)`: pink noise plus a slowly swelling low rumble, `snr_db` below the loudest event
    level, drawn independently for each channel."""
    channels = []
    freqs = np.fft.rfftfreq(num_samples, 1 / sample_rate)
    pink = 1 / np.sqrt(np.maximum(freqs, 20.0))
    rumble = np.exp(-0.5 * ((freqs - 120.0) / 60.0) ** 2) * 3.0
    swell = 1 + 0.5 * np.sin(2 * math.pi * rng.uniform(0.1, 0.3) * np.arange(num_samples) / sample_rate)
    for _ in range(2):
        spectrum = np.fft.rfft(rng.standard_normal(num_samples))
        noise = np.fft.irfft(spectrum * (pink + rumble), num_samples) * swell
        channels.append(noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12))
    rms = SOUND_RMS[1] * 10 ** (-snr_db / 20)
    return (np.stack(channels) * rms).astype(np.float32)


def pan(mono: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Constant-power stereo `(2, n)` of `mono`, `position` per sample in [0, 1] (0 = left)."""
    angle = np.clip(position, 0, 1) * (math.pi / 2)
    return np.stack([mono * np.cos(angle), mono * np.sin(angle)]).astype(np.float32) * math.sqrt(2)


# ------------------------------------------------------------------------------------------------ pictures
def busy_background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """`(H, W, 3)` float32: a tinted field under 15-30 clutter shapes of muted colours, and grain.

    Clutter colours are the palette's mixed halfway or more with grey, so no clutter shape has an
    object's exact colour, but many come close in hue."""
    width, height = size
    base = rng.uniform(60, 190, (4, 6, 1)) + rng.normal(0, 18, (4, 6, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").resize(
        (width, height), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(image)
    palette = np.asarray(list(PALETTE.values()), dtype=np.float64)
    dims = np.array([width, height], dtype=np.float64)
    for _ in range(int(rng.integers(15, 31))):
        grey = rng.uniform(50, 210)
        mix = rng.uniform(0.5, 0.85)
        fill = tuple(
            int(v) for v in np.clip(mix * grey + (1 - mix) * palette[rng.integers(len(palette))], 0, 255)
        )
        side = rng.uniform(0.05, 0.25, 2) * dims
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * dims
        box = [x0, y0, x0 + side[0], y0 + side[1]]
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        elif kind == 2:
            draw.line(box, fill=fill, width=int(rng.integers(2, 6)))
        else:
            corners = rng.uniform(0, 1, (3, 2)) * side + [x0, y0]
            draw.polygon([tuple(c) for c in corners], fill=fill)
    grain = rng.normal(0, 5, (height, width, 1))
    return np.asarray(image, dtype=np.float32) + grain.astype(np.float32)


@dataclass(frozen=True)
class Path2D:
    """A straight path of a square box of side `side`: top-left corner from `start` to `end`."""

    start: tuple[float, float]
    end: tuple[float, float]
    side: int

    def box(self, progress: float) -> tuple[int, int, int]:
        x = self.start[0] + progress * (self.end[0] - self.start[0])
        y = self.start[1] + progress * (self.end[1] - self.start[1])
        return int(round(x)), int(round(y)), self.side


def draw_path(rng: np.random.Generator, size: tuple[int, int], scale: tuple[float, float]) -> Path2D:
    """A path across the frame: from one side's half to the other's (left-right or right-left), with a
    random vertical drift; the box stays inside the frame all the way."""
    width, height = size
    side = int(round(rng.uniform(*scale) * height))
    free_x, free_y = width - side, height - side
    left, right = rng.uniform(0, 0.35) * free_x, rng.uniform(0.65, 1.0) * free_x
    ys = rng.uniform(0, free_y, 2)
    if rng.random() < 0.5:
        left, right = right, left
    return Path2D((left, ys[0]), (right, ys[1]), side)


def _draw_in_place(
    picture: np.ndarray, synth_class: SynthClass, box: tuple[int, int, int], brightness: float
) -> np.ndarray:
    """Draw the object into `picture` (modified) and return its full-frame mask. Only the box is
    rendered (`draw_object` on the box alone: integer shifts rasterize identically), which is
    several times faster than whole-frame drawing at 320x240."""
    x0, y0, side = box
    region = picture[y0 : y0 + side, x0 : x0 + side]
    painted, local = draw_object(region, synth_class, (0, 0, side), brightness)
    region[...] = painted
    mask = np.zeros(picture.shape[:2], dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = local
    return mask


class MovingScenes:
    """The pictures of a speechlike clip: per event, the sounding object and a distractor of another
    class, each moving along its own path over the event; the sounding object is drawn last (in front),
    so its mask is exactly its visible pixels."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], classes, events) -> None:
        self.size, self.classes, self.events = frame_dims(size), classes, events
        self.background = busy_background(rng, self.size)
        self.paths, self.distractors, self.brightness = [], [], []
        for event in events:
            self.paths.append(draw_path(rng, self.size, (0.32, 0.48)))
            others = [k for k in range(len(classes)) if k != event.class_index] or [event.class_index]
            distractor = int(others[rng.integers(len(others))])
            self.distractors.append((distractor, draw_path(rng, self.size, (0.25, 0.4))))
            self.brightness.append(rng.uniform(0.85, 1.0, 2))

    def event_of(self, frame: int) -> int:
        return next(i for i, e in enumerate(self.events) if e.start_frame <= frame < e.end_frame)

    def progress(self, frame: int) -> float:
        event = self.events[self.event_of(frame)]
        return (frame - event.start_frame) / max(1, event.end_frame - event.start_frame - 1)

    def render(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """The frame before sensor noise, float32 `(H, W, 3)`, and the sounding object's mask."""
        i, progress = self.event_of(frame), self.progress(frame)
        distractor, path = self.distractors[i]
        picture = self.background.copy()
        _draw_in_place(picture, self.classes[distractor], path.box(progress), self.brightness[i][1])
        event_class = self.classes[self.events[i].class_index]
        mask = _draw_in_place(picture, event_class, self.paths[i].box(progress), self.brightness[i][0])
        return picture, mask

    def pan_track(self, event_index: int, num_samples: int) -> np.ndarray:
        """Per sample of an event, the sounding object's horizontal centre in [0, 1] of the width."""
        path = self.paths[event_index]
        centres = [(x + path.side / 2) / self.size[0] for x in (path.start[0], path.end[0])]
        return np.linspace(centres[0], centres[1], num_samples)

    def boxes(self, event_index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The sounding object's box `(x0, y0, side)` on the event's first and last frames."""
        return self.paths[event_index].box(0.0), self.paths[event_index].box(1.0)
