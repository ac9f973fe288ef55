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
    grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    # The same step with equal batch sizes declared (no gather of the sizes): the same numbers.
    model.zero_grad()
    model.module.contrastive.equal_batches = True
    again = model(
        inputs["audio"][part],
        inputs["video"][part],
        noise_a=inputs["noise_a"][part],
        noise_v=inputs["noise_v"][part],
    )
    again.loss.backward()
    equal_grads = {name: p.grad for name, p in model.module.named_parameters()}
    if rank == 0:
        torch.save(
            {
                "loss": terms[0],
                "contrastive": terms[1],
                "accuracy": terms[2],
                "grads": grads,
                "equal_batches_loss": again.loss.detach(),
                "local_loss": out.loss.detach(),
                "equal_batches_grads": equal_grads,
            },
            out_path,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
