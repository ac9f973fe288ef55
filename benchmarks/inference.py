"""Benchmark 2: feature extraction, clips/s at `T` = 16 frame / audio-window pairs per clip, in bf16.

Through the embedding API (`AVSyncModel.embed`), which runs `CAVMAESync.encode`: only the passes a
task needs - the modality encoders and the per-modality joint passes, no decoder, no fused joint pass,
and only the modalities given (`audio` or `video` alone for one-modality tasks).
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from avsync.api.model import AVSyncModel
from avsync.kernels import chosen_kernels, set_kernels
from avsync.model import CAVMAESync
from benchmarks.harness import interleaved_medians, peak_rss_mib, time_runs

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
    compare_library: bool = True,
) -> dict:
    """Clips/s per mode; `compare_library`: also the audio-and-video pass with PyTorch's kernels (MKL
    linears, SDPA) instead of those `AVSyncModel` measures on CPU, interleaved with it (the effect of
    that choice)."""
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
            "gflop_per_clip": round(counter.get_total_flops() / clips / 1e9, 3),
            "achieved_gflop_per_s": round(counter.get_total_flops() / timing.median / 1e9, 1),
            **timing.as_dict(),
        }
    result["kernels"] = chosen_kernels(backbone)
    if compare_library and model.device.type == "cpu":
        library = AVSyncModel(set_kernels(copy.deepcopy(backbone)), device, precision)
        set_kernels(library.backbone)  # AVSyncModel hands the kernels to measurement: take them back
        timings = interleaved_medians(
            {"library": lambda: library.embed(audio, video), "avsync": lambda: model.embed(audio, video)},
            repeats,
        )
        result["kernel_choice_speedup"] = round(timings["library"].median / timings["avsync"].median, 3)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result
