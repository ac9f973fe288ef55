"""One pretraining step under real DDP (launch with torchrun): saves the loss and averaged gradients.

Usage: torchrun --nproc_per_node N ddp_pretrain_step.py INPUTS.pt OUT.pt
INPUTS.pt holds `config`, `audio`, `video`, `noise_a`, `noise_v` for the global batch; rank r takes
the r-th equal slice.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from avsync.model import CAVMAESync


def main(inputs_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(inputs_path, weights_only=True)
    torch.manual_seed(0)
    model = DistributedDataParallel(CAVMAESync(**inputs["config"]))
    local = inputs["audio"].shape[0] // world
    part = slice(rank * local, (rank + 1) * local)
    out = model(
        inputs["audio"][part],
        inputs["video"][part],
        noise_a=inputs["noise_a"][part],
        noise_v=inputs["noise_v"][part],
    )
    out.loss.backward()
    terms = torch.stack([out.loss, out.contrastive, out.contrastive_accuracy]).detach()
    dist.all_reduce(terms)
    terms /= world
    if rank == 0:
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        torch.save(
            {"loss": terms[0], "contrastive": terms[1], "accuracy": terms[2], "grads": grads}, out_path
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
