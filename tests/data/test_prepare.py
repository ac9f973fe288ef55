"""`avsync prepare` on real files: what the shards hold, what is skipped and why, resuming, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from avsync.cli import main as avsync_main
from avsync.data.labels import ClassList, LabelError, read_labels_csv
from avsync.data.prepare import FAILURES_NAME, MANIFEST_NAME, parse_size, prepare
from avsync.data.sources import ClipSource, assign_keys, base_key, short_hash

from .conftest import authors_fbank, write_clip

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    """`avsync prepare ARGV`, as the command runs it."""
    return avsync_main(["prepare", *argv])


def read_shards(directory: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard of a prepared directory: key -> {field: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((directory / MANIFEST_NAME).read_text())["shards"]:
        with tarfile.open(directory / shard["name"]) as archive:
            for member in archive.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    return samples


def read_failures(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / FAILURES_NAME).read_text().splitlines()]


def independent_frames(path: Path) -> tuple[list[float], list[np.ndarray], float]:
    """All frames of a video by a plain forward decode: times (s from the stream start), RGB arrays,
    and the stream's declared duration."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base)
        times, images = [], []
        for frame in container.decode(stream):
            times.append(float(frame.pts * stream.time_base) - start)
            images.append(frame.to_ndarray(format="rgb24"))
        return times, images, float(stream.duration * stream.time_base)


def independent_fbank(path: Path) -> torch.Tensor:
    """Kaldi fbank of the track resampled to 16 kHz by PyAV, channels averaged, DC removed."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="fltp", rate=16000)
        planes = [f.to_ndarray() for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        planes += [f.to_ndarray() for f in resampler.resample(None)]
    waveform = torch.from_numpy(np.concatenate(planes, axis=1).mean(axis=0, dtype=np.float32))[None]
    return authors_fbank(waveform)


def test_real_clips_match_independent_decoding(real_clips_dir, tmp_path, shared):
    labels = tmp_path / "labels.csv"
    labels.write_text('clip_id,labels\n00W1lcxW-WU_40.000,"Speech,/m/05zppz"\nKlsG1EnBEjc_000361,"3"\n')
    out = tmp_path / "shards"
    summary = prepare(
        [real_clips_dir],
        out,
        labels=labels,
        classes=shared("data", "class_labels_indices_audioset.csv"),
        workers=1,
        progress=False,
    )
    assert summary.clips == 2 and summary.failures == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["counts"] | {"inputs": 2, "clips": 2, "failures": 0} == manifest["counts"]
    assert manifest["num_classes"] == 527 and manifest["classes"][0] == {
        "index": 0,
        "mid": "/m/09x0r",
        "name": "Speech",
    }
    assert (
        manifest["preprocessing"]["fbank"]["num_mel_bins"] == 128
        and manifest["preprocessing"]["short_side"] == 224
    )
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    assert not list(out.glob("*.tmp")) and not (out / "prepare.journal.jsonl").exists()
    assert read_failures(out) == []

    samples = read_shards(out)
    assert sorted(samples) == sorted([base_key("00W1lcxW-WU_40.000"), "KlsG1EnBEjc_000361"])
    assert base_key("00W1lcxW-WU_40.000").startswith("00W1lcxW-WU_40_000-")  # the dot is gone, hashed
    expected_labels = {
        "00W1lcxW-WU_40.000": ([0, 1], ["Speech", "Male speech, man speaking"]),
        "KlsG1EnBEjc_000361": ([3], ["Child speech, kid speaking"]),
    }
    for key, sample in samples.items():
        assert sorted(sample) == sorted([f"f{i:02d}.jpg" for i in range(16)] + ["fbank.npy", "json"])
        metadata = json.loads(sample["json"])
        source = real_clips_dir / f"{metadata['id']}.mp4"
        assert metadata["key"] == key and metadata["source"] == str(source)
        assert (metadata["labels"], metadata["label_names"]) == expected_labels[metadata["id"]]
        assert (metadata["sample_rate"], metadata["channels"], metadata["has_audio"]) == (44100, 2, True)

        times, images, duration = independent_frames(source)
        period = float(np.diff(times).max())
        assert metadata["duration"] == pytest.approx(duration)
        assert metadata["fps"] == pytest.approx(len(times) / duration, rel=0.01)
        assert (metadata["width"], metadata["height"]) == images[0].shape[1::-1]
        for i in range(16):
            target = i * duration / 16
            k = next(k for k, t in enumerate(times) if t >= target - 1e-9)
            assert metadata["frame_times"][i] == pytest.approx(times[k], abs=1e-9)
            assert 0 <= metadata["frame_times"][i] - target < period
            image = Image.fromarray(images[k])
            if min(image.size) > 224:
                image = image.resize((round(image.width * 224 / image.height), 224), Image.Resampling.BICUBIC)
            stored = np.asarray(Image.open(io.BytesIO(sample[f"f{i:02d}.jpg"])), dtype=np.float32)
            assert (
                stored.shape[:2]
                == (min(image.height, 256), image.width)
                == (metadata["frame_height"], metadata["frame_width"])
            )
            assert np.abs(stored - np.asarray(image, dtype=np.float32)).mean() < 3.0  # JPEG q90 error only
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=90)
            assert encoded.getvalue() == sample[f"f{i:02d}.jpg"]

        fbank = np.load(io.BytesIO(sample["fbank.npy"]))
        reference = independent_fbank(source)
        assert fbank.dtype == np.float16 and fbank.shape == tuple(reference.shape) == (
            metadata["fbank_frames"],
            128,
        )
        np.testing.assert_array_equal(fbank, reference.numpy().astype(np.float16))


def test_bad_inputs_land_in_failures_while_the_rest_is_prepared(real_clips_dir, tmp_path, shared):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    shutil.copy(real_clips_dir / "00W1lcxW-WU_40.000.mp4", videos / "00W1lcxW-WU_40.000.mp4")
    shutil.copy(real_clips_dir / "00W1lcxW-WU_40.000.mp4", videos / "sub" / "00W1lcxW-WU_40.000.mp4")
    real = (real_clips_dir / "KlsG1EnBEjc_000361.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(real[: len(real) // 2])
    write_clip(videos / "good.mp4")
    write_clip(videos / "mislabeled.mp4")
    write_clip(videos / "mute.mp4", audio=False)
    write_clip(videos / "one_second.mp4", duration=1.0)
    (videos / "notes.mp4").write_text("meeting notes, not a video\n" * 20)
    (videos / "readme.txt").write_text("not listed: no video extension\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "document.txt").write_text("a listed file that is not a video\n")
    listing = tmp_path / "list.txt"
    listing.write_text("# extra inputs\nelsewhere/document.txt\n\n")
    labels = tmp_path / "labels.csv"
    labels.write_text('clip_id,labels\ngood,"Music"\nmislabeled,"Unicorn song"\n')

    out = tmp_path / "shards"
    summary = prepare(
        [videos, listing],
        out,
        labels=labels,
        classes=shared("data", "class_labels_indices_audioset.csv"),
        workers=1,
        progress=False,
    )
    assert summary.clips == 2
    keys = sorted(read_shards(out))
    assert keys == sorted([base_key("00W1lcxW-WU_40.000"), "good"])
    reasons = {Path(f["path"]).relative_to(tmp_path).as_posix(): f["reason"] for f in read_failures(out)}
    expected = {
        "videos/sub/00W1lcxW-WU_40.000.mp4": "duplicate clip id of "
        + str(videos / "00W1lcxW-WU_40.000.mp4")
        + ", with the same content; the first is kept",
        "videos/mislabeled.mp4": "label 'Unicorn song' is not in",
        "videos/truncated.mp4": "not a readable media container (not audio/video, or truncated)",
        "videos/mute.mp4": "no audio stream",
        "videos/one_second.mp4": "too short: 1.000 s (minimum 2 s)",
        "videos/notes.mp4": "not a readable media container",
        "elsewhere/document.txt": "not a readable media container",
    }
    assert sorted(reasons) == sorted(expected)
    for path, reason in expected.items():
        assert reason in reasons[path], (path, reasons[path])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {"inputs": 9, "clips": 2, "failures": 7, "shards": 1, "ignored_files": 1}
    good = json.loads(read_shards(out)["good"]["json"])
    assert good["labels"] == [137] and good["label_names"] == ["Music"]

    # The same inputs with --allow-silent keep the clip without audio, flagged.
    kept = tmp_path / "with_silent"
    prepare([videos], kept, workers=1, progress=False, options=_options(allow_silent=True))
    mute = json.loads(read_shards(kept)["mute"]["json"])
    assert mute["silent"] and not mute["has_audio"]
    assert "mute.mp4" not in {Path(f["path"]).name for f in read_failures(kept)}


def _options(**changes):
    from dataclasses import replace

    from avsync.data.clip import ExtractionOptions

    return replace(ExtractionOptions(), **changes)


def _outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(10):
        write_clip(videos / f"clip{index}.mp4", duration=2.5, fps=10 + index)
    (videos / "broken.mp4").write_bytes(b"\x00" * 4096)
    arguments = [str(videos), "--shard-max-clips", "2", "--no-progress"]

    uninterrupted = tmp_path / "uninterrupted"
    assert main([*arguments[:1], str(uninterrupted), *arguments[1:], "--workers", "2"]) == 0

    resumed = tmp_path / "resumed"
    command = [
        sys.executable,
        "-m",
        "avsync.data.prepare",
        arguments[0],
        str(resumed),
        *arguments[1:],
        "--workers",
        "1",
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_shard, journal = resumed / "shard-000000.tar", resumed / "prepare.journal.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:  # kill once shard 0 is journaled
        if journal.exists() and journal.read_text().count("\n") >= 2:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert first_shard.exists() and not (resumed / MANIFEST_NAME).exists(), (
        "the kill came too late to test a resume"
    )
    kept = first_shard.stat()

    assert main([arguments[0], str(resumed), *arguments[1:], "--workers", "1"]) == 0
    assert first_shard.stat().st_ino == kept.st_ino and first_shard.stat().st_mtime_ns == kept.st_mtime_ns
    assert _outputs(resumed) == _outputs(uninterrupted)
    assert len(json.loads((resumed / MANIFEST_NAME).read_text())["shards"]) == 5
    assert [f["path"] for f in read_failures(resumed)] == [str(videos / "broken.mp4")]


def test_rerunning_a_finished_preparation_changes_nothing_and_other_settings_are_refused(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "a.mp4")
    write_clip(videos / "b.mp4")
    out = tmp_path / "out"
    assert main([str(videos), str(out), "--no-progress", "--workers", "1"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([str(videos), str(out), "--no-progress", "--workers", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    assert main([str(videos), str(out), "--no-progress", "--workers", "1", "--jpeg-quality", "80"]) == 2
    assert "holds shards of other inputs or settings" in capsys.readouterr().err
    assert (
        main(
            [str(videos), str(out), "--no-progress", "--workers", "1", "--jpeg-quality", "80", "--overwrite"]
        )
        == 0
    )
    assert json.loads((out / MANIFEST_NAME).read_text())["preprocessing"]["jpeg_quality"] == 80


def test_shards_respect_the_byte_cap_exactly(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(4):
        write_clip(videos / f"clip{index}.mp4", size=(96, 64))
    out = tmp_path / "out"
    cap = 150_000
    prepare([videos], out, shard_max_bytes=cap, workers=1, progress=False)
    shards = json.loads((out / MANIFEST_NAME).read_text())["shards"]
    assert len(shards) > 1 and sum(s["clips"] for s in shards) == 4
    assert all(s["bytes"] <= cap and (out / s["name"]).stat().st_size == s["bytes"] for s in shards)
    assert all(s["bytes"] % 10240 == 0 for s in shards)


def test_a_cavmae_datafile_is_converted_with_frames_as_given_and_audio_through_the_fbank_path(
    tmp_path, shared
):
    frames_root, wav = tmp_path / "frames", tmp_path / "audio" / "clipA.wav"
    wav.parent.mkdir()
    for i in range(16):
        (frames_root / f"frame_{i}").mkdir(parents=True)
        size = (288, 224) if i else (640, 480)  # frame 0 is larger than 224 and gets shrunk
        Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)).save(
            frames_root / f"frame_{i}" / "clipA.jpg", quality=95
        )
    samples = (0.2 * np.sin(2 * np.pi * 330 * np.arange(16000 * 4) / 16000) * 32767).astype(np.int16)
    with wave.open(str(wav), "wb") as handle:
        handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(16000)
        handle.writeframes(samples.tobytes())
    datafile = tmp_path / "train.json"
    entry = {
        "video_id": "clipA",
        "wav": str(wav),
        "video_path": str(frames_root),
        "labels": "/m/09x0r,/m/05zppz",
    }
    missing = {"video_id": "clipB", "wav": str(wav), "video_path": str(frames_root), "labels": "/m/09x0r"}
    datafile.write_text(json.dumps({"data": [entry, missing]}))

    out = tmp_path / "out"
    prepare(
        [datafile],
        out,
        classes=shared("data", "class_labels_indices_audioset.csv"),
        workers=1,
        progress=False,
    )
    sample = read_shards(out)["clipA"]
    metadata = json.loads(sample["json"])
    assert metadata["labels"] == [0, 1] and metadata["frame_time_source"] == "nominal"
    assert metadata["frame_times"] == pytest.approx([i * 4.0 / 16 for i in range(16)])
    for i in range(1, 16):
        assert sample[f"f{i:02d}.jpg"] == (frames_root / f"frame_{i}" / "clipA.jpg").read_bytes()
    assert Image.open(io.BytesIO(sample["f00.jpg"])).size == (299, 224)
    waveform = torch.from_numpy(samples.astype(np.float32) / 32768)[None]
    reference = authors_fbank(waveform)
    np.testing.assert_array_equal(
        np.load(io.BytesIO(sample["fbank.npy"])), reference.numpy().astype(np.float16)
    )
    (failure,) = read_failures(out)
    assert failure["clip_id"] == "clipB" and "frame_0/clipB.jpg: no such file" in failure["reason"]


@pytest.mark.parametrize(
    "text, size",
    [("512MiB", 512 * 2**20), ("1GB", 10**9), ("200M", 200 * 10**6), ("1e6", 10**6), ("4096", 4096)],
)
def test_sizes_are_read_with_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "clip_id, key",
    [
        ("abc_DEF-1", "abc_DEF-1"),  # nothing lost: as is
        ("a.b", "a_b-" + short_hash("a.b")),
        ("café", "cafe-" + short_hash("café")),  # accents dropped, readable
        ("日本", "__-" + short_hash("日本")),
        ("", "_-" + short_hash("")),
        ("x" * 100, "x" * 71 + "-" + short_hash("x" * 100)),
    ],
)
def test_base_keys_are_ascii_without_dots_and_hash_whatever_they_lose(clip_id, key):
    assert base_key(clip_id) == key
    assert len(base_key(clip_id)) <= 80


def test_assign_keys_never_shares_a_key_and_drops_only_the_same_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name, data in [("a/x.mp4", b"one"), ("b/x.mp4", b"two"), ("X.mp4", b"three"), ("a_b.mp4", b"4")]:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "b" / "copy").mkdir()
    (tmp_path / "b" / "copy" / "x.mp4").write_bytes(b"one")  # same id, same bytes as a/x.mp4
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a_b.mp4")  # another name for a file listed already

    def source(name: str) -> ClipSource:
        return ClipSource(clip_id=Path(name).stem, path=str(tmp_path / name), origin=name)

    names = ["a/x.mp4", "b/x.mp4", "X.mp4", "b/copy/x.mp4", "a_b.mp4", "a_b.mp4"]
    kept, dropped, shared = assign_keys([source(n) for n in names])
    assert [s.key for s in kept] == ["x", "x-" + short_hash("b/x.mp4"), "X-" + short_hash("X.mp4"), "a_b"]
    assert [Path(d["path"]).relative_to(tmp_path).as_posix() for d in dropped] == ["b/copy/x.mp4", "a_b.mp4"]
    assert "with the same content" in dropped[0]["reason"] and "listed twice" in dropped[1]["reason"]
    assert shared == {"x": [str(tmp_path / "a/x.mp4"), str(tmp_path / "b/x.mp4")]}
    # the same names give the same keys, whatever else is listed after them
    again, _, _ = assign_keys([source(n) for n in names[:2]])
    assert [s.key for s in again] == [s.key for s in kept[:2]]
    # a symbolic link to a file already listed is the same input
    _, linked, _ = assign_keys(
        [source("a_b.mp4"), ClipSource("link", str(tmp_path / "link.mp4"), origin="l")]
    )
    assert len(linked) == 1 and "listed twice" in linked[0]["reason"]


def test_label_files_are_checked_line_by_line(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_bytes('\ufeffclip_id,labels\nx,"a, b"\nx,a\ny,c\n'.encode())
    rows, problems = read_labels_csv(labels)
    assert {k: (v.labels, v.line) for k, v in rows.items()} == {"x": (("a", "b"), 2), "y": (("c",), 4)}
    assert problems == [
        f"{labels}:3: clip 'x' listed again with other labels ['a'] (line 2: ['a', 'b']); keeping line 2"
    ]
    classes = tmp_path / "classes.csv"
    classes.write_text("display_name,index,mid\nDog,0,/m/dog\nCat,1,/m/cat\n")  # columns in any order
    class_list = ClassList.from_csv(classes)
    assert [class_list.resolve(t) for t in ("/m/cat", "Dog", "1")] == [1, 0, 1]
    for label in ("²", "٣", "2", "-1", " 1"):
        with pytest.raises(LabelError, match="is not in"):
            class_list.resolve(label)
    classes.write_text("index,mid,display_name\n0,/m/dog,Dog\n2,/m/cat,Cat\n")
    with pytest.raises(LabelError, match="class indices must be 0..1 without gaps"):
        ClassList.from_csv(classes)
    classes.write_bytes(b'index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,"Cat\n')
    with pytest.raises(LabelError, match=r"classes.csv:3: "):
        ClassList.from_csv(classes)


def write_cavmae_dataset(root: Path, frames: dict[str, int], seconds: float = 3.0) -> Path:
    """A CAV-MAE-style datafile (issue 20, item 9): per clip `frames` JPEGs at `frames/frame_{i}/ID.jpg`
    as CAV-MAE's extractor lays them out, a 16-kHz wav, and `{"data": [...]}` naming both."""
    entries = []
    for clip_id, count in frames.items():
        for i in range(count):
            folder = root / "frames" / f"frame_{i}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((24, 32, 3), 12 * i, np.uint8)).save(folder / f"{clip_id}.jpg")
        wav = root / "audio" / f"{clip_id}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(int(16000 * seconds)) / 16000)
        with wave.open(str(wav), "wb") as handle:
            handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(16000)
            handle.writeframes((tone * 32767).astype(np.int16).tobytes())
        entries.append(
            {"video_id": clip_id, "wav": str(wav), "video_path": str(root / "frames"), "labels": "/m/09x0r"}
        )
    datafile = root / "eval.json"
    datafile.write_text(json.dumps({"data": entries}))
    return datafile


def test_a_datafile_of_ten_frame_clips_stops_at_once_with_what_to_do(tmp_path, capsys, shared):
    """CAV-MAE's extractor writes frame_0..frame_9: prepare (16 frames) says so at the start, in one line,
    and exits 2 having decoded nothing, instead of skipping every clip one by one and exiting 1."""
    from avsync.cli import main as avsync

    datafile = write_cavmae_dataset(tmp_path, {f"clip{n}": 10 for n in range(3)})
    out = tmp_path / "out"
    classes = shared("data", "class_labels_indices_audioset.csv")
    args = ["--classes", str(classes), "--workers", "1", "--no-progress"]
    started = time.monotonic()
    code = avsync(["prepare", str(datafile), str(out), *args])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.monotonic() - started < 30
    assert len(error) == 1 and "Traceback" not in error[0], error
    message = error[0]
    assert message.startswith(f"avsync prepare: error: {datafile}: none of its 3 clips has frame_15")
    assert "10 frames per clip (frame_0..frame_9, as CAV-MAE's extract_video_frame.py writes them)" in message
    assert "nothing was prepared" in message and "Prepare from the videos instead" in message
    assert not out.exists()  # no shard, manifest or failures file to pass for a (slow) result

    # What is there converts as it is: 10 frames at the nominal i * D / 10, when asked for 10.
    code = avsync(["prepare", str(datafile), str(out), *args, "--num-frames", "10"])
    assert code == 0
    samples = read_shards(out)
    assert sorted(samples) == ["clip0", "clip1", "clip2"]
    metadata = json.loads(samples["clip1"]["json"])
    assert metadata["num_frames"] == 10
    assert metadata["frame_times"] == pytest.approx([0.3 * i for i in range(10)])
    assert samples["clip1"]["f09.jpg"] == (tmp_path / "frames" / "frame_9" / "clip1.jpg").read_bytes()


def test_a_datafile_where_only_some_clips_lack_frames_is_prepared_without_them(tmp_path, caplog, shared):
    datafile = write_cavmae_dataset(tmp_path, {"full": 16, "short": 10})
    with caplog.at_level(logging.WARNING, logger="avsync.data.cavmae"):
        summary = prepare(
            [datafile],
            tmp_path / "out",
            classes=shared("data", "class_labels_indices_audioset.csv"),
            workers=1,
            progress=False,
        )
    assert "1 of 2 datafile clips lack frame_15" in caplog.text
    assert summary.clips == 1 and sorted(read_shards(tmp_path / "out")) == ["full"]
    (failure,) = read_failures(tmp_path / "out")
    assert failure["clip_id"] == "short" and "frame_10/short.jpg: no such file" in failure["reason"]
