"""`avsync embed`: the documented npz and parquet layouts, failures reported and skipped, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.api import load
from avsync.api.outputs import MISSING_PYARROW, PARQUET_METADATA_KEY
from avsync.cli import main as avsync_main
from avsync.evaluation.retrieval import evaluate_all, retrieval_metrics

NPZ_ARRAYS = {"keys", "paths", "audio", "video", "frame_times", "durations", "metadata"}


def embed_main(argv: list[str]) -> int:
    """`avsync embed ARGV`, as the command runs it."""
    return avsync_main(["embed", *argv])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_clips, broken_clips) -> list[str]:
    """A directory of three good clips with one broken file in it, the same directory's first clip
    named again (a duplicate), and a file that is not a video."""
    folder = tmp_path_factory.mktemp("inputs") / "videos"
    folder.mkdir()
    for clip in synth_clips:
        shutil.copy(clip, folder)
    shutil.copy(broken_clips[0], folder / "zz_truncated.mp4")
    return [str(folder), str(folder / synth_clips[0].name), str(broken_clips[1])]


@pytest.fixture(scope="module")
def expected(small_checkpoint, synth_clips):
    return load(small_checkpoint).embed_videos(synth_clips, patches=True, batch_size=2)


def test_embed_writes_the_documented_npz_and_lists_what_it_skipped(
    inputs, small_checkpoint, expected, tmp_path
):
    out = tmp_path / "embeddings.npz"
    argv = [*inputs, "--ckpt", str(small_checkpoint), "--out", str(out), "--patches", "--batch-size", "2"]
    assert embed_main([*argv, "--workers", "0", "--no-progress"]) == 0
    with np.load(out, allow_pickle=False) as data:
        stored = {name: data[name] for name in data.files}
    assert set(stored) == NPZ_ARRAYS | {"audio_patches", "video_patches"}
    assert stored["keys"].tolist() == expected.keys
    assert [Path(p).name for p in stored["paths"]] == [Path(e.path).name for e in expected.embeddings]
    assert stored["audio"].shape == (3, 16, 32) and stored["audio"].dtype == np.float32
    assert np.array_equal(stored["audio"], expected.audio.numpy())
    assert np.array_equal(stored["video"], expected.video.numpy())
    assert stored["audio_patches"].shape == (3, 16, 16, 32)
    assert stored["video_patches"].shape == (3, 16, 4, 32)
    assert np.array_equal(stored["video_patches"], np.stack([e.video_patches for e in expected.embeddings]))
    assert np.array_equal(stored["frame_times"], np.array([e.frame_times for e in expected.embeddings]))
    assert stored["durations"] == pytest.approx([3.0] * 3, abs=0.1)

    metadata = json.loads(stored["metadata"].item())
    skipped = {Path(f["path"]).name: f["reason"] for f in metadata["failures"]}
    assert set(skipped) == {"zz_truncated.mp4", Path(inputs[1]).name, "notes.mp4"}
    assert "duplicate clip id" in skipped[Path(inputs[1]).name]
    assert "not a readable media container" in skipped["notes.mp4"]
    assert metadata["num_clips"] == 3 and len(metadata["clips"]) == 3 and metadata["patches"] is True
    assert metadata["backbone_config"]["embed_dim"] == 32 and metadata["alignment"] == "clip"
    assert metadata["num_frames"] == 16 and metadata["precision"] == "fp32"
    assert metadata["format_version"] == 1
    assert metadata["clips"][0]["frame_times"] == stored["frame_times"][0].tolist()

    # the documented retrieval path runs on the file as written
    results = evaluate_all(torch.from_numpy(stored["audio"]), torch.from_numpy(stored["video"]))
    direct = retrieval_metrics(expected.video, expected.audio)
    assert results["video_to_audio"]["diagonal_mean"].metrics == direct.metrics


def test_the_installed_command_reports_failures_on_stderr_and_decodes_in_workers(
    inputs, small_checkpoint, expected, tmp_path
):
    out = tmp_path / "run.npz"
    command = [sys.executable, "-m", "avsync.cli", "embed", *inputs, "--ckpt", str(small_checkpoint)]
    done = subprocess.run(
        [*command, "--out", str(out), "--batch-size", "2", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "zz_truncated.mp4: not a readable media container" in done.stderr
    assert "notes.mp4" in done.stderr and "duplicate clip id" in done.stderr
    assert "3 video(s) embedded" in done.stderr and "3 skipped" in done.stderr
    with np.load(out, allow_pickle=False) as data:
        assert set(data.files) == NPZ_ARRAYS  # no patches unless asked
        assert np.array_equal(data["audio"], expected.audio.numpy())


def test_nothing_embedded_exits_1_and_writes_nothing(broken_clips, small_checkpoint, tmp_path, caplog):
    out = tmp_path / "none.npz"
    argv = [*map(str, broken_clips), "--ckpt", str(small_checkpoint), "--out", str(out), "--workers", "0"]
    assert embed_main(argv) == 1
    assert not out.exists()
    assert "none of the 2 video(s) could be embedded" in caplog.text


def test_a_bad_checkpoint_is_a_usage_error(synth_clips, tmp_path, capsys):
    missing = tmp_path / "absent.ckpt"
    assert embed_main([str(synth_clips[0]), "--ckpt", str(missing), "--out", str(tmp_path / "x.npz")]) == 2
    assert f"{missing}: no such checkpoint file" in capsys.readouterr().err


def test_parquet_without_pyarrow_says_how_to_install_it_before_any_work(
    synth_clips, small_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import pyarrow` meets when it is not installed
    out = tmp_path / "embeddings.parquet"
    assert embed_main([str(synth_clips[0]), "--ckpt", str(small_checkpoint), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert MISSING_PYARROW in error and "pip install 'avsync[parquet]'" in error
    assert not out.exists()


def test_parquet_holds_one_row_per_clip_with_the_npz_values(inputs, small_checkpoint, expected, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "embeddings.parquet"
    argv = [*inputs, "--ckpt", str(small_checkpoint), "--out", str(out), "--patches", "--batch-size", "2"]
    assert embed_main([*argv, "--workers", "0"]) == 0
    table = pq.read_table(out)
    columns = ["key", "path", "audio", "video", "audio_patches", "video_patches", "frame_times", "duration"]
    assert table.column_names == [*columns, "metadata"]
    assert table.num_rows == 3 and table["key"].to_pylist() == expected.keys
    audio = np.array(table["audio"].to_pylist(), dtype=np.float32)
    assert audio.shape == (3, 16, 32) and np.array_equal(audio, expected.audio.numpy())
    video_patches = np.array(table["video_patches"].to_pylist(), dtype=np.float32)
    assert np.array_equal(video_patches, np.stack([e.video_patches for e in expected.embeddings]))
    assert json.loads(table["metadata"][0].as_py())["frame_times"] == expected.embeddings[0].frame_times
    run = json.loads(table.schema.metadata[PARQUET_METADATA_KEY])
    assert len(run["failures"]) == 3 and run["backbone_config"]["embed_dim"] == 32
