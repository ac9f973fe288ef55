"""`AVShardDataModule` on real tar shards: the batch contract, SPEC §1's windows, splitting across ranks
and workers, fixed-length resampled epochs, skipped samples, and a real Lightning run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from avsync.data.alignment import window_bounds
from avsync.data.datamodule import AVShardDataModule
from avsync.data.images import encode_jpeg
from avsync.data.pipeline import resolve_shards
from avsync.data.prepare import prepare
from avsync.data.schema import encode_sample, sample_key
from avsync.data.shard_writer import ShardWriter
from avsync.data.skips import LogSkippedSamples
from avsync.data.transforms import AUDIO_MEAN, AUDIO_STD, IMAGENET_MEAN, IMAGENET_STD
from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule

from .conftest import write_shards


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def frame_levels(video: torch.Tensor) -> torch.Tensor:
    """The grey level (0-255) each normalized frame shows; `write_shards` frame `i` is level 16 i."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((video * std + mean) * 255).mean(dim=(-1, -2, -3))


def test_batches_follow_the_contract_in_both_shapes(tmp_path):
    ids = write_shards(tmp_path / "shards", [3, 3], num_classes=3)
    module = AVShardDataModule(
        train_shards=str(tmp_path / "shards"),
        val_shards=str(tmp_path / "shards"),
        batch_size=2,
        eval_batch_size=4,
        num_workers=0,
        image_size=32,
        audio_length=64,
    )
    module.setup("fit")
    assert module.num_classes == 3
    train = next(iter(module.train_dataloader()))
    assert train["audio"].shape == (2, 64, 128) and train["audio"].dtype == torch.float32
    assert train["video"].shape == (2, 3, 32, 32) and train["video"].dtype == torch.float32
    assert train["frame_index"].shape == (2,) and train["frame_index"].dtype == torch.int64
    assert train["label"].shape == (2, 3) and train["label"].dtype == torch.float32
    for key, label in zip(train["key"], train["label"], strict=True):
        assert label.tolist() == [float(i == ids.index(key) % 3) for i in range(3)]

    batches = list(module.val_dataloader())
    assert [len(b["key"]) for b in batches] == [4, 2] and sorted(keys_of(batches)) == ids
    first = batches[0]
    assert first["audio"].shape == (4, 16, 64, 128) and first["video"].shape == (4, 16, 3, 32, 32)
    assert first["label"].shape == (4, 3)
    assert first["frame_index"].tolist() == [list(range(16))] * 4
    torch.testing.assert_close(frame_levels(first["video"][0]), 16.0 * torch.arange(16), atol=2.0, rtol=0)

    single = AVShardDataModule(
        val_shards=str(tmp_path / "shards"),
        eval_batch_size=6,
        num_workers=0,
        image_size=32,
        audio_length=64,
        label_format="index",
    )
    single.setup("validate")
    batch = next(iter(single.val_dataloader()))
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [
        ids.index(k) % 3 for k in batch["key"]
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_frames_normalized_batch_wise_equal_each_frame_normalized_on_its_own(tmp_path, workers):
    """Batches normalize uint8 pixels in `collate` (into shared memory in a worker process); every
    frame must still be exactly its own `frames_to_tensor`, in layout and value (noise frames, so a
    transposed or misplaced frame shows)."""
    from avsync.data.transforms import CenterFrame, frames_to_tensor

    rng = np.random.default_rng(0)
    clips = {}
    (tmp_path / "shards").mkdir()
    writer = ShardWriter(tmp_path / "shards", 0, max_bytes=None, max_clips=None)
    for clip in range(3):
        frames = [encode_jpeg(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)) for _ in range(16)]
        clip_id = f"clip.{clip}"
        metadata = {"id": clip_id, "num_frames": 16, "labels": [0]}
        writer.write(encode_sample(sample_key(clip_id), frames, np.zeros((300, 128), np.float16), metadata))
        clips[clip_id] = frames_to_tensor([CenterFrame(32)(Image.open(io.BytesIO(f))) for f in frames])
    writer.finish()
    module = AVShardDataModule(
        train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), batch_size=3,
        eval_batch_size=2, num_workers=workers, image_size=32, audio_length=64, num_classes=1,
        random_resized_crop=False, horizontal_flip=False,
    )  # fmt: skip
    module.setup("fit")
    seen = 0
    for batch in module.val_dataloader():
        for key, video in zip(batch["key"], batch["video"], strict=True):
            assert torch.equal(video, clips[key]), key
            seen += 1
    train = next(iter(module.train_dataloader()))
    for key, index, video in zip(train["key"], train["frame_index"], train["video"], strict=True):
        assert torch.equal(video, clips[key][index]), key
    assert seen == 3 and len(train["key"]) == 3


def expected_rows(mode: str, frame: int, length: int, window: int) -> list[float]:
    """Raw spectrogram values a window must hold when row `t` of the clip's spectrogram is all `t`.
    Padding: `clip` fills with the dataset mean, `authors` cuts/zero-pads to 1024 rows first."""
    if mode == "authors":
        start, end = window_bounds(frame, 16, 1024, window)
        return [float(t) if t < length else 0.0 for t in range(start, end)]
    start = round(frame * length / 16) - window // 2
    return [float(t) if 0 <= t < length else AUDIO_MEAN for t in range(start, start + window)]


@pytest.mark.parametrize("mode", ["clip", "authors"])
def test_every_window_is_cut_where_SPECs_formula_puts_it(tmp_path, mode):
    lengths = [300, 999, 1100]  # shorter than a 10-s clip, a 10-s clip, longer than the authors' 1024
    ids = write_shards(tmp_path / "shards", [3], fbank_frames=lengths)
    window = 416
    module = AVShardDataModule(
        train_shards=str(tmp_path / "shards"),
        val_shards=str(tmp_path / "shards"),
        batch_size=3,
        eval_batch_size=3,
        num_workers=0,
        image_size=32,
        audio_length=window,
        alignment=mode,
        shuffle_buffer=1,
    )
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    for b, key in enumerate(batch["key"]):
        raw = batch["audio"][b] * AUDIO_STD + AUDIO_MEAN  # (16, L, 128)
        assert torch.equal(raw[..., :1].expand_as(raw), raw)  # every mel bin of a row holds the row value
        for frame in range(16):
            expected = torch.tensor(expected_rows(mode, frame, lengths[ids.index(key)], window))
            torch.testing.assert_close(raw[frame, :, 0], expected, atol=1e-3, rtol=0)

    seen = set()
    for _ in range(6):  # training: one random frame per clip, its picture and its window agree
        batch = next(iter(module.train_dataloader()))
        for b, key in enumerate(batch["key"]):
            frame = int(batch["frame_index"][b])
            seen.add(frame)
            assert abs(float(frame_levels(batch["video"][b])) - 16 * frame) < 2
            expected = torch.tensor(expected_rows(mode, frame, lengths[ids.index(key)], window))
            torch.testing.assert_close(
                batch["audio"][b, :, 0] * AUDIO_STD + AUDIO_MEAN, expected, atol=1e-3, rtol=0
            )
    assert len(seen) > 3


@pytest.mark.parametrize("split", ["val", "train"])
def test_two_ranks_with_two_workers_read_disjoint_samples_that_cover_the_set(tmp_path, split):
    ids = write_shards(tmp_path / "shards", [3] * 7 + [2])
    spec = str(tmp_path / "shards")
    module = AVShardDataModule(
        train_shards=spec,
        val_shards=spec,
        batch_size=1,
        eval_batch_size=2,
        num_workers=2,
        image_size=32,
        audio_length=64,
        shuffle_buffer=5,
    )
    module.setup()
    seen = {}
    for rank in range(2):
        pipeline = module.pipeline(split, rank=rank, world_size=2)
        loader = DataLoader(pipeline, batch_size=None, num_workers=2)
        batches = list(loader)
        seen[rank] = keys_of(batches)
        if split == "val":
            assert len(loader) == len(batches)  # the reported length is exact
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ids)


def test_resampled_epochs_have_the_same_number_of_batches_on_every_rank(tmp_path):
    write_shards(tmp_path / "shards", [3, 3, 2])
    module = AVShardDataModule(
        train_shards=str(tmp_path / "shards"),
        batch_size=2,
        num_workers=2,
        image_size=32,
        audio_length=64,
        resampled=True,
        epoch_length=10,
        shuffle_buffer=4,
    )
    module.setup()
    for rank in range(2):
        loader = DataLoader(module.pipeline("train", rank=rank, world_size=2), batch_size=None, num_workers=2)
        assert len(loader) == 6  # ceil(10 / (2 per batch x 2 workers)) batches per worker, x 2 workers
        for _ in range(2):  # two epochs
            batches = list(loader)
            assert len(batches) == 6 and all(len(b["key"]) == 2 for b in batches)


def test_corrupt_samples_are_skipped_and_counted_across_worker_processes(tmp_path):
    directory = tmp_path / "shards"
    ids = write_shards(directory, [2, 2])
    frames = [np.full((32, 40, 3), 16 * i, np.uint8) for i in range(16)]
    from avsync.data.images import encode_jpeg

    jpegs = [encode_jpeg(frame) for frame in frames]
    fbank = np.zeros((300, 128), np.float16)
    writer = ShardWriter(directory, 2, max_bytes=None, max_clips=None)
    broken_image = encode_sample(
        sample_key("bad.image"),
        jpegs[:5] + [b"not a jpeg"] + jpegs[6:],
        fbank,
        {"id": "bad.image", "num_frames": 16, "labels": []},
    )
    broken_audio = encode_sample(
        sample_key("bad.audio"), jpegs, fbank, {"id": "bad.audio", "num_frames": 16, "labels": []}
    )
    broken_audio["fbank.npy"] = b"\x93NUMPY garbage"
    writer.write(broken_image)
    writer.write(broken_audio)
    record = writer.finish()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"].append(
        {"name": record.name, "clips": record.clips, "bytes": record.bytes, "sha256": record.sha256}
    )
    (directory / "manifest.json").write_text(json.dumps(manifest))

    module = AVShardDataModule(
        val_shards=str(directory), eval_batch_size=2, num_workers=2, image_size=32, audio_length=64
    )
    module.setup("validate")
    loader = DataLoader(module.pipeline("val"), batch_size=None, num_workers=2)
    assert sorted(keys_of(loader)) == ids
    assert module.skipped_samples == {"val": 2}  # counted in the workers, read in this process
    assert sorted(keys_of(loader)) == ids  # a second epoch counts again
    assert module.skipped_samples == {"val": 4}


def test_shard_specifications_name_the_same_shards(tmp_path):
    write_shards(tmp_path / "a", [2, 3])
    directory = resolve_shards(str(tmp_path / "a"))
    assert [Path(u).name for u in directory.urls] == ["shard-000000.tar", "shard-000001.tar"]
    assert directory.clips_per_shard == [2, 3] and directory.manifest["num_classes"] == 3
    for spec in [
        f"{tmp_path}/a/shard-*.tar",
        f"{tmp_path}/a/shard-{{000000..000001}}.tar",
        f"{tmp_path}/a/manifest.json",
    ]:
        resolved = resolve_shards(spec)
        assert resolved.urls == directory.urls and resolved.clips_per_shard == [2, 3]
    write_shards(tmp_path / "b", [4])
    both = resolve_shards(f"{tmp_path}/a::{tmp_path}/b")
    assert both.clips_per_shard == [2, 3, 4] and len(both.urls) == 3
    with pytest.raises(FileNotFoundError, match="no shards"):
        resolve_shards(f"{tmp_path}/missing-*.tar")


def test_real_clips_give_vitb_sized_eval_batches(real_clips_dir, tmp_path):
    prepare([real_clips_dir], tmp_path / "shards", workers=1, progress=False)
    module = AVShardDataModule(
        val_shards=str(tmp_path / "shards"),
        eval_batch_size=2,
        num_workers=0,
        image_size=224,
        audio_length=416,
    )
    module.setup("validate")
    batch = next(iter(module.val_dataloader()))
    assert batch["audio"].shape == (2, 16, 416, 128) and batch["video"].shape == (2, 16, 3, 224, 224)
    assert sorted(batch["key"]) == ["00W1lcxW-WU_40.000", "KlsG1EnBEjc_000361"]
    # Frame 0's window is centred on spectrogram row 0: its first 208 rows lie before the clip (mean = 0).
    assert (
        torch.count_nonzero(batch["audio"][:, 0, :208]) == 0
        and torch.count_nonzero(batch["audio"][:, 0, 208:]) > 0
    )
    assert batch["label"].shape == (2, 0)


def test_a_lightning_run_takes_sizes_from_the_model_and_logs_skips(tmp_path):
    write_shards(tmp_path / "shards", [4, 4], image_size=(120, 100))
    module = PretrainModule(
        backbone=CAVMAESync.from_preset("tiny"), log_images_every_n_steps=0, warmup_epochs=0
    )
    data = AVShardDataModule(
        train_shards=str(tmp_path / "shards"),
        val_shards=str(tmp_path / "shards"),
        batch_size=2,
        eval_batch_size=4,
        num_workers=0,
        resampled=True,
        epoch_length=4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LogSkippedSamples()],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    assert (data.image_size, data.audio_length) == (96, 192)
    assert trainer.num_training_batches == 2 and trainer.global_step == 2
    assert trainer.callback_metrics["data/skipped_train"] == 0
    assert trainer.callback_metrics["data/skipped_val"] == 0


@pytest.mark.parametrize("size", [(398, 224), (224, 398), (224, 224), (301, 224)])
def test_frames_stored_at_the_model_side_are_cropped_exactly_as_torchvision_resizes_and_crops(size):
    """Frames stored with a 224 short side (the `prepare` default) skip resampling; the pixels must
    still be torchvision's `Resize(224, bicubic)` + `CenterCrop(224)`, bit for bit."""
    from torchvision.transforms import InterpolationMode, v2

    from avsync.data.transforms import CenterFrame

    rng = np.random.default_rng(sum(size))
    frame = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = v2.Compose([v2.Resize(224, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(224)])
    assert np.array_equal(np.asarray(CenterFrame(224)(frame)), np.asarray(reference(frame)))


def test_one_pass_frame_geometry_equals_torchvisions_resize_crop_and_normalize(real_clips_dir):
    """The fast transforms compute what torchvision's would, on a real 720p frame."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2

    from avsync.data.transforms import CenterFrame, RandomFrame, frames_to_tensor

    with av.open(str(real_clips_dir / "KlsG1EnBEjc_000361.mp4")) as container:
        frame = next(container.decode(video=0)).to_image().resize((455, 256), Image.Resampling.BICUBIC)
    reference = v2.Compose(
        [
            v2.Resize(224, interpolation=InterpolationMode.BICUBIC),
            v2.CenterCrop(224),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ours = frames_to_tensor([CenterFrame(224)(frame)])[0]
    one_level = 1 / 255 / min(IMAGENET_STD)
    assert (ours - reference(frame)).abs().max() <= one_level + 1e-6
    assert (ours - reference(frame)).abs().mean() < 0.01 * one_level

    torch.manual_seed(3)
    crop = RandomResizedCrop(
        224, scale=(0.08, 1.0), ratio=(0.9, 1.1), interpolation=InterpolationMode.BICUBIC
    )(frame)
    torch.manual_seed(3)
    ours = RandomFrame(224, horizontal_flip=False)(frame)
    assert np.array_equal(np.asarray(ours), np.asarray(crop))
