"""Behaviour of the backbone beyond the fixture: shapes, token roles, masking, options, bad input."""

from __future__ import annotations

import pytest
import torch

from avsync.model import CAVMAESync
from avsync.model.masking import mask_from_noise, structure_audio_noise

SMALL = dict(
    image_size=32,
    audio_length=32,
    mel_bins=32,
    embed_dim=32,
    num_heads=2,
    encoder_depth=2,
    decoder_dim=16,
    decoder_depth=1,
    decoder_heads=2,
    num_registers=2,
)


def inputs(batch: int = 3, *lead: int):
    return torch.randn(batch, *lead, 32, 32), torch.randn(batch, *lead, 3, 32, 32)


def test_presets_build_and_describe_the_paper_model():
    vitb = CAVMAESync.from_preset("vitb")
    assert vitb.num_patches == {"audio": 208, "video": 196}
    assert len(vitb.audio_encoder) == 11 and len(vitb.joint.blocks) == 1 and len(vitb.decoder.blocks) == 8
    assert vitb.registers.count == 8 and vitb.global_tokens.enabled
    with pytest.raises(ValueError, match="unknown preset"):
        CAVMAESync.from_preset("vitz")


def test_encode_shapes_and_time_axis_is_only_a_batch_axis():
    model = CAVMAESync(**SMALL).eval()
    audio, video = inputs(2, 4)
    with torch.no_grad():
        clip = model.encode(audio, video)
        flat = model.encode(audio.flatten(0, 1), video.flatten(0, 1))
    assert clip.global_audio.shape == (2, 4, 32) and clip.global_video.shape == (2, 4, 32)
    assert clip.patches_audio.shape == (2, 4, 4, 32) and clip.patches_video.shape == (2, 4, 4, 32)
    assert clip.registers_audio.shape == (2, 4, 2, 32)
    torch.testing.assert_close(clip.global_audio.flatten(0, 1), flat.global_audio)
    torch.testing.assert_close(clip.patches_video.flatten(0, 1), flat.patches_video)


def test_encode_one_modality_alone_matches_the_pair():
    model = CAVMAESync(**SMALL).eval()
    audio, video = inputs()
    with torch.no_grad():
        both = model.encode(audio, video)
        audio_only = model.encode(audio=audio)
    assert audio_only.global_video is None
    torch.testing.assert_close(audio_only.global_audio, both.global_audio)


def test_registers_change_the_features_but_are_not_returned_as_patches():
    model = CAVMAESync(**SMALL).eval()
    audio, video = inputs()
    with torch.no_grad():
        before = model.encode(audio, video).global_audio
        model.registers.audio.add_(torch.randn_like(model.registers.audio))
        after = model.encode(audio, video)
    assert (before - after.global_audio).abs().max() > 1e-3
    assert after.patches_audio.shape[1] == model.num_patches["audio"]


def test_without_global_token_the_summary_is_the_mean_patch():
    model = CAVMAESync(**{**SMALL, "global_token": False, "num_registers": 0}).eval()
    assert not any("global_tokens" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        out = model.encode(*inputs())
    torch.testing.assert_close(out.global_audio, out.patches_audio.mean(dim=1))
    assert out.registers_video.shape[1] == 0


def test_contrastive_heads_sit_between_joint_layer_and_output_norm():
    model = CAVMAESync(**{**SMALL, "contrastive_head_depth": 2}).eval()
    assert len(model.joint.contrastive_heads["audio"]) == 2
    audio, video = inputs()
    with torch.no_grad():
        before = model.encode(audio, video)
        model.joint.contrastive_heads["video"][1].mlp.fc2.bias.add_(torch.randn(32))
        after = model.encode(audio, video)
    torch.testing.assert_close(before.global_audio, after.global_audio)
    assert (before.global_video - after.global_video).abs().max() > 1e-3


def test_pretrain_gradients_reach_every_trainable_part():
    model = CAVMAESync(**SMALL)
    out = model.pretrain_loss(*inputs(4))
    out.loss.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    assert out.recon_audio.shape == (4, 32, 32) and out.recon_video.shape == (4, 3, 32, 32)


def test_noise_decides_the_masking_exactly():
    model = CAVMAESync(**SMALL)
    audio, video = inputs(4)
    noise_a, noise_v = model.draw_noise(4, torch.device("cpu"))
    first = model.pretrain_loss(audio, video, noise_a, noise_v)
    second = model.pretrain_loss(audio, video, noise_a, noise_v)
    assert torch.equal(first.loss, second.loss)
    kept = noise_v.argsort(dim=1)[:, : int(4 * 0.25)]
    assert torch.equal(first.mask_video.gather(1, kept), torch.zeros_like(kept, dtype=torch.float))
    assert first.mask_video.sum(dim=1).tolist() == [3.0] * 4
    third = model.pretrain_loss(audio, video, noise_a.flip(1), noise_v)
    assert not torch.equal(first.mask_audio, third.mask_audio)


def test_unstructured_masking_keeps_the_lowest_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    masking = mask_from_noise(noise, 0.5)
    assert masking.mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert masking.keep.tolist() == [[1, 3]]
    tokens = torch.arange(4.0).reshape(1, 4, 1)
    filled = masking.fill(masking.select(tokens), torch.full((1, 1, 1), -1.0))
    assert filled.flatten().tolist() == [-1.0, 1.0, -1.0, 3.0]


@pytest.mark.parametrize("mode", ["time", "freq", "time_freq"])
def test_structured_audio_masking_removes_whole_columns_or_rows(mode):
    freq, time = 4, 8
    noise = torch.rand(6, freq * time)
    structured = structure_audio_noise(noise, mode, freq, time, ratio=0.75)
    mask = mask_from_noise(structured, 0.75).mask.reshape(6, freq, time)
    if mode == "time":
        assert (mask.all(dim=1).sum(dim=1) == 6).all()  # int(8 * 0.75) whole time columns
    elif mode == "freq":
        assert (mask.all(dim=2).sum(dim=1) == 3).all()
    else:
        assert (mask.all(dim=1).sum(dim=1) >= int(time * 0.75 * 0.7)).all()
        assert (mask.all(dim=2).sum(dim=1) >= int(freq * 0.75 * 0.7)).all()
    assert (mask.flatten(1).sum(dim=1) == 24).all()


def test_audio_mask_mode_is_used_by_the_model():
    model = CAVMAESync(**{**SMALL, "audio_mask_mode": "time", "mask_ratio_audio": 0.5})
    out = model.pretrain_loss(*inputs(2))
    grid = out.mask_audio.reshape(2, 2, 2)  # 2 frequency x 2 time patches
    assert (grid.all(dim=1).sum(dim=1) == 1).all()


def test_bad_shapes_and_settings_get_clear_errors():
    model = CAVMAESync(**SMALL)
    with pytest.raises(ValueError, match=r"audio must be \(\.\.\., 32, 32\)"):
        model.encode(torch.randn(2, 30, 32), torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="video must be"):
        model.pretrain_loss(torch.randn(2, 32, 32), torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="masking noise"):
        model.pretrain_loss(*inputs(2), noise_a=torch.rand(2, 5))
    with pytest.raises(ValueError, match="whole number"):
        CAVMAESync(**{**SMALL, "audio_length": 40})
    with pytest.raises(ValueError, match=r"mask_ratio_video must be a finite number in \[0, 1\), got 1.0"):
        CAVMAESync(**{**SMALL, "mask_ratio_video": 1.0})  # refused when built, not at the first step
    with pytest.raises(ValueError, match="masking mode"):
        CAVMAESync(**{**SMALL, "audio_mask_mode": "diagonal"})
