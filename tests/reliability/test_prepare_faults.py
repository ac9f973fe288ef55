"""`avsync prepare` (and `avsync embed`'s input listing) on hostile names, changed inputs, bad label
files, unusable output paths and a kill: every input is prepared or reported with its reason, every
problem with the run as a whole is one line naming the file and the line (exit status 2), and no
process outlives the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import unicodedata
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from avsync.api.commands import video_paths
from avsync.api.videos import VideoFiles, VideoInputs, VideoReader
from avsync.cli import main as avsync_main

from .conftest import avsync_command, avsync_env
from .hostile_media import tone, write_media

GROUP = "Hostile inputs"
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run avsync as an unprivileged user (root reads chmod-000 files)",
)


def prepare_main(argv: list[str]) -> int:
    """`avsync prepare ARGV`, as the command runs it."""
    return avsync_main(["prepare", *argv])


def write_audio_only(path: Path, duration: float = 3.0) -> Path:
    """An AAC track alone (an `.m4a`), no video stream."""
    with av.open(str(path), mode="w", format="mp4") as output:
        stream = output.add_stream("aac", rate=16000, layout="mono")
        samples = tone(duration, 16000, 1)
        for offset in range(0, samples.shape[1], 1024):
            block = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, offset : offset + 1024]), format="fltp", layout="mono"
            )
            block.sample_rate, block.time_base, block.pts = 16000, Fraction(1, 16000), offset
            output.mux(stream.encode(block))
        output.mux(stream.encode())
    return path


def run_prepare(*args: str, user: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = avsync_command("prepare", *args, "--workers", "1", "--no-progress")
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, env=avsync_env(), capture_output=True, text=True, timeout=timeout)


def samples_of(out: Path) -> dict[str, dict]:
    """shard key -> the sample's metadata, over every shard of a prepared directory."""
    found = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    found[member.name.split(".", 1)[0]] = json.loads(archive.extractfile(member).read())
    return found


def failures_of(out: Path) -> dict[str, str]:
    lines = (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    return {Path(f["path"]).name: f["reason"] for f in map(json.loads, lines)}


# ------------------------------------------------------------------------------------------ names
@pytest.fixture(scope="module")
def named(tmp_path_factory) -> Path:
    """A folder of clips whose names collide once sanitized, plus files that are not clips."""
    folder = tmp_path_factory.mktemp("names") / "videos"
    (folder / "dog").mkdir(parents=True)
    (folder / "copies").mkdir()
    write_media(folder / "中国.mp4", duration=3.0)
    write_media(folder / "日本.mp4", duration=2.6)
    write_media(folder / "a.b.mp4", duration=2.7)  # a dot in the stem
    write_media(folder / "a_b.mp4", duration=2.8)
    write_media(folder / "Clip.mp4", duration=2.9)
    write_media(folder / "clip.mp4", duration=3.1)  # differs from Clip only in case
    write_media(folder / "dog" / "clip.mp4", duration=3.2)  # the same clip id, another video
    shutil.copy(folder / "a_b.mp4", folder / "copies" / "a_b.mp4")  # a byte-identical copy
    write_media(folder / "line\nbreak.mp4", duration=3.3)
    write_media(folder / "bytes.mp4", duration=3.4)
    os.rename(folder / "bytes.mp4", os.fsencode(folder) + b"/caf\xe9.mp4")  # Latin-1 name, not UTF-8
    (folder / "x.mp4").mkdir()  # a directory with a video name
    write_media(folder / "x.mp4" / "inside.mp4", duration=3.5)
    write_audio_only(folder / "voice.m4a")
    os.symlink("loop.mp4", folder / "loop.mp4")
    os.symlink("gone.mp4", folder / "dangling.mp4")
    (folder / "readme.txt").write_text("not a clip\n")
    return folder


EXPECTED_IDS = {
    "中国", "日本", "a.b", "a_b", "Clip", "clip", "line\nbreak", "caf\\xe9", "inside",
}  # fmt: skip


def test_every_name_gets_a_unique_stable_key_and_only_true_duplicates_are_dropped(
    named, tmp_path, reliability
):
    out = tmp_path / "out"
    result = run_prepare(str(named), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    samples = samples_of(out)
    ids = sorted(m["id"] for m in samples.values())
    assert sorted(set(ids)) == sorted(EXPECTED_IDS) and ids.count("clip") == 2  # both clip.mp4 files
    assert len(samples) == 10
    keys = list(samples)
    assert len({key.lower() for key in keys}) == len(keys)  # unique even without case
    assert all(
        key.isascii() and "." not in key and key.replace("_", "").replace("-", "").isalnum() for key in keys
    )
    by_id = {m["id"]: key for key, m in samples.items() if m["id"] != "clip"}
    assert by_id["a_b"] == "a_b" and by_id["Clip"] == "Clip"  # nothing lost: kept as is
    assert by_id["中国"].startswith("__-") and by_id["日本"].startswith("__-")
    assert by_id["a.b"].startswith("a_b-") and by_id["line\nbreak"].startswith("line_break-")
    assert by_id["caf\\xe9"].startswith("caf_-")
    assert all(samples[key]["key"] == key for key in keys)
    durations = {round(m["duration"], 1) for m in samples.values() if m["id"] == "clip"}
    assert durations == {3.1, 3.2}  # two different videos, both kept

    reasons = failures_of(out)
    assert sorted(reasons) == ["a_b.mp4", "dangling.mp4", "loop.mp4", "voice.m4a"]
    assert (
        reasons["a_b.mp4"]
        == f"duplicate clip id of {named / 'a_b.mp4'}, with the same content; the first is kept"
    )
    assert reasons["loop.mp4"] == "symlink loop (a symbolic link that leads back to itself)"
    assert reasons["dangling.mp4"] == "broken symbolic link (to gone.mp4, which does not exist)"
    assert reasons["voice.m4a"] == "no video stream"
    assert "ignored 1 file(s) without a video or audio extension, e.g. 'readme.txt'" in result.stderr
    assert "1 clip id(s) are shared by different files, all kept under distinct keys" in result.stderr

    # Stable: another run (other output, other worker count) gives the same keys for the same names.
    again = tmp_path / "again"
    assert prepare_main([str(named), str(again), "--workers", "2", "--no-progress"]) == 0
    assert {k: m["id"] for k, m in samples_of(again).items()} == {k: m["id"] for k, m in samples.items()}

    record = lambda case, outcome: reliability.record(GROUP, case, "avsync prepare", outcome)  # noqa: E731
    record(
        "file names that sanitize to the same key (`中国.mp4`, `日本.mp4`; `a.b.mp4`, `a_b.mp4`)",
        "all prepared: a name that loses characters when made ASCII gets a hash of the name "
        f"(`{by_id['日本']}`, `{by_id['a.b']}`); a name that keeps them stays as is (`a_b`); "
        "no key has a dot",
    )
    record(
        "names differing only in case (`Clip.mp4`, `clip.mp4`)",
        "both prepared; keys are unique even without case (the later one gets a hash of its path)",
    )
    record(
        "the same file name in two folders (`clip.mp4`, `dog/clip.mp4`), different videos",
        "both prepared under distinct keys, warned (`clip id(s) are shared by different files`); "
        "a byte-identical copy is the only thing dropped: `duplicate clip id of ..., with the same content`",
    )
    record(
        "a newline in a file name; a name that is not UTF-8 (Latin-1 `café`)",
        "prepared; the id is stored with the undecodable byte escaped (`caf\\\\xe9`), the key is ASCII",
    )
    record("a directory named `x.mp4`", "searched like any directory; the video inside it is prepared")
    record("an audio-only `.m4a`", "tried and skipped: `no video stream` in failures.jsonl")
    record(
        "a symbolic link to itself; a dangling one",
        "skipped: `symlink loop (a symbolic link that leads back to itself)`; `broken symbolic link (to "
        "gone.mp4, which does not exist)`",
    )
    record(
        "a text file among the videos", "not tried; counted and named in a warning (`ignored 1 file(s) ...`)"
    )


def test_embed_keeps_every_named_video_under_a_key_of_its_own(named, reliability):
    inputs = [str(named), str(named / "clip.mp4"), str(named / "dog" / "clip.mp4")]
    paths, failures = video_paths(inputs)
    names = sorted(Path(p).name for p in paths)
    assert names.count("clip.mp4") == 2 and "中国.mp4" in names and "日本.mp4" in names
    reasons = {Path(f.path).relative_to(named).as_posix(): f.reason for f in failures}
    assert set(reasons) == {"copies/a_b.mp4", "clip.mp4", "dog/clip.mp4"}
    assert reasons["clip.mp4"].endswith(": the same file, listed twice; the first is kept")

    reader = VideoReader(image_size=32, audio_length=64, alignment="clip")
    files = VideoFiles([p for p in paths if "中国" in p or "日本" in p or p.endswith("clip.mp4")], reader)
    decoded = [files[i] for i in range(len(files))]
    assert all(isinstance(item, VideoInputs) for item in decoded)
    keys = [item.key for item in decoded]
    assert len(set(keys)) == len(keys) == 4 and {"中国", "日本", "clip"} <= set(keys)
    second = next(k for k in keys if k.startswith("clip-"))
    assert len(second) == len("clip-") + 8
    reliability.record(
        GROUP,
        "`avsync embed` on the same names",
        "avsync embed's input listing and reader (real decodes)",
        "every video is embedded; keys are the clip ids, a repeated id gets a hash of its path "
        "(`clip-<8 hex>`); only the same file named twice or a byte-identical copy is skipped, "
        "with its reason",
    )


# ------------------------------------------------------------------------------------------ stale shards
def test_a_changed_input_is_never_taken_for_a_prepared_one(tmp_path, reliability):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_media(videos / "a.mp4", fps=10)
    write_media(videos / "b.mp4", fps=10)
    out = tmp_path / "out"
    assert prepare_main([str(videos), str(out), "--no-progress", "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_main([str(videos), str(out), "--no-progress", "--workers", "1"]) == 0  # unchanged: no-op
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    write_media(videos / "a.mp4", fps=12)  # new content at the same path
    result = run_prepare(str(videos), str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "inputs changed since (size or modification time" in result.stderr.strip().splitlines()[-1]
    assert prepare_main([str(videos), str(out), "--no-progress", "--workers", "1", "--overwrite"]) == 0
    fps = {m["id"]: round(m["fps"], 1) for m in samples_of(out).values()}
    assert fps == {"a": 12.0, "b": 10.0}

    # The same bytes, mtime restored: only --content-hash can tell; touching a file does not fool it.
    hashed = tmp_path / "hashed"
    flags = ["--no-progress", "--workers", "1", "--content-hash"]
    assert prepare_main([str(videos), str(hashed), *flags]) == 0
    reference = {p.name: p.read_bytes() for p in hashed.iterdir()}
    os.utime(videos / "b.mp4", ns=(0, 10**18))
    assert prepare_main([str(videos), str(hashed), *flags]) == 0
    assert {p.name: p.read_bytes() for p in hashed.iterdir()} == reference
    stamp = os.stat(videos / "a.mp4")
    data = bytearray((videos / "a.mp4").read_bytes())
    data[-100] ^= 0xFF  # same size
    (videos / "a.mp4").write_bytes(bytes(data))
    os.utime(videos / "a.mp4", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert prepare_main([str(videos), str(hashed), *flags]) == 2
    reliability.record(
        GROUP,
        "an input video changed after it was prepared",
        "avsync prepare, rerun into the same OUT",
        "refused (exit 2: `... or inputs changed since (size or modification time; content with "
        "--content-hash); use a new directory or --overwrite`), never `already prepared`; --overwrite "
        "prepares the new content; unchanged inputs still give a byte-identical no-op",
    )
    reliability.record(
        GROUP,
        "a byte changed with size and mtime kept; a file touched without change",
        "avsync prepare --content-hash",
        "the change is caught (SHA-256 of each input); the touch changes nothing",
    )


# ------------------------------------------------------------------------------------------ orphans
def _group_members(pgid: int) -> list[tuple[int, str]]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            command = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(entry), command))
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="processes are found through /proc (Linux)")
def test_workers_die_with_a_killed_prepare(tmp_path, reliability):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(12):
        write_media(videos / f"clip{index:02d}.mp4")
    out = tmp_path / "out"
    command = avsync_command(
        "prepare", str(videos), str(out), "--workers", "2", "--no-progress", "--shard-max-clips", "1"
    )
    process = subprocess.Popen(
        command,
        env=avsync_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            members = _group_members(process.pid)
            workers = [pid for pid, command in members if "spawn_main" in command]
            if len(workers) == 2 and (out / "shard-000000.tar").exists():  # mid-run, both workers busy
                break
            time.sleep(0.1)
        assert process.poll() is None and len(workers) == 2, "the run ended before it could be killed"
        assert any("resource_tracker" in command for _, command in members)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        while _group_members(process.pid) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        left = _group_members(process.pid)
        gone_after = time.monotonic() - killed
    finally:
        for pid, _ in _group_members(process.pid):  # never leave them behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"still alive {gone_after:.1f} s after the kill: {left}"
    assert gone_after < 5
    reliability.record(
        GROUP,
        "`kill -9` of `avsync prepare --workers 2` mid-run",
        "avsync prepare (subprocess), its process group read from /proc",
        "both decoding workers and multiprocessing's resource tracker are gone within 5 s (they used to "
        "stay, blocked on a pipe; workers: PR_SET_PDEATHSIG, plus a parent-pid watchdog thread)",
    )


# ------------------------------------------------------------------------------------------ whole-run errors
def _one_line_error(result: subprocess.CompletedProcess | tuple[int, str]) -> str:
    code, stderr = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("avsync prepare: error:")]
    assert len(errors) == 1, stderr
    return errors[0].removeprefix("avsync prepare: error: ")


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one_clip") / "videos"
    folder.mkdir()
    write_media(folder / "good.mp4")
    write_media(folder / "other.mp4")
    return folder


CLASSES = "index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,Cat\n"


@pytest.mark.parametrize(
    "case, files, arguments, expected",
    [
        (
            "a labels.csv that is not UTF-8 (Latin-1)",
            {"labels.csv": "clip_id,labels\ngood,Dog\nother,Ch\xe9vre\n".encode("latin-1")},
            ["--labels", "labels.csv"],
            "labels.csv:3: not UTF-8 text (byte 0xe9 at column 9); save the file as UTF-8",
        ),
        (
            "a classes.csv row with a missing column",
            {"classes.csv": b"index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat\n"},
            ["--classes", "classes.csv"],
            "classes.csv:3: 2 field(s), the header has 3 (index,mid,display_name); quote a display name "
            "that holds a comma",
        ),
        (
            "a classes.csv row with an unquoted comma in a display name",
            {"classes.csv": b"index,mid,display_name\n0,/m/dog,Dog\n1,/m/man,Male speech, man speaking\n"},
            ["--classes", "classes.csv"],
            "classes.csv:3: 4 field(s), the header has 3",
        ),
        (
            "a classes.csv index that is not a number (`²`)",
            {"classes.csv": "index,mid,display_name\n0,/m/dog,Dog\n²,/m/cat,Cat\n".encode()},
            ["--classes", "classes.csv"],
            "classes.csv:3: class index '²' is not a whole number",
        ),
        (
            "a classes.csv with a class index twice",
            {"classes.csv": b"index,mid,display_name\n0,/m/dog,Dog\n0,/m/cat,Cat\n"},
            ["--classes", "classes.csv"],
            "classes.csv:3: class index 0 again (first on line 2)",
        ),
        (
            "a list file that is not UTF-8",
            {"list.txt": b"videos/good.mp4\nvideos/\xff.mp4\n"},
            [],
            "list.txt:2: not UTF-8 text (byte 0xff at column 8); save the file as UTF-8",
        ),
        (
            "a CAV-MAE datafile that is not valid JSON",
            {"train.json": b'{"data": [\n  {"video_id": "a",}\n]}\n'},
            [],
            "train.json:2: not valid JSON (Expecting property name enclosed in double quotes, column 20)",
        ),
        ("a labels.csv that does not exist", {}, ["--labels", "labels.csv"], "labels.csv: no such file"),
        (
            "OUT is an existing file",
            {"out": b"not a directory\n"},
            [],
            "out: exists and is a file; OUT must be a directory (or a new path)",
        ),
        (
            "OUT under an existing file",
            {"out": b"not a directory\n"},
            ["@out/shards"],
            "out/shards: ",
        ),
        (
            "a damaged manifest.json in OUT",
            {"out/manifest.json": b'{"schema_version": 1, "fingerp'},
            [],
            "out/manifest.json: damaged (Unterminated string",
        ),
    ],
)
def test_a_bad_run_argument_is_one_line_naming_the_file_and_line(
    case, files, arguments, expected, one_clip, tmp_path, capsys, reliability
):
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    if "list.txt" in files:
        shutil.copytree(one_clip, tmp_path / "videos")
    source = next((str(tmp_path / n) for n in files if n in ("list.txt", "train.json")), str(one_clip))
    out = next((str(tmp_path / a[1:]) for a in arguments if a.startswith("@")), str(tmp_path / "out"))
    options = [str(tmp_path / a) if a.endswith((".csv",)) else a for a in arguments if not a.startswith("@")]
    code = prepare_main([source, out, *options, "--workers", "1", "--no-progress"])
    message = _one_line_error((code, capsys.readouterr().err)).replace(f"{tmp_path}/", "")
    assert message.startswith(expected), message
    if case == "OUT under an existing file":
        assert "out is a file, so this directory cannot be made" in message
    shown = message if len(message) < 140 else message[:137] + "..."
    reliability.record(GROUP, case, "avsync prepare", f"refused before any work (exit 2): `{shown}`")


@ROOT_ONLY
def test_unreadable_files_and_a_read_only_out_are_reported_as_such(tmp_path, reliability):
    base = Path(tempfile.mkdtemp(prefix="avsync-nobody-"))
    try:
        base.chmod(0o755)
        videos = base / "videos"
        (videos / "locked").mkdir(parents=True)
        write_media(videos / "good.mp4")
        write_media(videos / "secret.mp4")
        write_media(videos / "locked" / "hidden.mp4")
        for path in (base, videos, videos / "good.mp4"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (videos / "secret.mp4").chmod(0)
        (videos / "locked").chmod(0)
        writable = base / "writable"
        writable.mkdir(mode=0o777)
        writable.chmod(0o777)
        nobody = 65534

        out = writable / "out"
        result = run_prepare(str(videos), str(out), user=nobody)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [m["id"] for m in samples_of(out).values()] == ["good"]
        reasons = failures_of(out)
        assert reasons["secret.mp4"] == "unreadable (permission denied)"
        assert reasons["locked"].startswith("directory not listed (Permission denied): the videos in it")

        refused = run_prepare(str(videos), str(base / "readonly_out"), user=nobody)
        message = _one_line_error(refused)
        assert (
            message == f"{base / 'readonly_out'}: Permission denied (OUT must be a directory you can write)"
        )
    finally:
        for path in (base / "videos" / "locked", base / "videos" / "secret.mp4"):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
    reliability.record(
        GROUP,
        "a chmod-000 video; a chmod-000 subdirectory",
        "avsync prepare as an unprivileged user",
        "skipped: `unreadable (permission denied)`; the directory is in failures.jsonl as `directory not "
        "listed (Permission denied): the videos in it are missing` (it used to vanish without a word)",
    )
    reliability.record(
        GROUP,
        "OUT in a directory the user cannot write",
        "avsync prepare as an unprivileged user",
        "refused (exit 2) with one line naming the directory: `...: Permission denied`",
    )


# ------------------------------------------------------------------------------------------ labels
def test_label_file_surprises_are_reported_and_the_clips_kept(tmp_path, reliability):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("good", "other", "café", "super"):
        write_media(videos / f"{unicodedata.normalize('NFD', name)}.mp4")  # as macOS writes names
    labels = tmp_path / "labels.csv"
    rows = [
        "clip_id,labels",
        "good,Dog",
        "other,Cat",
        "other,Dog",  # again, with another label
        "café,Cat",  # NFC, the file name is NFD
        "super,²",  # isdigit() but no index
        "ghost1,Dog",
        "ghost2,Cat",
        "ghost3,Dog",
        "ghost4,Dog",
        "ghost5,Dog",
        "ghost6,Dog",
    ]
    labels.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")  # with a BOM
    classes = tmp_path / "classes.csv"
    classes.write_text(CLASSES)
    out = tmp_path / "out"
    result = run_prepare(str(videos), str(out), "--labels", str(labels), "--classes", str(classes))
    assert result.returncode == 0, result.stderr[-3000:]
    names = {unicodedata.normalize("NFC", m["id"]): m["label_names"] for m in samples_of(out).values()}
    assert names == {"good": ["Dog"], "other": ["Cat"], "café": ["Cat"]}
    assert failures_of(out) == {
        "super.mp4": f"label '²' is not in {classes} (neither a mid, a display name nor an index) "
        f"({labels}:6)"
    }
    stderr = result.stderr.replace(f"{tmp_path}/", "")
    assert (
        "labels.csv:4: clip 'other' listed again with other labels ['Dog'] (line 3: ['Cat']); keeping line 3"
        in stderr
    )
    unused = (
        "labels.csv: 6 row(s) name clips that are not among the inputs and are ignored: 'ghost1 (line 7)', "
        "'ghost2 (line 8)', 'ghost3 (line 9)', 'ghost4 (line 10)', 'ghost5 (line 11)' and 1 more"
    )
    assert unused in stderr
    record = lambda case, outcome: reliability.record(GROUP, case, "avsync prepare --labels", outcome)  # noqa: E731
    record("a label `²` (`isdigit()` is true, `int()` fails)", "the clip is skipped: `label '²' is not in "
           "classes.csv (neither a mid, a display name nor an index) (labels.csv:6)`; the others are "
           "prepared")  # fmt: skip
    record("labels.csv rows for clips that are not among the inputs", f"warned with the count, the first "
           f"names and their lines: `{unused}`")  # fmt: skip
    record("labels.csv listing a clip twice with other labels", "warned naming both lines and both label "
           "sets; the first row is kept")  # fmt: skip
    record("a labels.csv with a UTF-8 BOM; clip ids in NFC while the file names are NFD (macOS)",
           "read as meant: the BOM is dropped, ids are matched in NFC")  # fmt: skip
