"""Collectives that keep the autograd graph, so that contrastive negatives can span the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """`(rank, world_size)`; `(0, 1)` outside an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice.

    torch.distributed.nn's all_gather emulates reduce-scatter with all_to_all, which gloo lacks; an
    all_reduce works on every backend and the tensors here are only `(batch, dim)`.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank, world_size = world()
        ctx.rank, ctx.sizes = rank, sizes
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor, equal_sizes: bool = False) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` (first dim may differ per rank) over all ranks, differentiably.

    Returns the global tensor and the offset of this rank's rows in it. `equal_sizes`: the caller
    knows every rank has as many rows as this one, which saves gathering the sizes first (a
    collective whose result the host must read: a device sync).
    """
    rank, world_size = world()
    if world_size == 1:
        return tensor, 0
    if equal_sizes:
        rows = tensor.shape[0]
        return _GatherWithGrad.apply(tensor, [rows] * world_size), rows * rank
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes_list = [int(s.item()) for s in sizes]
    return _GatherWithGrad.apply(tensor, sizes_list), sum(sizes_list[:rank])


def release_process_group() -> None:
    """Destroy the default process group, if there is one, before the interpreter exits.

    Lightning leaves it alive after a run; gloo's and NCCL's C++ threads still running while Python
    shuts down can abort a process whose run succeeded ("terminate called without an active
    exception", exit status -6), which a scheduler reads as a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
