"""`avsync prepare` on media prepared wrongly (a phone's rotated video, float audio far beyond full
scale), two runs into one OUT, and runs stopped by Ctrl-C, SIGTERM and a full disk; then the same media
through the other commands that decode videos (`avsync embed`, `avsync segment`, `avsync localize`).

Runs are real: `avsync prepare` in subprocesses (a process pool or a Dask `LocalCluster`), signals sent
as a terminal (the whole process group) or `kill` (the driver alone) send them, a full tmpfs in a mount
namespace (`unshare`). A labels file that is a FIFO (what `--labels <(...)` gives) holds a run at a
known point, after it took OUT's lock, for as long as the test needs.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avsync.data import audio
from avsync.data.clip import ExtractionOptions
from avsync.data.output_lock import LOCK_NAME
from avsync.data.parts import PARTS_DIR
from avsync.data.prepare import WorkItem, prepare, process
from avsync.data.schema import decode_npy
from avsync.data.sources import discover

from .conftest import avsync_command, avsync_env
from .hostile_media import CORNER, tone, write_media

GROUP, RESUME = "Hostile inputs", "Resume"
HINT = "(finished shards are kept: rerun the same command to resume)"
CLIPS = 10
LABELS = "clip_id,labels\n" + "".join(f"clip{i:02d},{('Dog', 'Cat')[i % 2]}\n" for i in range(CLIPS))


# ------------------------------------------------------------------------------------------ helpers
def start_prepare(*args: str) -> subprocess.Popen:
    """`avsync prepare ARGS --no-progress --shard-max-clips 1` in a process group of its own (a
    terminal's Ctrl-C goes to the whole group)."""
    command = avsync_command("prepare", *args, "--no-progress", "--shard-max-clips", "1")
    return subprocess.Popen(
        command, env=avsync_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    return samples


def failures_of(out: Path) -> dict[str, str]:
    lines = (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    return {Path(f["path"]).name: f["reason"] for f in map(json.loads, lines)}


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    """Kill a run and its process group (never leave them behind when a test fails)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A good clip, a phone's portrait video (stored 64x48 with a display matrix of -90 degrees) and two
    float-PCM tracks scaled far past full scale (finite samples: 3e19 after resampling 44.1-kHz
    stereo; 3e37 at 16 kHz mono, unresampled)."""
    folder = tmp_path_factory.mktemp("media")
    write_media(folder / "good.mp4")
    write_media(folder / "portrait.mp4", size=(64, 48), rotation=-90)
    loud = tone(3.0, 44100, 2) * np.float32(1e20)
    write_media(folder / "loud_1e20.mkv", channels=2, sample_rate=44100, audio_codec="pcm_f32le", audio=loud)
    louder = tone(3.0, 16000, 1) * np.float32(1e38)
    assert np.isfinite(louder).all()
    write_media(
        folder / "loud_1e38.mkv", channels=1, sample_rate=16000, audio_codec="pcm_f32le", audio=louder
    )
    return folder


def stored_picture(path: Path) -> np.ndarray:
    """The first frame as stored in the file (no display matrix applied), decoded by PyAV alone."""
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips") / "videos"
    folder.mkdir()
    for index in range(CLIPS):
        write_media(folder / f"clip{index:02d}.mp4", duration=2.5)
    return folder


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Every file of uninterrupted runs over `clips` (in this process, one worker), without labels and
    with `LABELS`."""
    root = tmp_path_factory.mktemp("reference")
    (root / "labels.csv").write_text(LABELS)
    outputs = {}
    for name, labels in (("plain", None), ("labelled", root / "labels.csv")):
        prepare([clips], root / name, labels=labels, shard_max_clips=1, workers=1, progress=False)
        outputs[name] = files_of(root / name)
    return outputs


# ------------------------------------------------------------------------------------------ media
def test_huge_audio_is_skipped_and_a_rotated_video_stored_upright(media, tmp_path, reliability):
    out = tmp_path / "out"
    result = subprocess.run(
        avsync_command("prepare", str(media), str(out), "--workers", "1", "--no-progress"),
        env=avsync_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = failures_of(out)
    assert sorted(reasons) == ["loud_1e20.mkv", "loud_1e38.mkv"]
    beyond = "beyond 1000 x full scale (float PCM written unscaled, or corrupt)"
    assert re.fullmatch(
        rf"audio samples reach 3(\.\d+)?e\+19, {re.escape(beyond)}.*", reasons["loud_1e20.mkv"]
    )
    assert reasons["loud_1e38.mkv"].startswith(f"audio samples reach 3e+37, {beyond}")

    samples = samples_of(out)
    assert sorted(samples) == ["good", "portrait"]
    for sample in samples.values():  # no spectrogram in a shard is anything but finite
        assert np.isfinite(decode_npy(sample["fbank.npy"]).astype(np.float32)).all()
    metadata = json.loads(samples["portrait"]["json"])
    shown = {
        k: metadata[k] for k in ("width", "height", "frame_width", "frame_height", "rotation", "mirrored")
    }
    assert shown == {
        "width": 48, "height": 64, "frame_width": 48, "frame_height": 64, "rotation": -90, "mirrored": False,
    }  # fmt: skip
    good = json.loads(samples["good"]["json"])
    assert (good["rotation"], good["mirrored"]) == (0, False)
    frame = np.asarray(Image.open(io.BytesIO(samples["portrait"]["f00.jpg"])).convert("RGB")).astype(int)
    upright = np.rot90(stored_picture(media / "portrait.mp4"), k=-1)  # -90: a quarter turn clockwise
    assert frame.shape == upright.shape == (64, 48, 3)
    assert np.abs(frame - upright).mean() < 4  # JPEG and H.264 losses only
    rows, columns = CORNER
    assert frame[:columns, 48 - rows :].mean() > 200 and frame[:columns, : 48 - rows].mean() < 60  # top right

    record = lambda case, outcome: reliability.record(GROUP, case, "avsync prepare", outcome)  # noqa: E731
    record(
        "float PCM scaled by 1e20 (44.1-kHz stereo) and by 1e38 (16-kHz mono): finite samples whose "
        "spectrogram overflows to NaN",
        f"skipped: `{reasons['loud_1e38.mkv'].split(';')[0]}` (likewise `3e+19`) in failures.jsonl; any "
        "sample above 1000 x full scale is refused, and a non-finite spectrogram never reaches a shard",
    )
    record(
        "a phone's portrait video: 64x48 stored, display matrix -90 degrees",
        "stored upright (48x64, the stored picture turned a quarter clockwise, as ffmpeg's autorotate "
        "shows it); metadata `rotation: -90`, `mirrored: false`, `width: 48`, `height: 64`",
    )


def test_a_non_finite_spectrogram_never_reaches_a_shard(media, monkeypatch, reliability):
    """The last guard, in `process` (both engines use it): with the decoder's peak check lifted, the
    1e38 track decodes and its spectrogram is NaN throughout; the clip is still refused."""
    monkeypatch.setattr(audio, "MAX_PEAK", math.inf)
    [source] = [s for s in discover([media]).sources if s.clip_id == "loud_1e38"]
    result = process(WorkItem(source, (), ()), ExtractionOptions())
    assert result.sample is None
    assert re.fullmatch(r"spectrogram holds \d+ NaN or infinite value\(s\)", result.failure["reason"])
    reliability.record(
        GROUP,
        "a spectrogram that is not finite, whatever the cause",
        "prepare's per-clip step (both engines), the decoder's peak check lifted",
        f"skipped: `{result.failure['reason']}`; never written to a shard",
    )


def test_the_other_commands_decode_the_same_media_the_same_way(media, small_model, tmp_path, reliability):
    from avsync.checkpoints import load_backbone
    from avsync.cli import main as avsync_main
    from avsync.tasks.localization_data import FramePrompt, PromptDataset
    from avsync.tasks.segmentation import clip_features

    loud, portrait = media / "loud_1e20.mkv", media / "portrait.mp4"
    # embed: the loud clip is skipped with prepare's reason, the portrait one embedded upright
    out = tmp_path / "embedded.npz"
    argv = [str(portrait), str(loud), "--ckpt", str(small_model), "--out", str(out), "--device", "cpu"]
    assert avsync_main(["embed", *argv, "--workers", "0", "--no-progress"]) == 0
    with np.load(out, allow_pickle=False) as embedded:
        run = json.loads(str(embedded["metadata"]))
        assert list(embedded["keys"]) == ["portrait"]
    [failure] = run["failures"]
    assert Path(failure["path"]).name == "loud_1e20.mkv" and failure["reason"].startswith(
        "audio samples reach"
    )

    # segment: the same decode (`clip_features`): upright frames; the loud clip in the report's failures
    backbone = load_backbone(small_model)
    features = clip_features(backbone, portrait, ExtractionOptions())
    assert features.frames[0].shape == (64, 48, 3)
    figures = tmp_path / "segments"
    segment = ["segment", str(loud), str(portrait), "--ckpt", str(small_model), "--out", str(figures)]
    assert avsync_main(segment) == 0
    report = json.loads((figures / "segments.json").read_text())
    assert [Path(f["source"]).name for f in report["failures"]] == ["loud_1e20.mkv"]
    assert report["failures"][0]["reason"].endswith(failure["reason"])

    # localize: a mask drawn on the video as shown (48 wide, 64 high) fits; the loud clip is refused
    shown, landscape = tmp_path / "portrait_mask.png", tmp_path / "landscape_mask.png"
    Image.fromarray(np.pad(np.ones((16, 16), np.uint8) * 255, ((0, 48), (32, 0)))).save(shown)  # 48x64
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(landscape)
    prompts = [FramePrompt("portrait", portrait, 1.0, shown, 0), FramePrompt("loud", loud, 1.0, landscape, 0)]
    dataset = PromptDataset(prompts, image_size=32, audio_length=64)
    upright, refused = dataset[0], dataset[1]
    assert "rejection" not in upright and upright["mask"].any()
    assert refused["rejection"].reason.endswith(failure["reason"])

    reliability.record(
        GROUP,
        "the portrait video and the 1e20 track through `avsync embed`, `avsync segment`, `avsync localize`",
        "avsync embed, avsync segment and clip_features, PromptDataset (real decodes, a tiny model)",
        "one decoder for all: frames upright (a mask drawn on the video as shown fits it), the loud "
        "clip skipped with prepare's reason (embed's `failures`, segment's report, localize's rejections)",
    )


# ------------------------------------------------------------------------------------------ one run per OUT
@pytest.mark.parametrize("engine", ["pool", "dask"])
def test_a_second_run_into_the_same_out_is_refused_at_once(engine, clips, reference, tmp_path, reliability):
    out, fifo = tmp_path / "out", tmp_path / "labels.csv"
    os.mkfifo(fifo)  # the first run waits here, lock taken, until the labels are written
    options = ["--workers", "2"] + (["--engine", "dask", "--partition-size", "2"] if engine == "dask" else [])
    first = start_prepare(str(clips), str(out), "--labels", str(fifo), *options)
    second = None
    try:
        lock = out / LOCK_NAME
        wait_for(lambda: lock.exists() and lock.read_text().startswith("pid"), first, "lock")
        second = start_prepare(str(clips), str(out), "--labels", str(fifo), *options)
        _, said = second.communicate(timeout=120)  # never blocked on the FIFO: refused before reading it
        assert first.poll() is None, "the first run must still hold OUT"
        assert second.returncode == 2, said[-3000:]
        assert said.splitlines() == [
            f"avsync prepare: error: {out}: in use by another avsync prepare (pid {first.pid} on "
            f"{os.uname().nodename}); wait for it to end or use another directory (the lock, {LOCK_NAME}, "
            "goes with the process that holds it)"
        ]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run touched nothing
        with open(fifo, "w") as labels:
            labels.write(LABELS)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        for process in (first, second):
            if process is not None:
                stop(process)
    assert files_of(out) == reference["labelled"]  # the lock file is gone too
    reliability.record(
        GROUP,
        f"two `avsync prepare{' --engine dask' if engine == 'dask' else ''}` runs into the same OUT",
        "avsync prepare (subprocesses), the second started while the first runs",
        "the second is refused at once (exit 2, before it lists or decodes anything): `OUT: in use by "
        "another avsync prepare (pid N on HOST); wait for it to end or use another directory`; the first "
        "finishes with the bytes of a lone run",
    )


def test_runs_started_together_and_a_killed_lock_holder(clips, reference, tmp_path, reliability):
    out = tmp_path / "together"
    runs = [start_prepare(str(clips), str(out), "--workers", "1") for _ in range(2)]  # 0 s apart
    try:
        said = [run.communicate(timeout=300)[1] for run in runs]
    finally:
        for run in runs:
            stop(run)
    codes = sorted(run.returncode for run in runs)
    assert all("Traceback" not in text for text in said), said
    # the loser is refused (2), or (slowed down) finds OUT finished and has nothing to do (0)
    assert codes in ([0, 2], [0, 0]), said
    refused = [text for run, text in zip(runs, said, strict=True) if run.returncode == 2]
    assert all(": in use by another avsync prepare" in text for text in refused), refused
    assert files_of(out) == reference["plain"]

    killed = tmp_path / "killed"
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    holder = start_prepare(str(clips), str(killed), "--labels", str(fifo), "--workers", "1")
    try:
        wait_for(lambda: (killed / LOCK_NAME).exists(), holder, "lock")
    finally:
        stop(holder)  # kill -9, holding the lock
    assert (killed / LOCK_NAME).exists()
    (tmp_path / "labels_file.csv").write_text(LABELS)
    rerun = subprocess.run(
        avsync_command(
            "prepare", str(clips), str(killed), "--labels", str(tmp_path / "labels_file.csv"),
            "--workers", "1", "--no-progress", "--shard-max-clips", "1",
        ),
        env=avsync_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert files_of(killed) == reference["labelled"]
    reliability.record(
        GROUP,
        "two runs into one OUT started at the same moment; a run killed (`kill -9`) while it holds OUT",
        "avsync prepare (subprocesses)",
        "one prepares, the other is refused (exit 2) or, started late, finds nothing to do (exit 0); no "
        "traceback, the bytes of a lone run. The kernel drops a killed run's lock (`flock`): the rerun "
        "goes ahead",
    )


# ------------------------------------------------------------------------------------------ stopping
STOPS = [
    pytest.param("SIGINT", "pool", True, id="ctrl-c-pool"),
    pytest.param("SIGINT", "dask", True, id="ctrl-c-dask"),
    pytest.param("SIGTERM", "dask", False, id="sigterm-dask-driver"),
]


@pytest.mark.parametrize("name, engine, to_group", STOPS)
def test_a_stopped_run_says_one_line_and_resumes_to_the_same_bytes(
    name, engine, to_group, clips, reference, tmp_path, reliability
):
    signum = signal.Signals[name]
    out = tmp_path / "out"
    options = ["--workers", "2"] + (["--engine", "dask", "--partition-size", "1"] if engine == "dask" else [])
    run = start_prepare(str(clips), str(out), *options)
    try:
        if engine == "dask":  # a part decoded: the cluster is busy
            wait_for(lambda: any((out / PARTS_DIR).glob("part-*.json")), run, "decoded partition")
        else:
            wait_for(lambda: (out / "shard-000000.tar").exists(), run, "finished shard")
        os.killpg(run.pid, signum) if to_group else run.send_signal(signum)
        _, said = run.communicate(timeout=180)  # to the end of stderr: workers' last words included
    finally:
        stop(run)
    assert run.returncode == 128 + signum, said[-3000:]
    assert said.splitlines() == [f"avsync prepare: stopped by {name} {HINT}"]
    assert not (out / "manifest.json").exists(), "the run ended before the signal"
    assert not (out / LOCK_NAME).exists()

    rerun = subprocess.run(
        avsync_command("prepare", str(clips), str(out), *options, "--no-progress", "--shard-max-clips", "1"),
        env=avsync_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert files_of(out) == reference["plain"]
    how = ("Ctrl-C (SIGINT to the process group)" if to_group else "kill -TERM to the driver") + (
        " of `avsync prepare --engine dask`" if engine == "dask" else " of `avsync prepare --workers 2`"
    )
    reliability.record(
        RESUME,
        how,
        "avsync prepare (subprocess), then the same command again",
        f"one line, `avsync prepare: stopped by {name} {HINT}`, exit status {128 + signum}: no traceback "
        "(the workers leave stopping to the driver); the rerun resumes and writes the bytes of an "
        "uninterrupted run",
    )


def _unshare() -> list[str] | None:
    """A command prefix that runs a shell in a new mount namespace where tmpfs can be mounted."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
        )
        if probe.returncode == 0:
            return prefix
    return None


def test_a_full_disk_is_one_line_and_the_rerun_gives_the_same_bytes(clips, reference, tmp_path, reliability):
    prefix = _unshare()
    if prefix is None:
        pytest.skip("needs unshare and a mount namespace to mount a small tmpfs")
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    command = shlex.join(
        avsync_command("prepare", str(clips), str(disk / "out"), "--workers", "1", "--no-progress")
        + ["--shard-max-clips", "1"]
    )
    script = f"""
        mount -t tmpfs -o size=200k tmpfs {disk} || exit 99
        {command} 2> {logs}/first.err; echo $? > {logs}/first.rc
        mount -o remount,size=64m {disk} || exit 98
        {command} 2> {logs}/second.err; echo $? > {logs}/second.rc
        cp -r {disk}/out {logs}/out
    """
    done = subprocess.run(
        [*prefix, "sh", "-c", script], env=avsync_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    first, second = (logs / "first.err").read_text(), (logs / "second.err").read_text()
    assert (logs / "first.rc").read_text().strip() == "2", first
    assert re.fullmatch(
        rf"avsync prepare: error: {re.escape(str(disk))}/out\S*: No space left on device {re.escape(HINT)}\n",
        first,
    ), first
    assert (logs / "second.rc").read_text().strip() == "0", second
    assert "resuming" in second
    assert files_of(logs / "out") == reference["plain"]
    reliability.record(
        RESUME,
        "the disk fills up mid-run (a 200-KiB tmpfs)",
        "avsync prepare (subprocess, in a mount namespace), then the same command with room",
        f"one line, `avsync prepare: error: OUT: No space left on device {HINT}`, exit 2 (the unfinished "
        "shard's tar stream is closed with it: no `Exception ignored`); the rerun resumes to the bytes "
        "of an uninterrupted run",
    )


def test_a_finished_out_on_a_read_only_mount_is_still_a_no_op(clips, reference, tmp_path, reliability):
    """The lock needs no write access where nothing is to be written: OUT cannot take a lock file."""
    prefix = _unshare()
    if prefix is None:
        pytest.skip("needs unshare and a mount namespace to mount OUT read-only")
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference["plain"].items():
        (out / name).write_bytes(data)
    command = shlex.join(
        avsync_command("prepare", str(clips), str(out), "--workers", "1", "--no-progress")
        + ["--shard-max-clips", "1"]
    )
    script = f"mount --bind {out} {out} && mount -o remount,bind,ro {out} || exit 99\n{command}"
    done = subprocess.run(
        [*prefix, "sh", "-c", script], env=avsync_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is already prepared with these inputs and settings; nothing to do" in done.stderr
    assert files_of(out) == reference["plain"]
    reliability.record(
        GROUP,
        "a finished OUT on a read-only mount, prepared again",
        "avsync prepare (subprocess, OUT bind-mounted read-only)",
        "nothing to do, exit 0: a run that cannot write into OUT takes no lock there (it cannot "
        "disturb another run)",
    )
