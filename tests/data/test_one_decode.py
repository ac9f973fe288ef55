"""Each file of a clip is opened once per use (issue 22): a video's probe, frames and audio come from one
container, a CAV-MAE frame file is read once, and the decoded values are those of decoding each part
from a fresh open, as before, in every container `prepare` lists."""

from __future__ import annotations

import ast
import io
import wave
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from avsync.data import dask_prepare, pool_prepare, prepare_core
from avsync.data.audio import decode_audio
from avsync.data.cavmae import extract_cavmae_clip
from avsync.data.clip import ExtractionOptions, extract_video_clip, frame_targets
from avsync.data.fbank import log_mel_fbank
from avsync.data.media import open_media, probe
from avsync.data.prepare import WorkItem, process
from avsync.data.sources import discover
from avsync.data.transforms import frames_to_tensor
from avsync.data.video import sample_frames
from avsync.tasks.localization_data import MAX_AUDIO_SECONDS, FramePrompt, PromptDataset
from tests.helpers.opens import count_opens

from .conftest import REAL_CLIPS


@pytest.fixture
def av_opens(monkeypatch) -> Counter:
    """Counts `av.open` calls per file name, passing each to the real function."""
    opened: Counter = Counter()
    real = av.open

    def spy(file, *args, **kwargs):
        opened[Path(str(file)).name] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    return opened


def fresh_opens(path: Path, targets=None, audio_max=None):
    """What the decoders give on fresh opens (the way `prepare` decoded before issue 22: one open for the
    probe and frames, another for the audio), with `prepare`'s options."""
    options = ExtractionOptions()
    with open_media(path) as container:
        info = probe(container, path)
        targets = targets or frame_targets(info.duration, options.num_frames)
        frames = sample_frames(container, path, targets, info.video_start, options.short_side)
    with open_media(path) as container:
        waveform = decode_audio(
            container, path, options.fbank.sample_rate, options.mono, audio_max or options.max_duration
        )
    return frames, waveform


def test_prepare_opens_each_real_clip_once(real_clips_dir, av_opens):
    for source in discover([real_clips_dir]).sources:
        with count_opens(source.path) as opens:  # by anyone, ffmpeg's own reads included (inotify)
            assert process(WorkItem(source, (), ()), ExtractionOptions()).failure is None
        assert opens.count == 1, source.path
    assert av_opens == Counter({name: 1 for name in REAL_CLIPS})


def _write(path: Path, video: str, audio: str, rate: int = 44100, gop: int | None = None) -> Path:
    """4 s of moving picture (frame k: grey 7k, a bar k pixels long) and a 440-Hz stereo tone."""
    with av.open(str(path), "w") as output:
        picture = output.add_stream(video, rate=25)
        picture.width, picture.height, picture.pix_fmt = 96, 64, "yuv420p"
        if gop:
            picture.codec_context.gop_size = gop
        sound = output.add_stream(audio, rate=rate, layout="stereo")
        for k in range(100):
            pixels = np.full((64, 96, 3), 7 * k % 256, np.uint8)
            pixels[:8, : k % 96] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 25)
            output.mux(picture.encode(frame))
        output.mux(picture.encode())
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(4 * rate) / rate)).astype(np.float32)
        size = sound.codec_context.frame_size or 1024
        for offset in range(0, len(tone), size):
            block = np.repeat(tone[offset : offset + size, None], 2, axis=1).reshape(1, -1)
            samples = av.AudioFrame.from_ndarray(block, format="flt", layout="stereo")
            samples.sample_rate, samples.pts, samples.time_base = rate, offset, Fraction(1, rate)
            output.mux(sound.encode(samples))
        output.mux(sound.encode())
    return path


@pytest.mark.parametrize(
    "name, video, audio, extra",
    [
        ("h264_aac.mp4", "libx264", "aac", {"gop": 10}),  # AAC priming before the first video packet
        ("h264_aac.mov", "libx264", "aac", {}),
        ("h264_aac.3gp", "libx264", "aac", {"gop": 10}),
        ("h264_aac.mkv", "libx264", "aac", {"gop": 10}),  # no stream duration: the probe reads the end
        ("h264_mp3.mkv", "libx264", "libmp3lame", {}),
        ("vp8_opus.webm", "libvpx", "libopus", {"rate": 48000, "gop": 10}),
        ("mpeg4_mp3.avi", "mpeg4", "libmp3lame", {}),
        ("mpeg2_mp2.mpg", "mpeg2video", "mp2", {"gop": 12}),
        ("h264_aac.ts", "libx264", "aac", {"gop": 12}),  # no index at all
    ],
)
def test_one_open_decodes_what_fresh_opens_decode_in_every_container(
    tmp_path, av_opens, name, video, audio, extra
):
    path = _write(tmp_path / name, video, audio, **extra)
    expected_frames, expected_audio = fresh_opens(path)
    av_opens.clear()
    decoded = extract_video_clip(path)
    assert av_opens[name] == 1
    fbank = log_mel_fbank(expected_audio.samples, ExtractionOptions().fbank).numpy().astype(np.float16)
    assert np.array_equal(decoded.fbank, fbank)  # the whole track, from its first packet
    assert decoded.metadata["frame_times"] == expected_frames.times
    for jpeg, image in zip(decoded.frames, expected_frames.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(jpeg))), _jpeg_round_trip(image))


def _jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=ExtractionOptions().jpeg_quality)
    return np.asarray(Image.open(buffer))


def test_a_frame_prompt_opens_its_video_once_and_scores_the_same_values(real_clips_dir, tmp_path, av_opens):
    video = real_clips_dir / REAL_CLIPS[1]  # 1280x720
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.ones((200, 300), np.uint8) * 255, ((100, 420), (200, 780)))).save(mask)
    prompts = PromptDataset([FramePrompt("row", video, 4.2, mask, 0)], image_size=64, audio_length=96)
    av_opens.clear()
    item = prompts[0]
    assert "rejection" not in item and av_opens == Counter({video.name: 1})

    frames, waveform = fresh_opens(video, targets=[Fraction(4.2)], audio_max=MAX_AUDIO_SECONDS)
    fbank = log_mel_fbank(waveform.samples, ExtractionOptions().fbank)
    with open_media(video) as container:
        duration = float(probe(container, video).duration)
    centre = round(4.2 * fbank.shape[0] / duration)
    window = fbank[centre - 48 : centre + 48]
    assert torch.equal(item["audio"][0], (window - prompts.mean) / prompts.std)
    image = prompts.image_geometry(Image.fromarray(frames.images[0]))
    assert torch.equal(item["video"], frames_to_tensor([image]))


def test_the_cavmae_importer_reads_each_frame_file_once(tmp_path, monkeypatch, av_opens):
    frames_root, wav = tmp_path / "frames", tmp_path / "clipA.wav"
    for i in range(16):
        (frames_root / f"frame_{i}").mkdir(parents=True)
        size = (320, 240) if i % 2 else (224, 224)  # odd frames are shrunk and re-encoded, even kept
        Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)).save(
            frames_root / f"frame_{i}" / "clipA.jpg", quality=95
        )
    with wave.open(str(wav), "wb") as handle:
        handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(16000)
        handle.writeframes((np.sin(np.arange(16000 * 3) / 10) * 8000).astype(np.int16).tobytes())
    opened: Counter = Counter()
    real = io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            opened[Path(file).relative_to(tmp_path).as_posix()] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr("builtins.open", spy)
    with count_opens(frames_root / "frame_1" / "clipA.jpg") as opens:
        decoded = extract_cavmae_clip("clipA", frames_root, wav)
    assert opens.count == 1  # the kernel's count agrees with the spy's
    frame_files = {f"frames/frame_{i}/clipA.jpg" for i in range(16)}
    assert {name: count for name, count in opened.items() if name in frame_files} == dict.fromkeys(
        frame_files, 1
    )
    assert av_opens == Counter({"clipA.wav": 1})
    assert decoded.frames[0] == (frames_root / "frame_0" / "clipA.jpg").read_bytes()  # stored as given
    assert Image.open(io.BytesIO(decoded.frames[1])).size == (299, 224)


def imported(module) -> set[str]:
    """Every module that `module`'s source imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_engines_share_the_core_and_import_nothing_of_each_other():
    engines = {"avsync.data.pool_prepare": pool_prepare, "avsync.data.dask_prepare": dask_prepare}
    for name, module in engines.items():
        names = imported(module)
        assert "avsync.data.prepare_core" in names
        assert not names & ({"avsync.data.prepare"} | set(engines) - {name})
    assert not imported(prepare_core) & {"avsync.data.prepare", *engines}
