"""Decoding real media files: which frames are taken (SPEC §1), the audio and its spectrogram, and the
reason given for every kind of bad input."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from avsync.data.audio import decode_audio
from avsync.data.clip import ExtractionOptions, extract_video_clip
from avsync.data.errors import DecodeError
from avsync.data.fbank import log_mel_fbank
from avsync.data.media import open_media, probe
from avsync.data.video import sample_frames

from .conftest import FRAME_LEVEL_STEP, authors_fbank, write_clip


def forward_decode(path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time * stream.time_base
        return [float(frame.pts * stream.time_base - start) for frame in container.decode(stream)]


def frame_number(jpeg: bytes) -> int:
    """Which generated frame a stored JPEG shows (generated frame k is grey level FRAME_LEVEL_STEP * k)."""
    return round(np.asarray(Image.open(io.BytesIO(jpeg))).mean() / FRAME_LEVEL_STEP)


VARIABLE_RATE = [t for k in range(20) for t in (0.2 * k, 0.2 * k + 0.05)]  # gaps of 50 and 150 ms


@pytest.mark.parametrize(
    "name, clip_args, duration",
    [
        ("constant.mp4", {}, 3.0),
        ("variable_rate.mp4", {"video_times": VARIABLE_RATE, "duration": 4.0}, None),
        ("late_start.mkv", {"start": 0.5}, 3.0),  # Matroska: no stream duration, start_time 0.5 s
        ("late_start.mp4", {"start": 0.5}, 3.0),  # mp4 edit list
        ("stream.ts", {}, 3.0),  # MPEG-TS: non-zero start_time of its own
    ],
)
def test_each_frame_is_the_first_at_or_after_i_D_over_16(tmp_path, name, clip_args, duration):
    path = write_clip(tmp_path / name, **clip_args)
    clip = extract_video_clip(path)
    times = forward_decode(path)
    if duration is None:  # variable rate: the last frame lasts until the stream's declared end
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base)
    assert clip.metadata["duration"] == pytest.approx(duration, abs=1e-6)
    period = max(np.diff(times))
    for i, stored_time in enumerate(clip.metadata["frame_times"]):
        target = i * duration / 16
        expected = next(k for k, t in enumerate(times) if t >= target - 1e-9)
        assert stored_time == pytest.approx(times[expected], abs=1e-9)
        assert 0 <= stored_time - target < period
        assert frame_number(clip.frames[i]) == expected


def write_gop_clip(path):
    """10 s at 25 fps, a keyframe every 8 frames, B-frames; frame k is grey level 7k mod 256."""
    with av.open(str(path), mode="w") as output:
        video = output.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"preset": "ultrafast", "g": "8", "keyint_min": "8", "bf": "2", "sc_threshold": "0"}
        for k in range(250):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 7 * k % 256, np.uint8), format="rgb24")
            frame.pts = k
            output.mux(video.encode(frame))
        output.mux(video.encode())
    return path


def test_seeking_picks_the_same_frames_as_a_forward_decode(tmp_path):
    """Keyframes every 8 frames and B-frames: the reader seeks between targets, yet takes exactly the
    frames a full decode would."""
    path = write_gop_clip(tmp_path / "gop.mp4")
    times = forward_decode(path)
    with open_media(path) as container:
        info = probe(container, path)
        assert sum(e.is_keyframe for e in container.streams.video[0].index_entries) > 16
        targets = [info.duration * i / 16 for i in range(16)] + [Fraction(77, 10)]
        targets.sort()
        frames = sample_frames(container, path, targets, info.video_start)
    for target, time, image in zip(targets, frames.times, frames.images, strict=True):
        expected = next(k for k, t in enumerate(times) if t >= float(target) - 1e-9)
        assert time == pytest.approx(times[expected])
        assert abs(float(image.mean()) - 7 * expected % 256) < 3


class OvershootingSeeks:
    """A real container whose seeks land up to `skew` seconds late (as with an index of decode
    times): everything else is forwarded."""

    def __init__(self, container, skew: float) -> None:
        self.container, self.skew = container, skew

    def seek(self, ticks: int, stream, **options) -> None:
        late = ticks + round(self.skew / stream.time_base) if ticks > 0 else ticks
        self.container.seek(late, stream=stream, **options)

    def __getattr__(self, name: str):
        return getattr(self.container, name)


def test_a_seek_that_lands_after_its_target_is_caught(tmp_path):
    path = write_gop_clip(tmp_path / "gop.mp4")
    times = forward_decode(path)
    with open_media(path) as container:
        info = probe(container, path)
        targets = [info.duration * i / 16 for i in range(16)]
        frames = sample_frames(OvershootingSeeks(container, skew=0.5), path, targets, info.video_start)
    for target, time in zip(targets, frames.times, strict=True):
        assert time == pytest.approx(next(t for t in times if t >= float(target) - 1e-9))


def test_frames_are_shrunk_to_short_side_224_bicubic_and_never_upscaled(tmp_path):
    wide = write_clip(tmp_path / "wide.mp4", size=(640, 360))
    small = write_clip(tmp_path / "small.mp4", size=(64, 48))
    assert Image.open(io.BytesIO(extract_video_clip(wide).frames[0])).size == (398, 224)
    assert Image.open(io.BytesIO(extract_video_clip(small).frames[0])).size == (64, 48)
    tall = extract_video_clip(write_clip(tmp_path / "tall.mp4", size=(360, 640)))
    assert (tall.metadata["frame_width"], tall.metadata["frame_height"]) == (224, 398)
    assert (tall.metadata["width"], tall.metadata["height"]) == (360, 640)


@pytest.mark.parametrize("mono", ["mean", "first"])
def test_audio_is_resampled_per_channel_then_mixed_down_and_its_fbank_is_kaldis(tmp_path, mono):
    path = write_clip(tmp_path / "tone.mp4", sample_rate=48000)  # right channel = 2 x left
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="fltp", rate=16000)
        planes = [f.to_ndarray() for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        planes += [f.to_ndarray() for f in resampler.resample(None)]
    stereo = np.concatenate(planes, axis=1)
    expected = stereo.mean(axis=0) if mono == "mean" else stereo[0]
    with open_media(path) as container:
        waveform = decode_audio(container, path, mono=mono)
    assert (waveform.source_sample_rate, waveform.source_channels) == (48000, 2)
    np.testing.assert_array_equal(waveform.samples, expected.astype(np.float32))
    reference = torch.from_numpy(expected.astype(np.float32))[None]
    reference = authors_fbank(reference)
    torch.testing.assert_close(log_mel_fbank(waveform.samples), reference, rtol=0, atol=0)
    assert reference.shape == (1 + (len(expected) - 400) // 160, 128)


def test_a_three_hour_video_is_refused_from_its_header(tmp_path):
    path = write_clip(tmp_path / "long.mp4", video_times=[600.0 * k for k in range(19)], audio=False)
    with pytest.raises(DecodeError, match=r"too long: 1080\d\.\d+ s \(maximum 60 s; cut long videos"):
        extract_video_clip(path, ExtractionOptions(allow_silent=True))


def test_audio_decoding_stops_at_the_maximum_duration(tmp_path):
    path = write_clip(tmp_path / "tone.mp4", duration=3.0)
    with open_media(path) as container, pytest.raises(DecodeError, match="audio longer than the 1-s maximum"):
        decode_audio(container, path, max_duration=1.0)


def test_silent_clips_are_kept_only_when_allowed_and_flagged(tmp_path):
    path = write_clip(tmp_path / "mute.mp4", audio=False)
    with pytest.raises(DecodeError, match="no audio stream"):
        extract_video_clip(path)
    clip = extract_video_clip(path, ExtractionOptions(allow_silent=True))
    assert clip.metadata["silent"] and not clip.metadata["has_audio"]
    assert clip.metadata["sample_rate"] is None and clip.metadata["channels"] is None
    silence = log_mel_fbank(np.zeros(48000, np.float32))
    np.testing.assert_array_equal(clip.fbank, silence.numpy().astype(np.float16))


def test_audio_much_shorter_than_the_video_is_refused(tmp_path):
    path = tmp_path / "short_audio.mkv"
    write_clip(path, duration=3.0)
    with av.open(str(path)) as source, av.open(str(tmp_path / "cut.mkv"), "w") as output:
        video_in, audio_in = source.streams.video[0], source.streams.audio[0]
        video_out = output.add_stream_from_template(video_in)
        audio_out = output.add_stream_from_template(audio_in)
        for packet in source.demux():
            if packet.dts is None:
                continue
            if packet.stream is audio_in and packet.pts * audio_in.time_base > 1:
                continue
            packet.stream = video_out if packet.stream is video_in else audio_out
            output.mux(packet)
    with pytest.raises(DecodeError, match=r"audio \(1\.0\d+ s\) and video \(3\.000 s\) durations differ"):
        extract_video_clip(tmp_path / "cut.mkv")


def test_every_bad_input_gets_a_reason(tmp_path):
    clip = write_clip(tmp_path / "ok.mp4")
    fast = write_clip(tmp_path / "fast.mp4", container_options={"movflags": "faststart"})
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path: "not a regular file",
        tmp_path / "empty.mp4": "empty file (0 bytes)",
        tmp_path / "notes.mp4": "not a readable media container",
        tmp_path / "cut_index.mp4": "moov atom not found",  # index at the end: cut off
        tmp_path / "cut_data.mp4": "truncated or corrupt video stream",  # index first: frames missing
        tmp_path / "one_second.mp4": "too short: 1.000 s (minimum 2 s)",
        tmp_path / "mute.mp4": "no audio stream",
        tmp_path / "sound.mp4": "no video stream",
    }
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video at all\n" * 50)
    (tmp_path / "cut_index.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    (tmp_path / "cut_data.mp4").write_bytes(fast.read_bytes()[: fast.stat().st_size // 2])
    write_clip(tmp_path / "one_second.mp4", duration=1.0)
    write_clip(tmp_path / "mute.mp4", audio=False)
    write_clip(tmp_path / "sound.mp4", video=False)
    for path, reason in cases.items():
        with pytest.raises(DecodeError) as error:
            extract_video_clip(path)
        assert reason in error.value.reason, (path.name, error.value.reason)
        assert error.value.path == str(path)
