"""`avsync index build` / `avsync index search` on real `avsync embed` outputs: an `--shards` directory and
the npz of the two real clips, queried by clip id, by video file and by audio file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avsync.api.outputs import read_shard_embeddings
from avsync.checkpoints import save_backbone
from avsync.cli import main
from avsync.data.audio import decode_audio
from avsync.data.media import open_media
from avsync.evaluation.similarity import similarity
from avsync.model import CAVMAESync
from tests.api.conftest import SMALL
from tests.api.test_embed_shards import checkpoint, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def embed_main(argv: list[str]) -> int:
    """`avsync embed ARGV`, as the command runs it."""
    return main(["embed", *argv])


def same_results(found: dict, expected: dict) -> None:
    assert [r["clip"] for r in found["results"]] == [r["clip"] for r in expected["results"]]
    np.testing.assert_allclose(
        [r["score"] for r in found["results"]], [r["score"] for r in expected["results"]], atol=1e-5
    )


def search(capsys, *argv: str) -> dict:
    assert main(["index", "search", *map(str, argv), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def ranking(queries: np.ndarray, gallery: np.ndarray, ids: list[str], k: int) -> list[tuple[str, float]]:
    scores = similarity(torch.from_numpy(queries[None]).float(), torch.from_numpy(gallery).float())[0]
    order = torch.argsort(scores, descending=True)[:k]
    return [(ids[i], float(scores[i])) for i in order]


@pytest.fixture(scope="module")
def shard_embeddings(tmp_path_factory):
    """A finished `avsync embed --shards` run: 9 clips in 3 float16 parts, 4 pairs per clip."""
    root = tmp_path_factory.mktemp("collection")
    write_shards(root / "shards", [5, 3, 1], repeat="clip001")
    ckpt = checkpoint(root / "model.safetensors")
    argv = ["--shards", str(root / "shards"), "--ckpt", str(ckpt), "--out", str(root / "embeddings")]
    argv += [
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--num-frames",
        "4",
        "--clips-per-part",
        "3",
    ]
    argv += ["--no-progress"]
    assert embed_main(argv) == 0
    return root / "embeddings"


def test_an_index_of_embed_shards_output_ranks_as_brute_force(shard_embeddings, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", str(shard_embeddings), "--out", str(out), "--kind", "exact"]) == 0
    assert "exact index of 9 clips x 4 x 32" in capsys.readouterr().err
    stored = read_shard_embeddings(shard_embeddings)
    ids = stored["keys"].tolist()
    assert np.load(out / "ids.npy").tolist() == ids
    facts = json.loads((out / "index.json").read_text())
    assert facts["source"]["kind"] == "embed --shards" and len(facts["source"]["files"]) == 3
    assert facts["model"]["checkpoint"].endswith("model.safetensors") and facts["model"]["num_frames"] == 4
    for modality, target in (("audio", "video"), ("video", "audio")):
        found = search(capsys, out, "--clip", "clip004", "--modality", modality, "--top-k", "5")
        assert found["direction"] == f"{modality}_to_{target}" and found["exact_scores"]
        truth = ranking(stored[modality][ids.index("clip004")], stored[target], ids, 5)
        assert [r["clip"] for r in found["results"]] == [clip for clip, _ in truth]
        np.testing.assert_allclose([r["score"] for r in found["results"]], [s for _, s in truth], atol=1e-5)


def test_a_clip_embedded_by_two_ranks_is_indexed_once(shard_embeddings, tmp_path, capsys):
    copy = tmp_path / "embeddings"
    shutil.copytree(shard_embeddings, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shutil.copy(copy / "embeddings-rank0-00001.npz", copy / "embeddings-rank1-00000.npz")  # a second rank's
    manifest["parts"].append({"name": "embeddings-rank1-00000.npz", "clips": 3})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["index", "build", str(copy), "--out", str(tmp_path / "index"), "--kind", "exact"]) == 0
    assert (
        np.load(tmp_path / "index" / "ids.npy").tolist()
        == read_shard_embeddings(shard_embeddings)["keys"].tolist()
    )


@pytest.fixture(scope="module")
def clip_index(real_embeddings, tmp_path_factory):
    out = tmp_path_factory.mktemp("clips") / "index"
    assert (
        main(["index", "build", str(real_embeddings), "--out", str(out), "--kind", "exact", "--quiet"]) == 0
    )
    return out


def test_video_and_audio_files_are_queries_embedded_as_the_gallery_was(
    clip_index, real_embeddings, real_clips, tmp_path, capsys
):
    stored = np.load(real_embeddings)
    ids = stored["keys"].tolist()
    video_file = real_clips[0]
    clip = ids[0]
    assert clip == video_file.stem
    for modality in ("video", "audio"):
        by_id = search(capsys, clip_index, "--clip", clip, "--modality", modality)
        by_file = search(capsys, clip_index, "--video", video_file, "--modality", modality)
        assert by_file["query"] == {"video": str(video_file), "modality": modality}
        same_results(by_file, by_id)  # the file embeds to the tokens stored
        truth = ranking(stored[modality][0], stored["video" if modality == "audio" else "audio"], ids, 2)
        assert [r["clip"] for r in by_id["results"]] == [c for c, _ in truth]
        np.testing.assert_allclose([r["score"] for r in by_id["results"]], [s for _, s in truth], atol=1e-5)

    # its soundtrack as an audio file: the mp4 itself, and a float WAV of the decoded 16-kHz track
    by_id = search(capsys, clip_index, "--clip", clip, "--modality", "audio")
    same_results(search(capsys, clip_index, "--audio", video_file), by_id)
    with open_media(video_file) as container:
        samples = decode_audio(container, video_file).samples
    wav = tmp_path / "soundtrack.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    same_results(search(capsys, clip_index, "--audio", wav), by_id)


def test_the_text_output_names_the_direction_and_the_clips(clip_index, real_clips, capsys):
    assert main(["index", "search", str(clip_index), "--clip", real_clips[1].stem, "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        f"# video of {real_clips[1].stem} -> audio gallery of {clip_index} (exact, 2 clips)"
    )
    assert lines[1].split() == ["rank", "score", "clip"] and lines[2].split()[0] == "1" and len(lines) == 3


def test_bad_inputs_exit_2_naming_the_file_and_the_problem(clip_index, real_clips, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert main(["index", *map(str, argv)]) == 2
        return capsys.readouterr().err

    err = fails("search", tmp_path / "missing", "--clip", "x")
    assert f"avsync index: error: {tmp_path / 'missing'}: not an index (no such directory)" in err
    assert "no clip 'nope' among its 2 clips" in fails("search", clip_index, "--clip", "nope")
    torch.manual_seed(0)
    wider = save_backbone(CAVMAESync(**{**SMALL, "embed_dim": 48}).eval(), tmp_path / "wider.safetensors")
    err = fails("search", clip_index, "--video", real_clips[0], "--ckpt", wider)
    assert "dimension mismatch: the model embeds 48 dimensions, the index" in err and "holds 32" in err
    err = fails("search", clip_index, "--audio", tmp_path / "none.wav")
    assert f"{tmp_path / 'none.wav'}: no such file" in err
    assert "an audio file is an audio query" in fails(
        "search", clip_index, "--audio", real_clips[0], "--modality", "video"
    )
    (tmp_path / "bare").mkdir()
    assert "bare: no manifest.json" in fails("build", tmp_path / "bare", "--out", tmp_path / "i")
    err = fails("build", real_clips[0], "--out", tmp_path / "i")
    assert f"{real_clips[0]}: not an npz file" in err
    broken = tmp_path / "broken"
    shutil.copytree(clip_index, broken)
    (broken / "audio.faiss").write_bytes(b"not faiss")
    assert "audio.faiss: not a readable FAISS index" in fails("search", broken, "--clip", real_clips[0].stem)


@pytest.mark.parametrize("args", [["--help"], ["build", "--help"], ["search", "--help"], ["search", "idx"]])
def test_help_and_usage_errors_come_back_without_importing_torch(args):
    probe = (
        "import sys\nfrom avsync.cli import main\n"
        f"try:\n    code = main(['index', *{args!r}])\nexcept SystemExit as stop:\n    code = stop.code\n"
        "print('torch' in sys.modules, code)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    imported, code = result.stdout.split()[-2:]
    assert imported == "False" and int(code) == (0 if "--help" in args else 2)
    assert "one of the arguments --clip --audio --video is required" in result.stderr or "--help" in args


def test_a_search_by_clip_id_imports_no_torch(clip_index, real_clips):
    probe = (
        "import sys\nfrom avsync.cli import main\n"
        f"code = main(['index', 'search', {str(clip_index)!r}, '--clip', {real_clips[0].stem!r}])\n"
        "print('torch' in sys.modules, code)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split()[-2:] == ["False", "0"], result.stderr[-2000:]
