"""Float32 matrix products through oneDNN on CPU: twice the speed of PyTorch's default on AMD processors.

PyTorch sends float32 `mm`/`addmm` on CPU to MKL, whose sgemm runs a generic (AVX2) code path on AMD
processors: about 200 GFLOP/s on the 2-core AVX-512 EPYC of `BENCHMARKS.md`, where oneDNN (bundled
with PyTorch as `mkldnn`) reaches 400-470 GFLOP/s for the same products, forward and backward, with
the same IEEE float32 arithmetic (no reduced-precision tricks; only the summation order differs, as it
does between any two BLAS libraries). PyTorch routes float32 products to oneDNN only when reduced
precision is allowed, so this module calls oneDNN's linear kernel directly:

- `linear_kernel()`: `torch.ops.mkldnn._linear_pointwise`, a private op that PyTorch's own compiler
  (inductor) emits; None when this PyTorch build lacks it, and every caller then falls back to the
  ordinary operator.
- `linear(x, weight, bias)`: `F.linear` with oneDNN forward *and* backward for float32 CPU tensors
  outside autocast; anything else (GPU, bf16, autocast, no oneDNN, `torch.compile`) is plain `F.linear`.
- `OneDNNLinear` / `use_onednn_linears(model)`: an `nn.Linear` whose forward is `linear` (same
  parameters and state dict), and the in-place switch of a model's linears to it.
- `use_device_kernels(model, device)`: the CPU kernels (these linears and the explicit reduced-precision
  attention of `avsync.model.attention`) on CPU, PyTorch's `nn.Linear` and timm's `Attention` anywhere
  else; `CAVMAESync` calls it whenever it is built or moved, so a GPU run sees the plain classes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


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
    """`a @ b.T (+ bias)` by oneDNN. Transposed views are fine: oneDNN reads the strides, which
    measured as fast as (or faster than) making the operands contiguous first."""
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed by oneDNN for float32 CPU tensors outside autocast."""
    if _onednn_applies(x, weight):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose float32 CPU products run on oneDNN (see the module docstring). It adds no state,
    so it loads and saves exactly the state dict of `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Turn every plain `nn.Linear` of `model` into an `OneDNNLinear`, in place.

    Changing the class of the existing modules (rather than building new ones) keeps their parameters,
    hooks and registration order, so weights, initialization and checkpoints are untouched; it is safe
    because `OneDNNLinear` only overrides `forward`.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model


def use_device_kernels(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give `model` the kernels that are fastest on `device`, in place, by switching classes that add
    no state (so parameters, hooks and checkpoints are untouched): on CPU `OneDNNLinear` and avsync's
    `Attention`; on any other device plain `nn.Linear` and timm's `Attention`, where the CPU choices
    would only add a per-call test."""
    from timm.layers import Attention as TimmAttention

    from avsync.model.attention import Attention

    on_cpu = torch.device(device).type == "cpu"
    for module in model.modules():
        kind = type(module)
        if on_cpu and kind is nn.Linear:
            module.__class__ = OneDNNLinear
        elif on_cpu and kind is TimmAttention and Attention.supports(module):
            module.__class__ = Attention
        elif not on_cpu and kind is OneDNNLinear:
            module.__class__ = nn.Linear
        elif not on_cpu and kind is Attention:
            module.__class__ = TimmAttention
    return model
