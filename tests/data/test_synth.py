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

from avsync.data.alignment import frame_times
from avsync.data.synth import SynthManifest, load_synth, main, synthesize
from avsync.data.synth.timeline import sample_timeline

from .conftest import authors_fbank

# Small clips: 4 s at 10 fps, 64x64, 2-3 events of at least 1 s, 6 classes.
SMALL = dict(clips=4, classes=6, duration=4.0, size=64, events=(2, 3), min_event=1.0)
SATURATED = 60  # max - min over RGB: every object pixel is above, the grey background below


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
    for table in ("labels.csv", "classes.csv", "synth.json", "splits/test.txt"):
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
