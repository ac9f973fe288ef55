"""Benchmark 1: one pretraining step (forward + backward + optimizer step) at the paper's ViT-B size.

Reported per precision (float32, and bf16 autocast) and device (the CPU, and the GPU when present):
samples/s, model FLOPs per sample (counted by `torch.utils.flop_counter.FlopCounterMode` on the same
step, attention included; and as the reference design counted them, without attention's products,
which that counter cannot see inside SDPA's CPU kernel), achieved FLOP/s, and MFU against the host's
own matrix peak in that precision (a large product timed in the same process).

Each precision's avsync step is timed interleaved, step by step, with the authors' configuration of
the same network: PyTorch's kernels (`nn.Linear`, timm's `Attention` on SDPA, as the authors' code
runs with current timm) and their optimizer (`torch.optim.Adam`, unfused). avsync's step differs in
what it chooses outside the model: the CPU kernels measured fastest on this host (`avsync.kernels`)
and the fused Adam. The network is the same (the conformance tests pin it to the authors' outputs);
the two copies hold the same initial weights. A profiled step gives the breakdown of where the time goes.

`ablation` measures, interleaved step by step in one process, the authors' configuration, then each
change, and the kernels forced one way (all oneDNN linears, all explicit attention) beside the measured
choice; optionally `torch.compile`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from avsync.kernels import (
    _gemm_nt,
    chosen_kernels,
    kernel_cache,
    linear_kernel,
    set_kernels,
    use_kernels,
)
from avsync.model import CAVMAESync
from avsync.tasks.pretrain import adam_optimizer
from benchmarks.harness import interleaved_medians, peak_rss_mib, time_runs

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
def fresh_kernel_cache() -> Iterator[str]:
    """A new, empty kernel cache for the duration, so that the benchmark's first step measures (and its
    time is reported) and no choice of an earlier run on another machine is reused."""
    import avsync.kernels

    previous = os.environ.get("AVSYNC_CACHE_DIR")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["AVSYNC_CACHE_DIR"] = directory
        avsync.kernels._cache = None
        try:
            yield directory
        finally:
            if previous is None:
                os.environ.pop("AVSYNC_CACHE_DIR", None)
            else:
                os.environ["AVSYNC_CACHE_DIR"] = previous
            avsync.kernels._cache = None


def authors_and_avsync(preset: str, device: torch.device, seed: int = 0):
    """Two copies of one freshly initialized network: the authors' configuration (PyTorch's kernels,
    unfused Adam) and avsync's (measured kernels, fused Adam), each with its optimizer."""
    torch.manual_seed(seed)
    authors = set_kernels(CAVMAESync.from_preset(preset).to(device))
    ours = use_kernels(copy.deepcopy(authors))
    return (
        (authors, adam_optimizer(list(authors.parameters()), fused=False)),
        (ours, adam_optimizer(list(ours.parameters()))),
    )


def model_flops_per_sample(
    model: CAVMAESync, audio: torch.Tensor, video: torch.Tensor, attention: str = "explicit"
) -> float:
    """FLOPs of one training step's forward and backward, per sample, as `FlopCounterMode` counts them.

    Counted on a copy with PyTorch's kernels (the counter has no formula for oneDNN's op, which does
    the same products). `attention="explicit"` counts attention's products; with `"sdpa"` the count
    leaves them out, as the counter has no formula for SDPA's CPU kernel either (that is the count of
    the reference design, 126.7 GFLOP at ViT-B)."""
    counted = set_kernels(copy.deepcopy(model), "library", attention)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(audio.device.type, dtype=torch.bfloat16):  # the same products, counted faster
            out = counted(audio, video)
        out.loss.backward()
    return counter.get_total_flops() / audio.shape[0]


# ------------------------------------------------------------------------------------ matmul peak
def matmul_peak(precision: str, device: torch.device, size: int = 4096, repeats: int = 5) -> dict:
    """The host's matrix peak in `precision`: GFLOP/s of a `size`^3 product (the fastest of `repeats`:
    a peak, so the run least slowed by other work), by `torch.matmul` and on CPU in float32 also by
    oneDNN (the other kernel avsync can choose there). `best` is the ceiling MFU is measured against."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, DTYPES[precision])
    b = torch.randn(size, size, generator=generator).to(device, DTYPES[precision])
    flops = 2.0 * size**3

    def rate(product: Callable[[], torch.Tensor]) -> float:
        def action():
            product()
            synchronize(device)

        return round(flops / min(time_runs(action, repeats).runs) / 1e9, 1)

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
def paired_ratio(slower: list[float], faster: list[float]) -> float:
    """The median of the round-by-round ratios of two interleaved series: each round's pair ran under
    the same load, so when the load drifts this stays meaningful where a ratio of medians would pair
    a quiet round of one with a busy round of the other."""
    return round(statistics.median(a / b for a, b in zip(slower, faster, strict=True)), 3)


def describe(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__name__} (fused={bool(optimizer.defaults.get('fused'))})"


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
    """avsync's step and the authors' configuration's, interleaved, per precision: throughput, FLOPs,
    MFU against the host's matrix peak (a `matmul_size`^3 product), the kernels chosen and the time
    their measurement took, the time breakdown."""
    device = torch.device(device)
    (authors, authors_optimizer), (ours, optimizer) = authors_and_avsync(preset, device)
    audio, video = make_batch(ours, batch, device)
    result: dict = {
        "preset": preset,
        "batch": batch,
        "device": str(device),
        "parameters_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "optimizer": describe(optimizer),
        "authors_optimizer": describe(authors_optimizer),
        "precisions": {},
    }
    flops = model_flops_per_sample(ours, audio, video, "explicit")
    result["model_gflop_per_sample"] = round(flops / 1e9, 3)
    result["flop_counter_sdpa_gflop_per_sample"] = round(
        model_flops_per_sample(ours, audio, video, "sdpa") / 1e9, 3
    )
    with fresh_kernel_cache():
        for precision in precisions:

            def step(model=ours, optimizer=optimizer, precision=precision):
                training_step(model, optimizer, audio, video, precision)
                synchronize(device)

            def authors_step(precision=precision):
                training_step(authors, authors_optimizer, audio, video, precision)
                synchronize(device)

            started, measuring = time.perf_counter(), kernel_cache().measuring_s
            step()  # the first step measures the kernels of each new shape class
            first_step_s = time.perf_counter() - started
            measuring_s = kernel_cache().measuring_s - measuring
            timings = interleaved_medians({"avsync": step, "authors": authors_step}, steps, warmup)
            timing, authors_timing = timings["avsync"], timings["authors"]
            peak = matmul_peak(precision, device, matmul_size)
            samples_per_s = batch / timing.median
            achieved = flops * samples_per_s
            entry = {
                "samples_per_s": round(samples_per_s, 3),
                "step": timing.as_dict(),
                "authors_samples_per_s": round(batch / authors_timing.median, 3),
                "authors_step": authors_timing.as_dict(),
                "ratio_vs_authors": paired_ratio(authors_timing.runs, timing.runs),
                "achieved_gflop_per_s": round(achieved / 1e9, 1),
                "authors_achieved_gflop_per_s": round(flops * batch / authors_timing.median / 1e9, 1),
                "matmul_peak": peak,
                "mfu": round(achieved / (peak["best_gflop_per_s"] * 1e9), 3),
                "kernels": chosen_kernels(ours),
                "first_step_s": round(first_step_s, 2),
                "kernel_choice_s": round(measuring_s, 2),
            }
            if profile and device.type == "cpu":
                entry["profile"] = profile_breakdown(step)
            result["precisions"][precision] = entry
    if device.type == "cuda":
        result["gpu_peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


#: The CPU step variants of the ablation, in order: (name, kernels, fused Adam). Kernels: `measured`
#: (`use_kernels`) or a fixed `(linear, attention)` pair (`set_kernels`); the first row is the authors'.
CPU_VARIANTS: list[tuple[str, str | tuple[str, str], bool]] = [
    ("authors: PyTorch kernels (MKL linears, SDPA), unfused Adam", ("library", "sdpa"), False),
    ("+ fused Adam", ("library", "sdpa"), True),
    ("+ kernels measured on this host (avsync)", "measured", True),
    ("forced: oneDNN linears, SDPA, fused Adam", ("onednn", "sdpa"), True),
    ("forced: MKL linears, explicit attention, fused Adam", ("library", "explicit"), True),
]


def pretrain_ablation(
    preset: str = "vitb",
    batch: int = 8,
    precisions: tuple[str, ...] = PRECISIONS,
    steps: int = 4,
    warmup: int = 1,
    compile: tuple[str, ...] = (),
) -> dict:
    """Each change against the authors' configuration, and the forced kernels beside the measured
    choice, interleaved step by step (one copy of the network per kernel setting, same initial weights,
    same batch).

    `compile`: precisions in which `torch.compile` of the avsync model is added as one more variant (its
    compilation time is reported separately)."""
    device = torch.device("cpu")
    # two copies: one whose fixed kernels each variant sets before its step (`set_kernels` switches at
    # once), one whose kernels are measured (a measured choice takes effect from a layer's next call)
    (fixed, _), (measured, _) = authors_and_avsync(preset, device)
    audio, video = make_batch(fixed, batch, device)
    optimizers = {
        (model is measured, fused): adam_optimizer(list(model.parameters()), fused=fused)
        for model, fused in ((fixed, False), (fixed, True), (measured, True))
    }
    result: dict = {"preset": preset, "batch": batch, "precisions": {}}
    with fresh_kernel_cache():
        for precision in precisions:
            actions: dict[str, Callable[[], None]] = {}
            for name, kernels, fused in CPU_VARIANTS:

                def action(kernels=kernels, fused=fused, precision=precision):
                    if kernels == "measured":
                        training_step(measured, optimizers[(True, fused)], audio, video, precision)
                    else:
                        set_kernels(fixed, *kernels)
                        training_step(fixed, optimizers[(False, fused)], audio, video, precision)

                actions[name] = action
            actions[CPU_VARIANTS[2][0]]()  # the measured kernels choose before the timed steps
            entry: dict = {}
            if precision in compile:
                compiled = torch.compile(measured)
                compiled_optimizer = optimizers[(True, True)]
                started = time.perf_counter()
                training_step(compiled, compiled_optimizer, audio, video, precision)
                entry["compile_first_step_s"] = round(time.perf_counter() - started, 1)
                actions["avsync + torch.compile"] = lambda p=precision, c=compiled, o=compiled_optimizer: (
                    training_step(c, o, audio, video, p)
                )
            timings = interleaved_medians(actions, steps, warmup)
            baseline = next(iter(timings.values())).runs
            entry["variants"] = {
                name: {
                    "samples_per_s": round(batch / timing.median, 3),
                    "speedup_vs_authors": paired_ratio(baseline, timing.runs),
                    **timing.as_dict(),
                }
                for name, timing in timings.items()
            }
            entry["kernels"] = chosen_kernels(measured)
            result["precisions"][precision] = entry
    parameters = list(fixed.parameters())
    adams = {fused: adam_optimizer(parameters, fused=fused) for fused in (False, True)}
    result["optimizer_step_ms"] = optimizer_step_ms(adams, parameters, steps)
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
