"""`avsync embed --shards`: a Trainer.predict over real shards through the prediction writer, float16 parts
per rank, resuming, deduplication by clip id, and the same embeddings from 2 gloo processes as from one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.api.outputs import read_shard_embeddings
from avsync.checkpoints import save_backbone
from avsync.cli import main as avsync_main
from avsync.data.datamodule import AVShardDataModule
from avsync.model import CAVMAESync
from tests.api.conftest import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES = 4
ROOT = Path(__file__).resolve().parents[2]


def embed_main(argv: list[str]) -> int:
    """`avsync embed ARGV`, as the command runs it."""
    return avsync_main(["embed", *argv])


def write_shards(directory: Path, sizes: list[int], repeat: str | None = None) -> list[str]:
    """Shards of `avsync prepare`'s layout, shard `s` holding `sizes[s]` clips (frames and spectrogram
    set by the clip's number); `repeat`: a clip id also written at the start of the second shard."""
    from avsync.data.images import encode_jpeg
    from avsync.data.schema import SCHEMA_VERSION, encode_sample, sample_key
    from avsync.data.shard_writer import ShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    ids, records, clip = [], [], 0
    for index, size in enumerate(sizes):
        writer = ShardWriter(directory, index, max_bytes=None, max_clips=None)
        names = [f"clip{clip + i:03d}" for i in range(size)]
        clip += size
        if repeat is not None and index == 1:
            names = [repeat, *names]
        for name in names:
            number = int(name[4:])
            rng = np.random.default_rng(number)
            frames = [encode_jpeg(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)) for _ in range(16)]
            fbank = rng.normal(size=(150, 128)).astype(np.float32)
            metadata = {"id": name, "num_frames": 16, "labels": [number % 2], "fbank_frames": 150}
            writer.write(encode_sample(sample_key(name), frames, fbank, metadata))
        ids += [name for name in names if name not in ids]
        records.append(writer.finish())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": 2,
        "classes": [{"index": i, "mid": f"c{i}", "name": f"class {i}"} for i in range(2)],
        "preprocessing": {"num_frames": 16},
        "shards": [{"name": r.name, "clips": r.clips, "bytes": r.bytes, "sha256": r.sha256} for r in records],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return ids


def checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_backbone(CAVMAESync(**SMALL).eval(), path)


def embed(shards, ckpt: Path, out: Path, *extra: str) -> int:
    return embed_main(
        ["--shards", str(shards), "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--workers", "0",
         "--batch-size", "2", "--num-frames", str(FRAMES), "--no-progress", *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    ids = write_shards(root / "shards", [5, 3, 1], repeat="clip001")
    return root, ids, checkpoint(root / "model.safetensors")


def expected(shards: Path, ckpt: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each clip's global tokens straight from the backbone, on the shard reader's evaluation batches."""
    from avsync.checkpoints import load_backbone

    backbone = load_backbone(ckpt).eval()
    data = AVShardDataModule(
        predict_shards=str(shards), eval_batch_size=3, num_workers=0, num_frames=FRAMES,
        image_size=32, audio_length=32,
    )  # fmt: skip
    out = {}
    with torch.no_grad():
        for batch in data.pipeline("predict", rank=0, world_size=1):
            encoded = backbone.encode(batch["audio"], batch["video"])
            for i, key in enumerate(batch["key"]):
                out.setdefault(key, (encoded.global_audio[i], encoded.global_video[i]))
    return out


def test_shards_are_embedded_once_each_into_float16_parts_of_the_backbone_tokens(collection, tmp_path):
    root, ids, ckpt = collection
    assert embed(root / "shards", ckpt, tmp_path / "out", "--clips-per-part", "3") == 0
    parts = sorted(p.name for p in (tmp_path / "out").glob("*.npz"))
    assert parts == [f"embeddings-rank0-{i:05d}.npz" for i in range(3)]  # 9 unique clips, 3 per part
    rows = [np.load(tmp_path / "out" / name)["keys"].tolist() for name in parts]
    assert sorted(key for part in rows for key in part) == sorted(ids)  # the repeat is written once
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_clips"] == 9 and manifest["repeated_clips"] == 0 and manifest["dtype"] == "float16"

    got = read_shard_embeddings(tmp_path / "out")
    assert got["audio"].dtype == np.float16 and got["audio"].shape == (9, FRAMES, 32)
    truth = expected(root / "shards", ckpt)
    for i, key in enumerate(got["keys"]):
        audio, video = truth[key]
        torch.testing.assert_close(torch.from_numpy(got["audio"][i]).float(), audio, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(got["video"][i]).float(), video, atol=2e-3, rtol=2e-3)


def test_a_rerun_embeds_only_clips_not_yet_written_and_adopts_unindexed_parts(collection, tmp_path):
    root, ids, ckpt = collection
    out = tmp_path / "out"
    first_two = str(root / "shards" / "shard-{000000..000001}.tar")
    assert embed(first_two, ckpt, out) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["num_clips"] == 8 and first["last_run"]["embedded"] == 8
    before = {p.name: p.read_bytes() for p in out.glob("*.npz")}

    assert embed(root / "shards", ckpt, out) == 0  # the collection grew by a shard
    second = json.loads((out / "manifest.json").read_text())
    assert second["last_run"] == {
        "world_size": 1, "embedded": 1, "already_written": 8, "skipped_samples": 0,
    }  # fmt: skip
    assert all((out / name).read_bytes() == data for name, data in before.items())  # parts never rewritten
    assert sorted(read_shard_embeddings(out)["keys"].tolist()) == sorted(ids)

    (out / "index-rank0.json").unlink()  # a crash after a part was renamed, before its index was
    assert embed(root / "shards", ckpt, out) == 0
    assert json.loads((out / "manifest.json").read_text())["last_run"]["embedded"] == 0

    other = checkpoint(tmp_path / "other.safetensors", seed=1)
    assert embed(root / "shards", other, out) == 2  # another model's embeddings are not mixed in


def test_bad_requests_are_usage_errors(collection, tmp_path, capsys):
    root, _, ckpt = collection
    assert embed(root / "shards", ckpt, tmp_path / "out", "--patches") == 2
    assert "--shards does not go with patches" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert embed(tmp_path / "bare", ckpt, tmp_path / "out") == 2
    assert "neither a manifest.json nor .tar shards" in capsys.readouterr().err
    assert embed_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz")]) == 2


def test_two_gloo_processes_give_the_embeddings_of_one(collection, tmp_path):
    root, ids, ckpt = collection
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "avsync.cli", "embed", "--shards", str(root / "shards"),
        "--ckpt", str(ckpt), "--out", str(tmp_path / "ddp"), "--device", "cpu", "--devices", "2",
        "--workers", "0", "--batch-size", "2", "--num-frames", str(FRAMES), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted(p.name for p in (tmp_path / "ddp").glob("*.npz"))
    assert parts == ["embeddings-rank0-00000.npz", "embeddings-rank1-00000.npz"]
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    # rank 0 reads shards 0 and 2 (6 clips), rank 1 shard 1 (clip001 again, and 3 more): one repeat
    assert manifest["last_run"]["world_size"] == 2 and manifest["repeated_clips"] == 1
    assert manifest["num_clips"] == 9

    assert embed(root / "shards", ckpt, tmp_path / "one") == 0
    two, one = read_shard_embeddings(tmp_path / "ddp"), read_shard_embeddings(tmp_path / "one")
    assert sorted(two["keys"].tolist()) == sorted(one["keys"].tolist()) == sorted(ids)
    order_two, order_one = np.argsort(two["keys"]), np.argsort(one["keys"])
    for name in ("audio", "video"):
        torch.testing.assert_close(
            torch.from_numpy(two[name][order_two]).float(),
            torch.from_numpy(one[name][order_one]).float(),
            atol=1e-3,
            rtol=1e-3,
        )
