"""Names read from files that other people made (shard manifests, embed indexes, index.json, feature
caches, localization manifests, a prepare journal) are data: a command (`pipe:`), a URL, an absolute
path or a `..` escape is refused with one line naming the file, and never runs or is read.

The commands are run for real (`avsync fit / retrieve / embed` in subprocesses, from inside the shard
folder, which is how the review made `pipe:` run); a file the planted command would create must not
appear.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.checkpoints import save_backbone
from avsync.data.member_paths import UnsafeNameError, inside_path, member_path
from avsync.data.pipeline import resolve_shards
from avsync.model import CAVMAESync

from .conftest import SMALL_BACKBONE, avsync_command, avsync_env, fit_config

#: Names a hostile manifest may list in place of a shard: each must be refused.
HOSTILE_NAMES = {
    "a shell command": "pipe:touch PWNED; cat shard-000000.tar",
    "a URL": "s3://bucket/shard-000000.tar",
    "a file: URL": "file:shard-000000.tar",
    "a parent-folder escape": "../shard-000000.tar",
    "an absolute path": "/etc/passwd",
    "a path into a subfolder": "sub/shard-000000.tar",
    "a number": 7,
}


def hostile_copy(
    prepared_shards: Path, folder: Path, name: object = HOSTILE_NAMES["a shell command"]
) -> Path:
    """A copy of the prepared shards whose manifest lists `name` as its first shard."""
    shutil.copytree(prepared_shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("what", list(HOSTILE_NAMES))
def test_a_manifest_name_that_is_not_a_plain_file_is_refused(prepared_shards, tmp_path, monkeypatch, what):
    folder = hostile_copy(prepared_shards, tmp_path / "shards", HOSTILE_NAMES[what])
    monkeypatch.chdir(folder)
    for spec in (".", "manifest.json", str(folder)):  # `.` turned `pipe:` into a URL before
        with pytest.raises(UnsafeNameError, match="manifest.json: refuses the listed name"):
            resolve_shards(spec)
    assert not (folder / "PWNED").exists()


def test_manifest_names_resolve_to_absolute_files_inside_the_folder(prepared_shards, monkeypatch):
    monkeypatch.chdir(prepared_shards)
    urls = resolve_shards(".").urls
    assert urls == [str(prepared_shards.resolve() / f"shard-{i:06d}.tar") for i in range(8)]
    assert resolve_shards("manifest.json").urls == urls


def test_a_user_typed_pipe_url_still_works(prepared_shards):
    """What a user types on the command line is theirs: `pipe:` and brace patterns stay URLs."""
    spec = f"pipe:cat {prepared_shards}/shard-{{000000..000001}}.tar"
    assert resolve_shards(spec).urls == [f"pipe:cat {prepared_shards}/shard-00000{i}.tar" for i in range(2)]


def test_member_and_inside_paths_refuse_every_escape(tmp_path):
    assert member_path(tmp_path, "part-0.npz", "x.json") == tmp_path.resolve() / "part-0.npz"
    assert inside_path(tmp_path, "images/a.jpg", "m.csv") == tmp_path.resolve() / "images" / "a.jpg"
    for bad in ("../a", "/etc/passwd", "a/../../b", "http://x/a.jpg", "C:\\a.jpg", "a\x00b", "", None):
        with pytest.raises(UnsafeNameError):
            inside_path(tmp_path, bad, "m.csv")
    for bad in ("a/b", "..", ".", "pipe:ls", "x\\y"):
        with pytest.raises(UnsafeNameError):
            member_path(tmp_path, bad, "x.json")


# ------------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    backbone = CAVMAESync(**{**SMALL_BACKBONE, "mel_bins": 128})
    return save_backbone(backbone, tmp_path_factory.mktemp("ckpt") / "small.safetensors")


def run_in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        avsync_command(*args), cwd=folder, env=avsync_env(), capture_output=True, text=True, timeout=300
    )


def assert_refused_in_one_line(result: subprocess.CompletedProcess, folder: Path) -> None:
    assert not (folder / "PWNED").exists(), "the manifest's shell command ran"
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "manifest.json: refuses the listed name 'pipe:touch PWNED; cat shard-000000.tar'" in result.stderr


def test_retrieve_from_inside_a_hostile_shard_folder_runs_nothing(
    prepared_shards, small_checkpoint, tmp_path, reliability
):
    folder = hostile_copy(prepared_shards, tmp_path / "shards")
    for spec in (".", "manifest.json"):
        result = run_in(
            folder, "retrieve", "--ckpt", str(small_checkpoint), "--shards", spec, "--workers", "0"
        )
        assert_refused_in_one_line(result, folder)
    reliability.record(
        "Hostile inputs",
        "a shard `manifest.json` naming a shard `pipe:touch PWNED; cat shard-000000.tar` (also a URL, "
        "`../`, an absolute path, a subfolder, a number)",
        "avsync retrieve --shards . and --shards manifest.json, run inside the shard folder; "
        "resolve_shards for every form",
        "refused before any read, exit 2, one line: `manifest.json: refuses the listed name 'pipe:...': "
        "a URL, command or drive (contains ':'), not a plain file name`; the command never runs (no PWNED "
        "file); listed names become absolute paths inside the manifest's folder; `pipe:` typed by the user "
        "still works",
    )


def test_embed_from_inside_a_hostile_shard_folder_runs_nothing(
    prepared_shards, small_checkpoint, tmp_path, reliability
):
    folder = hostile_copy(prepared_shards, tmp_path / "shards")
    out = tmp_path / "embeddings"
    result = run_in(
        folder, "embed", "--shards", ".", "--ckpt", str(small_checkpoint), "--out", str(out),
        "--device", "cpu", "--workers", "0", "--no-progress",
    )  # fmt: skip
    assert_refused_in_one_line(result, folder)
    reliability.record(
        "Hostile inputs",
        "the same hostile `manifest.json`",
        "avsync embed --shards . (inside the shard folder)",
        "refused in one line (exit 2); the command never runs",
    )


def test_fit_on_a_hostile_shard_folder_runs_nothing(prepared_shards, tmp_path, reliability):
    folder = hostile_copy(prepared_shards, tmp_path / "shards")
    config = fit_config(tmp_path / "fit.yaml", Path("."), tmp_path / "runs", trainer={"max_steps": 1})
    result = run_in(folder, "fit", "--config", str(config))
    assert_refused_in_one_line(result, folder)
    assert not (tmp_path / "runs" / "reliability" / "run" / "checkpoints").exists()
    reliability.record(
        "Hostile inputs",
        "the same hostile `manifest.json`",
        "avsync fit with `train_shards: .` (inside the shard folder)",
        "refused in one line (exit 2) before training; the command never runs",
    )


# ------------------------------------------------------------------------------------ other files
def test_names_in_embed_outputs_indexes_and_caches_are_refused(tmp_path, reliability):
    """Every other file whose listed names avsync opens: an embed run's manifest and per-rank index, an
    index's `index.json`, a probe feature cache's manifest, a prepare journal, a localization CSV."""
    from avsync.api.outputs import written_parts
    from avsync.data.journal import Journal
    from avsync.search.gallery import Gallery, GalleryError
    from avsync.search.index import SearchError, SearchIndex
    from avsync.tasks.localization_data import read_manifest
    from avsync.tasks.probe.cache import FeatureCache

    secret = tmp_path / "secret.npz"
    np.savez(secret, keys=np.array(["a"]), audio=np.zeros((1, 2, 3)), video=np.zeros((1, 2, 3)))

    embed_dir = tmp_path / "embed"
    embed_dir.mkdir()
    (embed_dir / "manifest.json").write_text(json.dumps({"parts": [{"name": "../secret.npz"}]}))
    with pytest.raises(GalleryError, match="refuses the listed name '../secret.npz'"):
        Gallery.open(embed_dir)
    (embed_dir / "manifest.json").unlink()
    (embed_dir / "index-rank0.json").write_text(json.dumps({"parts": {"../secret.npz": ["a"]}}))
    with pytest.raises(UnsafeNameError, match="index-rank0.json: refuses"):
        written_parts(embed_dir)

    index_dir = tmp_path / "index"
    index_dir.mkdir()
    facts = {"format_version": None, "files": {"audio": "/etc/passwd"}}
    from avsync.search import index as index_module

    facts.update(
        format_version=index_module.FORMAT_VERSION, kind="exact", steps=2, dim=3, num_clips=1,
        modalities=["audio"],
    )  # fmt: skip
    (index_dir / "index.json").write_text(json.dumps(facts))
    with pytest.raises(SearchError, match="index.json: refuses the listed name '/etc/passwd'"):
        SearchIndex(index_dir).faiss_index("audio")

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with pytest.raises(ValueError, match="refuses the listed name 'pipe:cat x'"):
        FeatureCache._read_parts(cache_dir, {"clips": 1, "parts": ["pipe:cat x"]})

    journal = Journal(tmp_path / "prep", "fp")
    journal.path.parent.mkdir()
    entry = {"shard": {"name": "../secret.npz", "clips": 1, "bytes": secret.stat().st_size, "sha256": ""}}
    journal.path.write_text(json.dumps({"fingerprint": "fp"}) + "\n" + json.dumps(entry) + "\n")
    assert journal.load() == [], "a journal entry naming a file outside its folder was kept"

    csv = tmp_path / "loc" / "manifest.csv"
    csv.parent.mkdir()
    csv.write_text(
        "image,audio,mask,class\n"
        f"a.jpg,a.wav,../secret.npz,dog\na.jpg,a.wav,{secret},dog\na.jpg,a.wav,http://host/m.png,dog\n"
    )
    prompts = read_manifest(csv)
    assert prompts.sources == [] and len(prompts.rejected) == 3
    assert all("refuses the listed path" in rejection.reason for rejection in prompts.rejected)
    reliability.record(
        "Hostile inputs",
        "names outside their folder in other listing files: an embed run's `manifest.json` and "
        "`index-rank0.json`, an index's `index.json` `files`, a feature cache's parts, a prepare journal, "
        "a localization CSV's image/audio/mask (`../`, absolute, `pipe:`, `http://`)",
        "Gallery.open, written_parts (embed resume), SearchIndex, FeatureCache, Journal.read, read_manifest",
        "each refused naming the file and the name (a journal entry is treated as damaged and its shard "
        "made again; a CSV row is rejected with its line); nothing outside the folder is opened",
    )


def test_ffmpeg_never_reads_a_file_name_as_a_protocol(tmp_path, monkeypatch):
    """`file:good.mp4` is a file of that name, not ffmpeg's `file:` protocol pointing at good.mp4."""
    from avsync.data.errors import DecodeError
    from avsync.data.media import open_media

    from .hostile_media import write_media

    write_media(tmp_path / "good.mp4")
    (tmp_path / "file:good.mp4").write_text("not a video, whatever its name says\n" * 20)
    monkeypatch.chdir(tmp_path)
    open_media("good.mp4").close()
    with pytest.raises(DecodeError, match="not a readable media container"):
        open_media("file:good.mp4")


def test_listing_files_of_the_wrong_shape_are_refused_in_one_line(tmp_path):
    """A per-rank embed index or a feature-cache manifest that is a JSON list, or nested past Python's
    recursion limit: a ValueError naming the file, not an AttributeError or RecursionError."""
    from avsync.api.outputs import written_parts
    from avsync.tasks.probe.cache import FeatureCache

    for text in ("[1, 2]", "[" * 100_000 + "]" * 100_000):
        embed_dir = tmp_path / f"embed{len(text)}"
        embed_dir.mkdir()
        (embed_dir / "index-rank0.json").write_text(text)
        with pytest.raises(ValueError, match="index-rank0.json: (unreadable|not an embed) index"):
            written_parts(embed_dir)
        cache = FeatureCache(tmp_path / f"cache{len(text)}")
        directory = cache.directory("train", {"a": 1})
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match="unreadable cache manifest"):
            cache.load("train", {"a": 1})
