"""`a @ b.T` in float32 at the speed the CPU can give.

Retrieval cost is all matrix products. On CPU, PyTorch sends float32 `mm` to MKL, whose sgemm runs a
generic code path on AMD processors; oneDNN (bundled with PyTorch as `mkldnn`) reaches about twice
that throughput there and the same elsewhere, with the same IEEE float32 arithmetic (no reduced-precision
tricks). Other devices, dtypes and builds without oneDNN use the ordinary `@`.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _onednn_linear():
    """oneDNN's dense linear kernel, or None when this PyTorch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` for `a (M, K)` and `b (N, K)`, returning a new contiguous `(M, N)` tensor."""
    linear = _onednn_linear()
    if linear is not None and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32:
        return linear(a.contiguous(), b.contiguous(), None, "none", [], "")
    return a @ b.T
