"""`avsync synth`: real mp4 files whose decoded pixels and sound match the ground truth written beside them.

Everything is checked on what PyAV decodes from the files, independently of how they were rendered:
object colours under the masks, the class on screen at every frame time, the pitch of the sound in each
event and at each boundary, the separability of the classes in a Kaldi log-Mel spectrogram.
"""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from avsync.cli import main as avsync_main
from avsync.data.alignment import frame_times
from avsync.synth import SynthManifest, load_synth, synthesize
from avsync.synth.generate import PRODUCT_FILES
from avsync.synth.timeline import sample_timeline

from .conftest import authors_fbank

# Small clips: 4 s at 10 fps, 64x64, 2-3 events of at least 1 s, 6 classes.
SMALL = dict(clips=4, classes=6, duration=4.0, size=64, events=(2, 3), min_event=1.0)
SATURATED = 60  # max - min over RGB: every object pixel is above, the grey background below


def main(argv: list[str]) -> int:
    """`avsync synth ARGV`, as the command runs it."""
    return avsync_main(["synth", *argv])


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> SynthManifest:
    """Made with two worker processes."""
    return synthesize(tmp_path_factory.mktemp("synth") / "set", seed=0, workers=2, **SMALL)


@pytest.fixture(scope="module")
def same_seed_inline(tmp_path_factory) -> SynthManifest:
    """The same parameters rendered in this process."""
    return synthesize(tmp_path_factory.mktemp("synth") / "inline", seed=0, workers=0, **SMALL)


def decode_video(path: Path) -> tuple[list[float], list[np.ndarray], av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [(frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    return [t for t, _ in decoded], [pixels for _, pixels in decoded], stream


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(stream)])
        return samples, stream.codec_context.sample_rate


def frame_on_screen(times: list[float], t: float) -> int:
    """The decoded frame shown at `t`: the last one whose timestamp is not after `t`."""
    return max(i for i, start in enumerate(times) if start <= t + 1e-9)


def first_frame_from(times: list[float], t: float) -> int:
    """The first decoded frame whose timestamp is not before `t` (the rule `avsync prepare` uses)."""
    return min(i for i, start in enumerate(times) if start >= t - 1e-9)


def saturation(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.float32)
    return pixels.max(axis=-1) - pixels.min(axis=-1)


def nearest_class_by_colour(manifest: SynthManifest, mean_rgb: np.ndarray) -> tuple[int, float]:
    """The class whose colour has the closest chromaticity `rgb / sum(rgb)` (shading-invariant), and the
    distance to it."""
    palette = np.array([c.rgb for c in manifest.classes], dtype=np.float64)
    palette /= palette.sum(axis=1, keepdims=True)
    distances = np.linalg.norm(palette - mean_rgb / mean_rgb.sum(), axis=1)
    return int(distances.argmin()), float(distances.min())


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` dilated by `pixels` (square neighbourhood)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(image) > 0


def strongest_frequency(samples: np.ndarray, rate: int) -> float:
    """Frequency of the largest peak of the Hann-windowed spectrum (zero-padded 8x for finer bins)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples)), n=8 * len(samples)))
    return float(np.fft.rfftfreq(8 * len(samples), 1 / rate)[spectrum.argmax()])


def nearest_class_by_pitch(manifest: SynthManifest, frequency: float) -> int:
    pitch = np.array([c.pitch_hz for c in manifest.classes])
    return int(np.abs(np.log(pitch / frequency)).argmin())


def test_files_decode_as_h264_and_aac_with_exact_constant_rate_timestamps(synth_set):
    config = synth_set.config
    assert len(synth_set.clips) == 4
    for clip in synth_set.clips:
        path = synth_set.video(clip.clip_id)
        times, frames, stream = decode_video(path)
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 64)
        assert len(frames) == 40 == config.num_video_frames
        assert times == pytest.approx([i / 10 for i in range(40)], abs=1e-9)
        assert float(stream.duration * stream.time_base) == pytest.approx(4.0, abs=1e-9)
        with av.open(str(path)) as container:
            audio = container.streams.audio[0]
            assert audio.codec_context.name == "aac"
            assert audio.codec_context.channels == 1
            assert float(audio.duration * audio.time_base) == pytest.approx(4.0, abs=1e-9)
        samples, rate = decode_audio(path)
        assert rate == 16000
        # AAC pads its last frame; the track covers the whole clip and at most one frame more.
        assert 4 * 16000 <= len(samples) < 4 * 16000 + 1024


def test_masks_cover_the_object_of_the_sounding_class_in_the_frames_at_each_frame_time(synth_set):
    """Checked in the frame on screen at `t` and in the first frame at or after `t`: boundaries keep a frame
    period away from the frame times, so both readings of "the frame at t" agree with the ground truth."""
    for clip in synth_set.clips:
        annotation = synth_set.annotation(clip.clip_id)
        times, frames, _ = decode_video(synth_set.video(clip.clip_id))
        expected_times = frame_times(4.0, 16)
        assert annotation["frames"]["times"] == pytest.approx(expected_times)
        for i, t in enumerate(expected_times):
            assert annotation["frames"]["video_frames"][i] == frame_on_screen(times, t)
            mask_image = Image.open(synth_set.out_dir / annotation["frames"]["masks"][i])
            assert (mask_image.mode, mask_image.size) == ("L", (64, 64))
            mask = np.asarray(mask_image) > 0
            inner, outer = ~grown(~mask, 2), ~grown(mask, 2)  # away from edges blurred by 4:2:0 chroma
            assert inner.sum() > 20
            for shown in {frame_on_screen(times, t), first_frame_from(times, t)}:
                pixels = frames[shown]
                saturated = saturation(pixels) > SATURATED
                assert saturated[inner].mean() > 0.98, (clip.clip_id, i, shown)
                assert saturated[outer].mean() < 0.01, (clip.clip_id, i, shown)
                colour_class, distance = nearest_class_by_colour(
                    synth_set, pixels[inner].astype(float).mean(0)
                )
                assert colour_class == annotation["frames"]["class_indices"][i], (clip.clip_id, i, shown)
                assert distance < 0.06


def test_every_decoded_frame_shows_the_class_of_the_event_at_its_timestamp(synth_set):
    """Across boundaries too: the picture switches on the exact frame where the annotation says."""
    for clip in synth_set.clips:
        events = synth_set.annotation(clip.clip_id)["events"]
        times, frames, _ = decode_video(synth_set.video(clip.clip_id))
        assert events[0]["start"] == 0 and events[-1]["end"] == 4.0
        assert all(a["end"] == b["start"] for a, b in zip(events, events[1:], strict=False))
        for t, pixels in zip(times, frames, strict=True):
            playing = next(e for e in events if e["start"] <= t + 1e-9 < e["end"])
            colourful = pixels[saturation(pixels) > SATURATED].astype(np.float64)
            assert len(colourful) > 50
            assert nearest_class_by_colour(synth_set, colourful.mean(0))[0] == playing["class_index"], (
                clip,
                t,
            )


def test_sound_has_the_class_pitch_in_each_event_and_switches_at_the_boundaries(synth_set):
    for clip in synth_set.clips:
        events = synth_set.annotation(clip.clip_id)["events"]
        samples, rate = decode_audio(synth_set.video(clip.clip_id))
        for event in events:
            middle = round((event["start"] + event["end"]) / 2 * rate)
            peak = strongest_frequency(samples[middle - rate // 4 : middle + rate // 4], rate)
            assert nearest_class_by_pitch(synth_set, peak) == event["class_index"], (clip.clip_id, event)
            assert peak == pytest.approx(synth_set.classes[event["class_index"]].pitch_hz, rel=0.025)
        for before, after in zip(events, events[1:], strict=False):
            # From 20 ms either side of a boundary on, the sound is already the one the picture shows.
            boundary = round(before["end"] * rate)
            ahead = samples[boundary - round(0.15 * rate) : boundary - round(0.02 * rate)]
            behind = samples[boundary + round(0.02 * rate) : boundary + round(0.15 * rate)]
            assert (
                nearest_class_by_pitch(synth_set, strongest_frequency(ahead, rate)) == before["class_index"]
            )
            assert (
                nearest_class_by_pitch(synth_set, strongest_frequency(behind, rate)) == after["class_index"]
            )


def test_classes_are_separable_in_the_kaldi_log_mel_spectrogram(synth_set):
    """Mean 128-bin fbank profiles of events: every same-class pair is closer than every cross-class pair."""
    profiles, classes = [], []
    for clip in synth_set.clips:
        samples, rate = decode_audio(synth_set.video(clip.clip_id))
        fbank = authors_fbank(torch.from_numpy(samples)[None], rate)
        for event in synth_set.annotation(clip.clip_id)["events"]:
            profile = fbank[round(event["start"] * 100) + 10 : round(event["end"] * 100) - 10].mean(0)
            profiles.append((profile - profile.mean()) / (profile - profile.mean()).norm())
            classes.append(event["class_index"])
    similarity = torch.stack(profiles) @ torch.stack(profiles).T
    same = torch.tensor(classes)[:, None] == torch.tensor(classes)[None, :]
    same_pairs = similarity[same & ~torch.eye(len(classes), dtype=torch.bool)]
    assert len(same_pairs) > 0 and (~same).any()
    assert same_pairs.min() > similarity[~same].max() + 0.1


def test_tables_splits_and_manifest_agree_with_the_annotations(synth_set):
    out = synth_set.out_dir
    with open(out / "classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["index"]), r["mid"]) for r in rows] == [(k, f"synth_{k}") for k in range(6)]
    assert rows[0]["display_name"] == synth_set.classes[0].display_name
    assert '"' in (out / "labels.csv").read_text().splitlines()[1]  # labels field quoted, as AudioSet's
    with open(out / "labels.csv", newline="") as f:
        labels = {r["clip_id"]: r["labels"].split(",") for r in csv.DictReader(f)}
    for clip in synth_set.clips:
        annotation = synth_set.annotation(clip.clip_id)
        present = sorted({e["class_index"] for e in annotation["events"]})
        assert labels[clip.clip_id] == annotation["labels"] == [f"synth_{k}" for k in present]
    train = (out / "splits" / "train.txt").read_text().split()
    test = (out / "splits" / "test.txt").read_text().split()
    assert len(test) == 1 and sorted(train + test) == sorted(labels)  # round(4 * 0.2) = 1, disjoint, complete
    stored = json.loads((out / "synth.json").read_text())
    assert stored["parameters"]["seed"] == 0 and stored["counts"]["clips"] == 4
    assert [c["display_name"] for c in stored["classes"]] == [r["display_name"] for r in rows]
    assert load_synth(out).splits == {"train": train, "test": test}
    # what the product reads as it reads real data: per split a localization manifest (a row per annotated
    # frame, docs/localization.md's `video,frame,mask,class` form) and its class list in index order
    assert (out / "localization_classes.txt").read_text().split() == [f"synth_{k}" for k in range(6)]
    for split, clips in (("train", train), ("test", test), ("all", [c.clip_id for c in synth_set.clips])):
        with open(synth_set.localization_manifest(None if split == "all" else split), newline="") as f:
            rows = [(r["video"], int(r["frame"]), r["mask"], r["class"]) for r in csv.DictReader(f)]
        frames = {c: synth_set.annotation(c)["frames"] for c in clips}
        assert rows == [
            (f"videos/{c}.mp4", i, mask, f"synth_{k}")
            for c in clips
            for i, (mask, k) in enumerate(zip(frames[c]["masks"], frames[c]["class_indices"], strict=True))
        ]


def test_same_seed_gives_identical_files_whatever_the_workers_and_another_seed_differs(
    synth_set, same_seed_inline, tmp_path
):
    for clip in synth_set.clips:
        a, b = synth_set.video(clip.clip_id), same_seed_inline.video(clip.clip_id)
        assert a.read_bytes() == b.read_bytes()  # the encoders are deterministic, not just the content
        assert synth_set.annotation(clip.clip_id) == same_seed_inline.annotation(clip.clip_id)
        for i in range(16):
            mask = Path("masks") / clip.clip_id / f"f{i:02d}.png"
            assert (synth_set.out_dir / mask).read_bytes() == (same_seed_inline.out_dir / mask).read_bytes()
    for table in ("labels.csv", "classes.csv", "synth.json", "splits/test.txt", *PRODUCT_FILES):
        assert (synth_set.out_dir / table).read_text() == (same_seed_inline.out_dir / table).read_text()

    other = synthesize(tmp_path / "other", seed=1, workers=0, **SMALL)
    first = synth_set.clips[0].clip_id
    other_first = other.clips[0].clip_id
    assert other_first != first  # ids carry the seed, so sets made with different seeds can be merged
    events = [[e["start"], e["class_index"]] for e in synth_set.annotation(first)["events"]]
    other_events = [[e["start"], e["class_index"]] for e in other.annotation(other_first)["events"]]
    assert events != other_events
    assert not np.array_equal(
        decode_video(synth_set.video(first))[1][0], decode_video(other.video(other_first))[1][0]
    )
    assert not np.array_equal(
        decode_audio(synth_set.video(first))[0], decode_audio(other.video(other_first))[0]
    )


def test_an_identical_request_is_cached_and_a_changed_one_regenerates(tmp_path, capsys):
    small = dict(clips=3, classes=3, duration=2.0, size=32, min_event=0.5, workers=0)
    out = tmp_path / "set"
    first = synthesize(out, **small)
    assert not first.cached
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = synthesize(out, **small)
    assert again.cached and again.clips == first.clips
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    assert (
        main(
            [
                str(out),
                "--clips",
                "3",
                "--classes",
                "3",
                "--duration",
                "2",
                "--size",
                "32",
                "--min-event",
                "0.5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("cached:")

    fewer = synthesize(out, **{**small, "clips": 2, "sample_rate": 44100})
    assert not fewer.cached
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["synth_s0_00000.mp4", "synth_s0_00001.mp4"]
    assert (
        not (out / "masks" / "synth_s0_00002").exists()
        and not (out / "annotations" / "synth_s0_00002.json").exists()
    )
    samples, rate = decode_audio(out / "videos" / "synth_s0_00000.mp4")
    assert rate == 44100 and len(samples) >= 2 * 44100
    assert json.loads((out / "synth.json").read_text())["parameters"]["sample_rate"] == 44100

    forced = synthesize(out, **{**small, "clips": 2, "sample_rate": 44100}, force=True)
    assert not forced.cached
    assert [p.name for p in out.parent.iterdir()] == ["set"]  # no staging or retired folders left behind


def test_refuses_to_replace_a_folder_that_is_not_a_synthetic_set(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("someone's data")
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        synthesize(tmp_path, clips=1, classes=2, duration=2.0, size=32, min_event=0.5, workers=0)
    assert (tmp_path / "data.txt").read_text() == "someone's data"
    assert main([str(tmp_path / "x"), "--clips", "1", "--classes", "99"]) == 2
    assert "--classes must be between 1 and 32" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a whole number of frames"):
        synthesize(tmp_path / "y", clips=1, classes=2, duration=2.05, fps=10)


@pytest.mark.parametrize("fps", [Fraction(10), Fraction(25, 2), Fraction(30000, 1001)])
def test_timelines_keep_boundaries_on_the_frame_grid_and_away_from_the_annotated_times(fps):
    num_frames = round(10 * fps)
    times = frame_times(float(num_frames / fps), 16)
    counts = set()
    for seed in range(200):
        events = sample_timeline(np.random.default_rng(seed), num_frames, fps, 5, (2, 4), 1.5, times)
        counts.add(len(events))
        assert events[0].start_frame == 0 and events[-1].end_frame == num_frames
        for before, after in zip(events, events[1:], strict=False):
            assert before.end_frame == after.start_frame
            assert before.class_index != after.class_index
        for t in times:  # the frames just before and after each time (float-rounding margin) agree
            around = {max(0, math.floor(t * fps - 1e-6)), min(num_frames - 1, math.ceil(t * fps + 1e-6))}
            assert len({next(e for e in events if e.start_frame <= f < e.end_frame) for f in around}) == 1
        assert all(e.end_frame - e.start_frame >= 1.5 * fps for e in events)
    assert counts == {2, 3, 4}


@pytest.mark.parametrize(("fps", "duration"), [("25/2", 2.0), ("30000/1001", 2.002)])
def test_fractional_frame_rates_keep_exact_timestamps_and_ground_truth(fps, duration, tmp_path):
    manifest = synthesize(
        tmp_path, clips=1, classes=3, duration=duration, fps=fps, size=32, min_event=0.5, workers=0
    )
    clip = manifest.clips[0].clip_id
    times, _, stream = decode_video(manifest.video(clip))
    rate = Fraction(fps)
    assert len(times) == round(duration * rate)
    assert times == pytest.approx([float(i / rate) for i in range(len(times))], abs=1e-6)
    annotation = manifest.annotation(clip)
    assert annotation["frames"]["video_frames"] == [
        frame_on_screen(times, t) for t in frame_times(duration, 16)
    ]
    assert float(stream.duration * stream.time_base) == pytest.approx(duration, abs=1e-6)


# ------------------------------------------------------------------------------------------ speechlike
# The kind's own defaults (stereo 22.05 kHz, 320x240, 8 fps), 3-s clips.
SPEECH = dict(clips=2, classes=8, kind="speechlike", duration=3.0, events=(2, 3), min_event=1.0)
OBJECT_SATURATION = 120  # bright object pixels are above it; clutter (half grey or more) stays below


@pytest.fixture(scope="module")
def speech_set(tmp_path_factory) -> SynthManifest:
    return synthesize(tmp_path_factory.mktemp("synth") / "speech", seed=0, workers=0, **SPEECH)


def decode_stereo(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
        return samples, stream.codec_context.sample_rate


def test_speechlike_files_are_stereo_22k_320x240_at_8_fps(speech_set):
    assert speech_set.config.kind == "speechlike"
    for clip in speech_set.clips:
        times, frames, stream = decode_video(speech_set.video(clip.clip_id))
        assert (stream.codec_context.width, stream.codec_context.height) == (320, 240)
        assert frames[0].shape == (240, 320, 3)
        assert times == pytest.approx([i / 8 for i in range(24)], abs=1e-9)
        samples, rate = decode_stereo(speech_set.video(clip.clip_id))
        assert rate == 22050 and samples.shape[0] == 2 and samples.shape[1] >= 3 * 22050
        left, right = samples[:, : 3 * 22050]
        assert np.corrcoef(left, right)[0, 1] < 0.95  # independent noise per channel, panned voice
        annotation = speech_set.annotation(clip.clip_id)
        assert annotation["size"] == [320, 240] and annotation["kind"] == "speechlike"


def test_speechlike_masks_follow_a_moving_object_beside_a_distractor_of_another_class(speech_set):
    moved = 0
    for clip in speech_set.clips:
        annotation = speech_set.annotation(clip.clip_id)
        times, frames, _ = decode_video(speech_set.video(clip.clip_id))
        frame_info = annotation["frames"]
        for i, t in enumerate(frame_info["times"]):
            mask = np.asarray(Image.open(speech_set.out_dir / frame_info["masks"][i])) > 0
            assert mask.shape == (240, 320)
            inner, outer = ~grown(~mask, 3), ~grown(mask, 3)
            pixels = frames[frame_on_screen(times, t)].astype(np.float64)
            bright = saturation(pixels) > OBJECT_SATURATION
            shown = frame_info["class_indices"][i]
            colour_class, distance = nearest_class_by_colour(speech_set, pixels[inner & bright].mean(0))
            assert colour_class == shown and distance < 0.06, (clip.clip_id, i)
            # Outside the sounding object, the only strongly coloured thing is the distractor: another class.
            others = pixels[outer & bright]
            assert len(others) > 200, (clip.clip_id, i)
            assert nearest_class_by_colour(speech_set, others.mean(0))[0] != shown
        for event in annotation["events"]:  # within an event the object's box moves from frame to frame
            inside = [
                box
                for box, frame in zip(frame_info["boxes"], frame_info["video_frames"], strict=True)
                if event["start_frame"] <= frame < event["end_frame"]
            ]
            if len(inside) >= 2:  # objects cross most of the frame over an event: no two frames alike
                assert len({tuple(box) for box in inside}) == len(inside), (clip.clip_id, event)
                moved += 1
            x0, y0, x1, y1 = event["box"]
            assert all(x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1 for b in inside)
    assert moved >= 2


def test_speechlike_voice_is_panned_with_the_object(speech_set):
    """The louder channel is the side of the frame the object is on: left-right energy differences at
    the event's first and last annotated frames have the signs of the object's positions there."""
    checked = 0
    for clip in speech_set.clips:
        annotation = speech_set.annotation(clip.clip_id)
        samples, rate = decode_stereo(speech_set.video(clip.clip_id))
        frame_info = annotation["frames"]
        for t, box in zip(frame_info["times"], frame_info["boxes"], strict=True):
            centre = (box[0] + box[2]) / 2 / 320
            if abs(centre - 0.5) < 0.15:
                continue
            around = samples[:, round((t - 0.15) * rate) : round((t + 0.15) * rate)] if t >= 0.15 else None
            if around is None:
                continue
            left, right = np.sqrt((around**2).mean(axis=1))
            assert (right > left) == (centre > 0.5), (clip.clip_id, t, centre, left, right)
            checked += 1
    assert checked >= 4


def test_speechlike_words_are_told_apart_by_their_log_mel_profiles_across_speakers():
    """Two random speakers saying each class's word: every word is nearer its own other utterance than
    any other word's (mean-over-time 128-bin fbank profiles, no noise), so the sound carries the class."""
    from avsync.synth.speechlike import render_speech, speech_catalogue

    classes = speech_catalogue(8)
    assert len({c.word for c in classes}) == 8 and len({c.pitch_hz for c in classes}) == 8
    waves = [
        render_speech(synth_class, np.random.default_rng([speaker, synth_class.index]), 22050, 22050)
        for speaker in range(2)
        for synth_class in classes
    ]
    fbank = authors_fbank(torch.from_numpy(np.concatenate(waves))[None], 22050)  # one call: 100 frames each
    profiles = []
    for i in range(len(waves)):
        utterance = fbank[i * 100 + 2 : (i + 1) * 100 - 2]
        profile = utterance.mean(0) - utterance.mean()
        profiles.append(profile / profile.norm())
    first, second = torch.stack(profiles[:8]), torch.stack(profiles[8:])
    similarity = first @ second.T
    assert (similarity.argmax(dim=1) == torch.arange(8)).all(), similarity


def test_kind_defaults_sizes_and_the_cli(tmp_path, capsys):
    from avsync.synth.generate import parse_size

    assert parse_size("320x240") == (320, 240) and parse_size(128) == (128, 128)
    with pytest.raises(ValueError, match="SIDE or WxH"):
        parse_size("wide")
    out = tmp_path / "set"
    args = ["--kind", "speechlike", "--clips", "1", "--classes", "3", "--duration", "2", "--min-event", "0.5"]
    assert main([str(out), *args, "--size", "96x64", "--channels", "1", "--workers", "0"]) == 0
    manifest = load_synth(out)
    assert (manifest.config.size, manifest.config.frame_height, manifest.config.channels) == (96, 64, 1)
    assert manifest.config.sample_rate == 22050 and manifest.config.fps == 8  # the kind's defaults
    with av.open(str(manifest.video(manifest.clips[0].clip_id))) as container:
        assert container.streams.audio[0].codec_context.channels == 1
        assert (container.streams.video[0].width, container.streams.video[0].height) == (96, 64)
    assert "word" in json.loads((out / "synth.json").read_text())["classes"][0]
    assert main([str(tmp_path / "bad"), "--clips", "1", "--classes", "2", "--size", "33x20"]) == 2
    assert "even numbers" in capsys.readouterr().err
