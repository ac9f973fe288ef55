"""Benchmark 2: feature extraction, clips/s at `T` = 16 frame / audio-window pairs per clip, in bf16.

Through the embedding API (`AVSyncModel.embed`), which runs `CAVMAESync.encode`: only the passes a
task needs - the modality encoders and the per-modality joint passes, no decoder, no fused joint pass,
and only the modalities given (`audio` or `video` alone for one-modality tasks).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from avsync.api.model import AVSyncModel
from benchmarks.harness import interleaved_medians, peak_rss_mib, time_runs
from benchmarks.pretrain import reference_kernels
from avsync.model import CAVMAESync

MODES = ("audio_and_video", "audio", "video")


def feature_extraction(
    preset: str = "vitb",
    clips: int = 2,
    frames: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    precision: str = "bf16",
    modes: tuple[str, ...] = MODES,
    device: str = "cpu",
    compare_sdpa: bool = True,
) -> dict:
    """Clips/s per mode; `compare_sdpa`: also the audio-and-video pass with SDPA attention instead of
    the explicit one avsync picks on CPU in bf16, interleaved with it (the effect of that choice)."""
    torch.manual_seed(0)
    model = AVSyncModel(CAVMAESync.from_preset(preset), device, precision)
    backbone = model.backbone
    audio = torch.randn(clips, frames, backbone.audio_length, backbone.mel_bins)
    video = torch.randn(clips, frames, 3, backbone.image_size, backbone.image_size)
    inputs = {"audio_and_video": (audio, video), "audio": (audio, None), "video": (None, video)}
    result: dict = {
        "preset": preset,
        "clips_per_call": clips,
        "pairs_per_clip": frames,
        "precision": precision,
    }
    for mode in modes:
        given_audio, given_video = inputs[mode]

        def embed(a=given_audio, v=given_video):
            out = model.embed(a, v)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            return out

        with FlopCounterMode(display=False) as counter:
            embed()
        timing = time_runs(embed, repeats, warmup)
        result[mode] = {
            "clips_per_s": round(clips / timing.median, 3),
            "gflop_per_clip": round(counter.get_total_flops() / clips / 1e9, 1),
            "achieved_gflop_per_s": round(counter.get_total_flops() / timing.median / 1e9, 1),
            **timing.as_dict(),
        }
    if compare_sdpa and model.device.type == "cpu":
        timings = interleaved_medians(
            {"sdpa": lambda: _with_sdpa(model, audio, video), "avsync": lambda: model.embed(audio, video)},
            repeats,
        )
        result["explicit_attention_speedup"] = round(timings["sdpa"].median / timings["avsync"].median, 3)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def _with_sdpa(model: AVSyncModel, audio: torch.Tensor, video: torch.Tensor):
    with reference_kernels(attention=True):
        return model.embed(audio, video)
