"""CPU kernels chosen by measurement on the host that runs them, outside the model.

The model is plain PyTorch and timm (`nn.Linear`, timm's `Attention` calling SDPA). On CPU two choices
depend on the processor, the PyTorch build and the precision, and no fixed rule gets them right:

- linear layers in float32: PyTorch's `F.linear` (MKL's sgemm) or oneDNN's linear kernel (bundled with
  PyTorch as `mkldnn`, called through `torch.ops.mkldnn._linear_pointwise`, the op PyTorch's compiler
  emits). On a 2-core AVX-512 EPYC oneDNN was twice MKL's speed (MKL runs a generic path on AMD); on a
  2-core Intel Xeon with AMX neither wins everywhere (MKL the MLP products at a training step's row
  counts, oneDNN at a few hundred rows). Same IEEE float32 arithmetic. (In bf16 autocast both paths run
  on oneDNN: nothing to choose.)
- attention: SDPA (`F.scaled_dot_product_attention`, the flash kernel on CPU) or timm's explicit
  `softmax(q k^T / sqrt(d)) v` (`Attention.fused_attn = False`). On the AMX Xeon, in bf16, the explicit
  form trains the encoders' short sequences (64-wide heads, about 60 tokens) about 1.5-2x faster.

`use_kernels(model)` puts a forward pre-hook on every `nn.Linear` and timm `Attention`. The first time a
layer sees a new shape class (operator, dtype, training or inference, shapes in power-of-two buckets) on
CPU, the candidates are timed, interleaved, on random tensors of that shape (milliseconds to a few
hundred; see `MAX_ROWS`), and the fastest is kept when it beats PyTorch's own by `MARGIN` (else
PyTorch's), in memory and in a JSON cache (`cache_path()`, keyed also by the CPU and the PyTorch
version), so later runs only read it. Products too small to matter (`MIN_FLOPS`) are not measured. The
choice only swaps `nn.Linear` for `OneDNNLinear` (the same parameters and state dict) or sets timm's own
`fused_attn` flag. On any other device the hooks pick PyTorch's kernels and never measure.

`AVSYNC_KERNELS` overrides: `auto` (the default: the cache, measuring what it lacks), `library`
(PyTorch's defaults, no measurement, no cache) or `measure` (measure every shape class again in this
process and rewrite the cache). `matmul_nt(a, b)` (retrieval's `a @ b.T`) is chosen the same way.
Lightning runs get this through `avsync.training.kernels.KernelChoice`; `AVSyncModel` calls `use_kernels`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "library", "measure")
#: The candidates of each operator; the first is PyTorch's default (the `library` choice).
CANDIDATES = {
    "linear": ("library", "onednn"),
    "attention": ("sdpa", "explicit"),
    "matmul_nt": ("library", "onednn"),
}
#: Measured tensors are capped at this many rows (linear, matmul) and batch x heads x tokens (attention):
#: the ranking of MKL and oneDNN changes with the rows (on an AMX Xeon oneDNN wins the MLP product at 256
#: rows and loses it at 1,024 and more), so the cap stays high; ViT-B's float32 step measures in about
#: 2 s on 2 cores, its bf16 step (attention only) in well under one.
MAX_ROWS = 1024
MAX_ATTENTION_ROWS = 8192
#: Products smaller than this (FLOPs of one call, backward included) keep PyTorch's kernel unmeasured:
#: what a choice could save there is microseconds, less than the noise of measuring it.
MIN_FLOPS = 1e8
#: A candidate replaces PyTorch's default only when it is at least this much faster, so that noise
#: from other work on the machine does not move a choice away from the library.
MARGIN = 0.05
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------ oneDNN linear
@functools.cache
def linear_kernel():
    """oneDNN's dense linear kernel `(input (M, K), weight (N, K), bias) -> (M, N)`, or None when this
    PyTorch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _gemm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b.T (+ bias)` by oneDNN; it reads transposed views' strides, no copies needed."""
    return linear_kernel()(a, b, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """`y = x W^T + b` with all three products (forward, input and weight gradients) done by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat, weight)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        return _gemm_nt(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        flat, weight = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = _gemm_nt(grad, weight.t()).view(ctx.input_shape)  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_weight = _gemm_nt(grad.t(), flat.t())  # grad^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)
        return grad_input, grad_weight, grad_bias


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()  # inductor lowers this op only for constant (frozen) weights
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")  # autocast's bf16 products already run on oneDNN
        and linear_kernel() is not None
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed by oneDNN for float32 CPU tensors outside autocast (else `F.linear`)."""
    if _onednn_applies(x, weight):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose float32 CPU products run on oneDNN. It adds no state, so it loads and saves
    exactly the state dict of `nn.Linear`, and `use_kernels` can switch a layer's class both ways."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------- the cache
def kernel_mode() -> str:
    """`AVSYNC_KERNELS` (`auto` when unset)."""
    mode = os.environ.get("AVSYNC_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"AVSYNC_KERNELS={mode!r}: use one of {', '.join(MODES)}")
    return mode


def cache_path() -> Path:
    """`$AVSYNC_CACHE_DIR/kernels.json`, else `$XDG_CACHE_HOME/avsync/kernels.json` (`~/.cache`)."""
    if os.environ.get("AVSYNC_CACHE_DIR"):
        return Path(os.environ["AVSYNC_CACHE_DIR"]) / "kernels.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "avsync" / "kernels.json"


@functools.cache
def host_key() -> str:
    """The processor (model name and a digest of its instruction-set flags: under a hypervisor the
    name alone is often generic), torch's thread count and the PyTorch version: what a measurement
    holds for."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    digest = hashlib.sha1(flags.encode()).hexdigest()[:10]
    return f"{name} [{digest}] x{torch.get_num_threads()} torch {torch.__version__}"


class KernelCache:
    """Measured choices by key, in memory and in a JSON file (read as data only: a choice is used only
    when it names one of its operator's candidates; an unreadable file is ignored and rewritten)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self.entries: dict[str, dict] = {}
        self.measured: set[str] = set()  # keys measured by this process (for `measure` mode)
        self.logged: set[str] = set()
        self.measuring_s = 0.0  # time this process spent measuring
        self._load()

    def _load(self) -> None:
        self.entries = self._read(warn=True)

    def _read(self, warn: bool = False) -> dict[str, dict]:
        """The file's valid entries (none when it is missing or unreadable)."""
        say = log.warning if warn else log.debug
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            say("kernel cache %s unreadable (%s): ignored, it will be rewritten", self.path, error)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            say(
                "kernel cache %s is not a version-%d cache: ignored, it will be rewritten",
                self.path,
                CACHE_VERSION,
            )
            return {}
        entries = data.get("entries")
        entries = entries if isinstance(entries, dict) else {}
        valid = {
            key: {
                "choice": value["choice"],
                "ms": value.get("ms") if isinstance(value.get("ms"), dict) else {},
            }
            for key, value in entries.items()
            if isinstance(value, dict) and value.get("choice") in CANDIDATES.get(key.split("|")[-2], ())
        }
        if len(valid) < len(entries):
            say(
                "kernel cache %s: %d entries name no known kernel: ignored, they will be measured again",
                self.path,
                len(entries) - len(valid),
            )
        return valid

    def _save(self) -> None:
        """Write this process's entries over the file's (other processes may have added theirs)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            entries = {**self._read(), **self.entries}
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            payload = {"version": CACHE_VERSION, "entries": dict(sorted(entries.items()))}
            temporary.write_text(json.dumps(payload, indent=1) + "\n")
            os.replace(temporary, self.path)  # atomic: a reader never sees half a file
        except OSError as error:
            log.warning("kernel cache %s not written (%s): the choices hold for this run", self.path, error)

    def choose(self, op: str, shape: str, measure: Callable[[], dict[str, float]], mode: str) -> str:
        key = f"{host_key()}|{op}|{shape}"
        entry = self.entries.get(key)
        if entry is None or (mode == "measure" and key not in self.measured):
            started = time.perf_counter()
            times = measure()
            self.measuring_s += time.perf_counter() - started
            library, *others = times
            best = min(others, key=times.get)
            choice = best if times[best] < (1 - MARGIN) * times[library] else library
            entry = {"choice": choice, "ms": {k: round(v * 1e3, 3) for k, v in times.items()}}
            self.entries[key] = entry
            self.measured.add(key)
            self._save()
            source = "measured"
        else:
            source = f"cached in {self.path}"
        if key not in self.logged:
            self.logged.add(key)
            timings = ", ".join(f"{name} {ms} ms" for name, ms in entry.get("ms", {}).items())
            log.info("kernel for %s %s: %s (%s; %s)", op, shape, entry["choice"], timings, source)
        return entry["choice"]


_cache: KernelCache | None = None


def kernel_cache() -> KernelCache:
    """The process's cache (read from `cache_path()` on first use)."""
    global _cache
    if _cache is None or _cache.path != cache_path():
        _cache = KernelCache()
    return _cache


# ------------------------------------------------------------------------------------ measurement
def _race(
    candidates: dict[str, Callable[[], object]], rounds: int = 2, budget_s: float = 0.05
) -> dict[str, float]:
    """Seconds per call of each candidate, interleaved (at least `rounds` calls each, more while they
    fit in `budget_s`, at most 10): the best of each, the call least disturbed by other work on the
    machine. No separate warm-up: a first call's set-up cost only loses it the minimum."""
    best = dict.fromkeys(candidates, math.inf)
    started_all = time.perf_counter()
    for done in range(10):
        if done >= rounds and time.perf_counter() - started_all > budget_s:
            break
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") and x.dtype.is_floating_point:
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _training(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _measure_linear(rows: int, layer: nn.Linear, training: bool) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, layer.in_features, generator=generator).requires_grad_(training)
    weight = layer.weight.detach().clone().requires_grad_(training)
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(training)
    grad = torch.randn(rows, layer.out_features, generator=generator)

    def run(function):
        def call():
            out = function(x, weight, bias)
            if training:
                out.backward(grad)
                x.grad = weight.grad = None
                if bias is not None:
                    bias.grad = None

        return call

    with torch.autocast("cpu", enabled=False):
        return _race({"library": run(F.linear), "onednn": run(_OneDNNLinearFunction.apply)})


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm's `fused_attn=False` path."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _measure_attention(shape: tuple[int, ...], dtype: torch.dtype, training: bool) -> dict[str, float]:
    batch, heads, tokens, width = shape
    batch = max(1, min(batch, MAX_ATTENTION_ROWS // max(1, heads * tokens)))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, tokens, width, generator=generator).to(dtype).requires_grad_(training)
        for _ in range(3)
    )
    grad = torch.randn(batch, heads, tokens, width, generator=generator).to(dtype)

    def run(function):
        def call():
            out = function(q, k, v)
            if training:
                out.backward(grad)
                q.grad = k.grad = v.grad = None

        return call

    # under the caller's autocast, as the model runs it
    return _race({"sdpa": run(F.scaled_dot_product_attention), "explicit": run(_explicit_attention)})


# ------------------------------------------------------------------------------------ the choice
def choose_linear(layer: nn.Linear, x: torch.Tensor, mode: str | None = None) -> str:
    """`library` or `onednn` for this layer and input: measured (or cached) for float32 on CPU outside
    autocast; `library` everywhere else (autocast's bf16 products already run on oneDNN)."""
    mode = mode or kernel_mode()
    if mode == "library" or not _onednn_applies(x, layer.weight):
        return "library"
    training = _training(x, layer.weight)
    rows = x.numel() // max(1, layer.in_features)
    if 2 * rows * layer.in_features * layer.out_features * (3 if training else 1) < MIN_FLOPS:
        return "library"
    shape = (
        f"{_dtype_name(x.dtype)} {'train' if training else 'infer'} "
        f"rows<={min(_bucket(rows), MAX_ROWS)} {layer.in_features}->{layer.out_features}"
        f"{'' if layer.bias is not None else ' nobias'}"
    )
    return kernel_cache().choose(
        "linear", shape, lambda: _measure_linear(min(rows, MAX_ROWS), layer, training), mode
    )


def choose_attention(layer: Attention, x: torch.Tensor, mode: str | None = None) -> str:
    """`sdpa` or `explicit` for this timm `Attention` and input `(B, N, C)`: measured (or cached) on CPU,
    `sdpa` elsewhere and where the layer has attention dropout (the explicit path would drop differently)."""
    mode = mode or kernel_mode()
    if mode == "library" or x.device.type != "cpu" or x.dim() != 3 or layer.attn_drop.p:
        return "sdpa"
    dtype = _compute_dtype(x)
    training = _training(x, layer.qkv.weight)
    batch, tokens, _ = x.shape
    heads, width = layer.num_heads, layer.head_dim
    if 4 * batch * heads * tokens**2 * width * (3 if training else 1) < MIN_FLOPS:
        return "sdpa"
    shape = (
        f"{_dtype_name(dtype)} {'train' if training else 'infer'} "
        f"tokens<={_bucket(tokens)} batch*heads<={_bucket(batch * heads)} heads={heads} width={width}"
    )
    return kernel_cache().choose(
        "attention", shape, lambda: _measure_attention((batch, heads, tokens, width), dtype, training), mode
    )


class _KernelHook:
    """The forward pre-hook `use_kernels` puts on a layer: it applies the choice for the call's input
    (`mode` None: `AVSYNC_KERNELS` at the time of the call)."""

    def __init__(self, mode: str | None = None):
        self.mode = mode

    def __call__(self, layer: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or torch.compiler.is_compiling():
            return  # under torch.compile the layers keep the kernels they had
        if isinstance(layer, Attention):
            layer.fused_attn = choose_attention(layer, args[0], self.mode) == "sdpa"
        else:  # from the next call on: PyTorch has bound this call's forward before its pre-hooks run
            layer.__class__ = (
                OneDNNLinear if choose_linear(layer, args[0], self.mode) == "onednn" else nn.Linear
            )


def _kernel_layers(model: nn.Module):
    for module in model.modules():
        if type(module) in (nn.Linear, OneDNNLinear) or isinstance(module, Attention):
            yield (
                module,
                [k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, _KernelHook)],
            )


def use_kernels(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Let `model`'s linear layers and timm attentions run the kernels measured fastest on this host.

    In place, and without touching parameters or state dicts: a forward pre-hook per layer chooses at
    the first call with each new shape class (see the module docstring). `mode`: `auto`, `measure` or
    `library` (which removes the hooks and restores PyTorch's kernels); None follows `AVSYNC_KERNELS`
    at each call. Idempotent (a second call replaces the hooks' mode)."""
    if (mode or kernel_mode()) not in MODES:
        raise ValueError(f"kernel mode {mode!r}: use one of {', '.join(MODES)}")
    for layer, installed in _kernel_layers(model):
        for key in installed:
            del layer._forward_pre_hooks[key]
        if (mode or kernel_mode()) == "library":
            if type(layer) is OneDNNLinear:
                layer.__class__ = nn.Linear
            if isinstance(layer, Attention):
                layer.fused_attn = True
        else:
            layer.register_forward_pre_hook(_KernelHook(mode))
    return model


def set_kernels(model: nn.Module, linear: str = "library", attention: str = "sdpa") -> nn.Module:
    """Give every layer of `model` one fixed kernel, unmeasured (for comparisons: benchmarks, tests);
    `use_kernels(model)` afterwards hands the choice back to measurement."""
    if linear not in CANDIDATES["linear"] or attention not in CANDIDATES["attention"]:
        raise ValueError(f"unknown kernels {linear!r}, {attention!r}: see avsync.kernels.CANDIDATES")
    use_kernels(model, "library")
    for module in model.modules():
        if type(module) is nn.Linear and linear == "onednn":
            module.__class__ = OneDNNLinear
        elif isinstance(module, Attention):
            module.fused_attn = attention == "sdpa"
    return model


def chooses_kernels(model: nn.Module) -> bool:
    """Whether every linear layer and timm attention of `model` has its kernel chosen by `use_kernels`."""
    layers = list(_kernel_layers(model))
    return bool(layers) and all(installed for _, installed in layers)


def chosen_kernels(model: nn.Module) -> dict[str, int]:
    """How many layers of `model` currently run each kernel (for logs and tests)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if type(module) in (nn.Linear, OneDNNLinear):
            name = "linear: onednn" if type(module) is OneDNNLinear else "linear: library"
        elif isinstance(module, Attention):
            name = "attention: sdpa" if module.fused_attn else "attention: explicit"
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` for `a (M, K)` and `b (N, K)` as a new contiguous `(M, N)` tensor, in float32 on CPU by
    the kernel measured fastest for this shape class (MKL's `@` or oneDNN's linear)."""
    mode = kernel_mode()
    if mode == "library" or not _onednn_applies(a, b) or a.requires_grad or b.requires_grad:
        return a @ b.T
    rows, cols, width = a.shape[0], b.shape[0], a.shape[1]
    if 2 * rows * cols * width < MIN_FLOPS:
        return a @ b.T
    shape = f"float32 rows<={min(_bucket(rows), MAX_ROWS)} cols<={min(_bucket(cols), MAX_ROWS)} width={width}"

    def measure() -> dict[str, float]:
        x, y = a[:MAX_ROWS].contiguous(), b[:MAX_ROWS].contiguous()
        return _race({"library": lambda: x @ y.T, "onednn": lambda: _gemm_nt(x, y)})

    if kernel_cache().choose("matmul_nt", shape, measure, mode) == "onednn":
        return _gemm_nt(a.contiguous(), b.contiguous())
    return a @ b.T
