"""`AVSyncModel`: embeddings of tensors and of real video files, batching, failures, devices, precision."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image

from avsync.api import load
from avsync.checkpoints import load_backbone
from avsync.data.clip import extract_video_clip
from avsync.data.datamodule import AVShardDataModule
from avsync.data.errors import DecodeError
from avsync.data.prepare import prepare
from avsync.data.transforms import AudioWindows, CenterFrame, frames_to_tensor


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return load(small_checkpoint, device="cpu")


def test_embed_video_is_encode_of_the_clip_decoded_independently(model, small_checkpoint, real_clips):
    path = real_clips[1]  # 1280x720 at 29.97 fps, stereo AAC
    clip = model.embed_video(path, patches=True)

    decoded = extract_video_clip(path)

    def frame(jpeg: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(jpeg))
        image.draft("RGB", (32, 32))  # the shard reader's free JPEG downscaling
        return CenterFrame(32)(image.convert("RGB"))

    video = frames_to_tensor([frame(jpeg) for jpeg in decoded.frames])
    audio = AudioWindows(16, 32, "clip").windows(torch.from_numpy(decoded.fbank).float())
    with torch.no_grad():
        expected = load_backbone(small_checkpoint).encode(audio[None], video[None])
    assert clip.audio.shape == (16, 32) and clip.video.shape == (16, 32)
    assert clip.audio_patches.shape == (16, 16, 32) and clip.video_patches.shape == (16, 4, 32)
    assert torch.equal(clip.audio, expected.global_audio[0])
    assert torch.equal(clip.video, expected.global_video[0])
    assert torch.equal(clip.audio_patches, expected.patches_audio[0])
    assert torch.equal(clip.video_patches, expected.patches_video[0])
    assert clip.key == "KlsG1EnBEjc_000361" and clip.path == str(path)
    assert clip.frame_times == decoded.metadata["frame_times"] and len(clip.frame_times) == 16
    assert clip.metadata["duration"] == pytest.approx(10.0, abs=0.1)


def test_embedding_a_video_matches_embedding_its_prepared_shard(model, synth_clips, tmp_path):
    prepare([synth_clips[0].parent], tmp_path / "shards", workers=1, shuffle_seed=None, progress=False)
    data = AVShardDataModule(
        test_shards=str(tmp_path / "shards"), eval_batch_size=3, num_workers=0, image_size=32, audio_length=32
    )
    data.setup("test")
    (batch,) = list(data.test_dataloader())
    shard = model.embed(batch["audio"], batch["video"])
    run = model.embed_videos(synth_clips, batch_size=3)
    assert run.keys == batch["key"] == [p.stem for p in synth_clips]
    assert torch.equal(run.audio, shard.audio) and torch.equal(run.video, shard.video)


def test_embed_takes_one_clip_or_a_batch_and_either_modality(model):
    audio, video = torch.randn(2, 5, 32, 128), torch.randn(2, 5, 3, 32, 32)
    batch = model.embed(audio, video)
    assert batch.audio.shape == (2, 5, 32) and batch.video.shape == (2, 5, 32)
    assert batch.audio.dtype == torch.float32 and batch.audio_patches is None and batch.video_patches is None
    one = model.embed(audio[1], video[1], patches=True)
    assert one.audio.shape == (5, 32) and one.video_patches.shape == (5, 4, 32)
    torch.testing.assert_close(one.audio, batch.audio[1])
    torch.testing.assert_close(one.video, batch.video[1])
    alone = model.embed(video=video[1])
    assert alone.audio is None
    torch.testing.assert_close(alone.video, one.video)
    with pytest.raises(ValueError, match=r"audio must be \(\.\.\., 32, 128\)"):
        model.embed(torch.randn(5, 40, 128))


def test_embed_videos_skips_what_cannot_be_read_and_embeds_the_rest(model, synth_clips, broken_clips, caplog):
    truncated, not_video = broken_clips
    paths = [synth_clips[0], truncated, synth_clips[1], not_video, synth_clips[2]]
    with caplog.at_level(logging.WARNING, logger="avsync.api"):
        run = model.embed_videos(paths, batch_size=2)
    assert run.keys == [p.stem for p in synth_clips]
    assert [f.path for f in run.failures] == [str(truncated), str(not_video)]
    assert all(f.reason for f in run.failures)
    assert f"skipped {truncated}" in caplog.text and f"skipped {not_video}" in caplog.text
    assert run.audio.shape == (3, 16, 32) and torch.isfinite(run.audio).all()
    for embedding, path in zip(run.embeddings, synth_clips, strict=True):
        alone = model.embed_video(path)
        torch.testing.assert_close(embedding.audio, alone.audio)
        torch.testing.assert_close(embedding.video, alone.video)
    in_workers = model.embed_videos(paths, batch_size=2, num_workers=2)
    assert in_workers.keys == run.keys and in_workers.failures == run.failures
    assert torch.equal(in_workers.audio, run.audio) and torch.equal(in_workers.video, run.video)


def test_one_unreadable_video_raises_an_error_naming_it(model, broken_clips):
    with pytest.raises(DecodeError, match="truncated.mp4"):
        model.embed_video(broken_clips[0])


def test_device_and_precision_choices(small_checkpoint):
    with pytest.raises(ValueError, match="precision must be one of"):
        load(small_checkpoint, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(small_checkpoint, device="cuda")
        assert load(small_checkpoint).device.type == "cpu"


def test_bf16_autocast_runs_in_bf16_and_returns_float32(model, small_checkpoint):
    half = load(small_checkpoint, device="cpu", precision="bf16")
    audio, video = torch.randn(3, 32, 128), torch.randn(3, 3, 32, 32)
    full, reduced = model.embed(audio, video), half.embed(audio, video)
    assert reduced.audio.dtype == torch.float32
    assert not torch.equal(reduced.audio, full.audio)  # bf16 was really used
    similarity = torch.nn.functional.cosine_similarity(reduced.audio, full.audio, dim=-1)
    assert (similarity > 0.99).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_default_is_bf16_and_results_agree_with_the_cpu(model, small_checkpoint, synth_clips):
    gpu = load(small_checkpoint)
    assert gpu.device.type == "cuda" and gpu.precision == "bf16"
    on_gpu, on_cpu = gpu.embed_video(synth_clips[0]), model.embed_video(synth_clips[0])
    assert on_gpu.audio.device.type == "cpu" and on_gpu.audio.dtype == torch.float32
    similarity = torch.nn.functional.cosine_similarity(on_gpu.video, on_cpu.video, dim=-1)
    assert (similarity > 0.99).all()
