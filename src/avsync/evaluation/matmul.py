"""`a @ b.T` in float32 at the speed the CPU can give.

Retrieval cost is all matrix products. On CPU, PyTorch sends float32 `mm` to MKL, whose sgemm runs a
generic code path on AMD processors; oneDNN (bundled with PyTorch as `mkldnn`) reaches about twice
that throughput there and the same elsewhere, with the same IEEE float32 arithmetic (no reduced-precision
tricks; see `avsync.onednn`). Other devices, dtypes and builds without oneDNN use the ordinary `@`.
"""

from __future__ import annotations

import torch

from avsync.onednn import linear_kernel


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` for `a (M, K)` and `b (N, K)`, returning a new contiguous `(M, N)` tensor."""
    linear = linear_kernel()
    if linear is not None and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32:
        return linear(a.contiguous(), b.contiguous(), None, "none", [], "")
    return a @ b.T
