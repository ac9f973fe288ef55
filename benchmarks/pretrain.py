"""Benchmark 1: one pretraining step (forward + backward + optimizer step) at the paper's ViT-B size.

Reported per precision (float32, and bf16 autocast) and device (the CPU, and the GPU when present):
samples/s, model FLOPs per sample (counted by `torch.utils.flop_counter.FlopCounterMode` on the same
step, attention included; and as the reference design counted them, without attention's products,
which that counter cannot see inside SDPA's CPU kernel), achieved FLOP/s, and MFU against a large
matrix product timed in the same process and precision.
A profiled step gives the breakdown of where the time goes.

`ablation` measures, interleaved step by step in one process, the step as it was before each CPU
optimization and with it (see `CPU_VARIANTS`), and optionally `torch.compile`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import interleaved_medians, peak_rss_mib, time_runs
from avsync.model import CAVMAESync
from avsync.onednn import _gemm_nt, linear_kernel
from avsync.tasks.pretrain import adam_optimizer

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- the step
def make_batch(model: CAVMAESync, batch: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, model.audio_length, model.mel_bins, generator=generator)
    video = torch.randn(batch, 3, model.image_size, model.image_size, generator=generator)
    return audio.to(device), video.to(device)


def training_step(
    model: Callable,
    optimizer: torch.optim.Optimizer,
    audio: torch.Tensor,
    video: torch.Tensor,
    precision: str,
) -> None:
    """What `PretrainModule` does per batch: masked forward + loss, backward, optimizer step."""
    with torch.autocast(audio.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(audio, video)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def reference_kernels(linears: bool = False, attention: bool = False) -> Iterator[None]:
    """Undo this package's CPU kernel choices for the duration: `linears` back to PyTorch's default
    (MKL) float32 GEMM, `attention` back to SDPA in every precision."""
    with contextlib.ExitStack() as stack:
        if linears:
            stack.enter_context(mock.patch("avsync.onednn._onednn_applies", return_value=False))
        if attention:
            stack.enter_context(
                mock.patch("avsync.model.attention.explicit_attention_is_faster", return_value=False)
            )
        yield


def model_flops_per_sample(
    model: CAVMAESync, audio: torch.Tensor, video: torch.Tensor, attention: str = "explicit"
) -> float:
    """FLOPs of one training step's forward and backward, per sample, as `FlopCounterMode` counts them.

    Counted with PyTorch's own linear kernels (the counter has no formula for oneDNN's op, which does
    the same products). `attention="explicit"` counts attention's products; with `"sdpa"` the count
    leaves them out, as the counter has no formula for SDPA's CPU kernel either (that is the count of
    the reference design, 126.7 GFLOP at ViT-B)."""
    explicit = attention == "explicit"
    with (
        reference_kernels(linears=True),
        mock.patch("avsync.model.attention.explicit_attention_is_faster", return_value=explicit),
        FlopCounterMode(display=False) as counter,
    ):
        with torch.autocast(audio.device.type, dtype=torch.bfloat16):  # the same products, counted faster
            out = model(audio, video)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / audio.shape[0]


# ------------------------------------------------------------------------------------ matmul peak
def matmul_peak(precision: str, device: torch.device, size: int = 4096, repeats: int = 5) -> dict:
    """GFLOP/s of a `size`^3 product: `torch.matmul`, and on CPU in float32 also oneDNN (the kernel
    avsync's linears use there). `best` is the ceiling MFU is measured against."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, DTYPES[precision])
    b = torch.randn(size, size, generator=generator).to(device, DTYPES[precision])
    flops = 2.0 * size**3

    def rate(product: Callable[[], torch.Tensor]) -> float:
        def action():
            product()
            synchronize(device)

        return round(flops / time_runs(action, repeats).median / 1e9, 1)

    peaks = {"torch_matmul_gflop_per_s": rate(lambda: a @ b)}
    if device.type == "cpu" and precision == "fp32" and linear_kernel() is not None:
        b_t = b.t().contiguous()
        peaks["onednn_gflop_per_s"] = rate(lambda: _gemm_nt(a, b_t))
    peaks["best_gflop_per_s"] = max(peaks.values())
    peaks["size"] = size
    return peaks


# -------------------------------------------------------------------------------------- profiling
_CATEGORIES: dict[str, tuple[str, ...]] = {
    "linear layers (GEMM)": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::linear"),
    "attention": (
        "aten::bmm",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::_scaled_dot_product",
        "aten::_efficient_attention",
        "aten::_flash_attention",
    ),  # fmt: skip
    "optimizer": (
        "aten::_fused_adam",
        "aten::_foreach",
        "aten::lerp_",
        "aten::addcdiv_",
        "aten::addcmul_",
        "aten::sqrt",
    ),
    "layer norm, GELU": ("aten::native_layer_norm", "aten::gelu"),
    "copies, casts, concatenation, gather": (
        "aten::copy_",
        "aten::_to_copy",
        "aten::cat",
        "aten::gather",
        "aten::clone",
        "aten::scatter",
    ),  # fmt: skip
    "patch embedding (conv)": (
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::_convolution",
    ),
}


def profile_breakdown(step: Callable[[], None]) -> dict:
    """Self CPU time of one profiled step, grouped by what the operators do (seconds and share)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    totals: dict[str, float] = {name: 0.0 for name in (*_CATEGORIES, "other")}
    top = []
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        category = next(
            (name for name, prefixes in _CATEGORIES.items() if event.key.startswith(prefixes)), "other"
        )
        totals[category] += seconds
        top.append((seconds, event.key))
    total = sum(totals.values())
    return {
        "profiled_step_s": round(total, 3),
        "by_category": {
            name: {"seconds": round(seconds, 3), "share": round(seconds / total, 3)}
            for name, seconds in sorted(totals.items(), key=lambda item: -item[1])
        },
        "top_operators": [
            {"op": key, "seconds": round(seconds, 3)} for seconds, key in sorted(top, reverse=True)[:8]
        ],
    }


# ---------------------------------------------------------------------------------- benchmarks
def pretrain_step(
    preset: str = "vitb",
    batch: int = 8,
    precisions: tuple[str, ...] = PRECISIONS,
    steps: int = 5,
    warmup: int = 1,
    profile: bool = True,
    device: str = "cpu",
    matmul_size: int = 4096,
) -> dict:
    """The step as avsync runs it, per precision: throughput, FLOPs, MFU (against a `matmul_size`^3
    product), time breakdown."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = CAVMAESync.from_preset(preset).to(device)
    optimizer = adam_optimizer(list(model.parameters()))
    audio, video = make_batch(model, batch, device)
    result: dict = {
        "preset": preset,
        "batch": batch,
        "device": str(device),
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "optimizer": f"{type(optimizer).__name__} (fused={optimizer.defaults.get('fused')})",
        "precisions": {},
    }
    flops = model_flops_per_sample(model, audio, video, "explicit")
    result["model_gflop_per_sample"] = round(flops / 1e9, 3)
    result["flop_counter_sdpa_gflop_per_sample"] = round(
        model_flops_per_sample(model, audio, video, "sdpa") / 1e9, 3
    )
    for precision in precisions:

        def step(precision=precision):
            training_step(model, optimizer, audio, video, precision)
            synchronize(device)

        timing = time_runs(step, steps, warmup)
        peak = matmul_peak(precision, device, matmul_size)
        samples_per_s = batch / timing.median
        achieved = flops * samples_per_s
        entry = {
            "samples_per_s": round(samples_per_s, 3),
            "step": timing.as_dict(),
            "achieved_gflop_per_s": round(achieved / 1e9, 1),
            "matmul_peak": peak,
            "mfu": round(achieved / (peak["best_gflop_per_s"] * 1e9), 3),
        }
        if profile and device.type == "cpu":
            entry["profile"] = profile_breakdown(step)
        result["precisions"][precision] = entry
    if device.type == "cuda":
        result["gpu_peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


#: Per precision, the CPU step before and after each of this package's changes, in the order applied:
#: (name, `reference_kernels` arguments, fused optimizer).
CPU_VARIANTS: dict[str, list[tuple[str, dict, bool]]] = {
    "fp32": [
        ("before: MKL linears, multi-tensor Adam", {"linears": True, "attention": True}, False),
        ("+ oneDNN linears", {"attention": True}, False),
        ("+ fused Adam (avsync)", {}, True),
    ],
    "bf16": [
        ("before: SDPA attention, multi-tensor Adam", {"linears": True, "attention": True}, False),
        ("+ explicit attention", {"linears": True}, False),
        ("+ fused Adam (avsync)", {}, True),
    ],
}


def pretrain_ablation(
    preset: str = "vitb",
    batch: int = 8,
    precisions: tuple[str, ...] = PRECISIONS,
    steps: int = 4,
    warmup: int = 1,
    compile: tuple[str, ...] = (),
) -> dict:
    """Each CPU optimization's effect, variants interleaved step by step (same model, same batch).

    `compile`: precisions in which `torch.compile` of the model is added as one more variant (its
    compilation time is reported separately)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = CAVMAESync.from_preset(preset)
    audio, video = make_batch(model, batch, device)
    parameters = list(model.parameters())
    optimizers = {fused: adam_optimizer(parameters, fused=fused) for fused in (False, True)}
    result: dict = {"preset": preset, "batch": batch, "precisions": {}}
    for precision in precisions:
        actions: dict[str, Callable[[], None]] = {}
        for name, kernels, fused in CPU_VARIANTS[precision]:

            def action(kernels=kernels, fused=fused, precision=precision):
                with reference_kernels(**kernels):
                    training_step(model, optimizers[fused], audio, video, precision)

            actions[name] = action
        entry: dict = {}
        if precision in compile:
            compiled = torch.compile(model)
            started = time.perf_counter()
            training_step(compiled, optimizers[True], audio, video, precision)
            entry["compile_first_step_s"] = round(time.perf_counter() - started, 1)
            actions["avsync + torch.compile"] = lambda p=precision, c=compiled: training_step(
                c, optimizers[True], audio, video, p
            )
        timings = interleaved_medians(actions, steps, warmup)
        baseline = next(iter(timings.values())).median
        entry["variants"] = {
            name: {
                "samples_per_s": round(batch / timing.median, 3),
                "speedup_vs_before": round(baseline / timing.median, 3),
                **timing.as_dict(),
            }
            for name, timing in timings.items()
        }
        result["precisions"][precision] = entry
    result["optimizer_step_ms"] = optimizer_step_ms(optimizers, parameters, steps)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def optimizer_step_ms(
    optimizers: dict[bool, torch.optim.Optimizer], parameters: list[torch.nn.Parameter], repeats: int
) -> dict:
    """One Adam step over the model's parameters (random gradients), by `fused` flag of `optimizers`."""
    for p in parameters:
        p.grad = torch.randn_like(p)
    names = {False: "multi_tensor", True: "fused"}
    timings = interleaved_medians({names[fused]: opt.step for fused, opt in optimizers.items()}, repeats)
    for p in parameters:
        p.grad = None
    return {name: round(timing.median * 1e3, 1) for name, timing in timings.items()}
