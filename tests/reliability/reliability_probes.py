"""A callback that the reliability tests add to real `avsync fit` runs (through the config, with this
folder on PYTHONPATH) to see what each rank did at each step.

`RecordSteps` appends one JSON line per training step to `<out_dir>/steps-rank<R>.jsonl`:
`step` (global step after it), `epoch`, `loss`, `lr` (the one the step used), `keys` (the clips of
the batch), `weights_changed`, and `contrastive`: the InfoNCE loss the model computed next to the
loss recomputed independently (plain `all_gather`, no autograd) over the global batch and over the
local batch only, and how many negatives the global batch holds; also the cluster environment
Lightning detected and the working directory. `poison_rank`/`poison_step` fill the frames of one
batch with NaN on one rank: only that rank's loss turns NaN (its audio, which the other ranks gather
as negatives, stays finite).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F


class RecordSteps(L.Callback):
    def __init__(self, out_dir: str, poison_rank: int = -1, poison_step: int = -1) -> None:
        self.out_dir = Path(out_dir)
        self.poison_rank, self.poison_step = poison_rank, poison_step
        self._contrastive: dict | None = None
        self._weights: torch.Tensor | None = None
        self._lr: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"steps-rank{trainer.global_rank}.jsonl"
        pl_module.backbone.contrastive.register_forward_hook(self._check_contrastive)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fix a reference batch (the first clips of the training shards, middle frame, fixed masks),
        and note the state training starts from (after a checkpoint was restored, if any)."""
        with torch.random.fork_rng():  # decoding here must not shift the run's random streams
            clips = next(iter(trainer.datamodule.full_pass_dataloader("train")))
            middle = clips["video"].shape[1] // 2
            self._reference = (clips["audio"][:, middle], clips["video"][:, middle])
            generator = torch.Generator().manual_seed(0)
            self._reference_noise = pl_module.backbone.draw_noise(
                len(clips["key"]), torch.device("cpu"), generator
            )
        start = {
            "event": "train_start",
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "weights": _digest(_flat_weights(pl_module)),
            "cwd": os.getcwd(),
        }
        start["optimizer"] = _digest(_flat_optimizer_state(trainer.optimizers[0]))
        start["reference_loss"] = self._reference_loss(pl_module)
        self._write(start)

    def _reference_loss(self, pl_module: L.LightningModule) -> float:
        training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            loss = pl_module.backbone.pretrain_loss(*self._reference, *self._reference_noise).loss
        pl_module.train(training)
        return float(loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._contrastive = None
        self._weights = _flat_weights(pl_module)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]
        if trainer.global_rank == self.poison_rank and trainer.global_step == self.poison_step:
            batch["video"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "loss": float(outputs["loss"]),
            "lr": self._lr,
            "keys": list(batch["key"]),
            "weights_changed": not torch.equal(self._weights, _flat_weights(pl_module)),
            "contrastive": self._contrastive,
            "reference_loss": self._reference_loss(pl_module),
            "weights": _digest(_flat_weights(pl_module)),
            "optimizer": _digest(_flat_optimizer_state(trainer.optimizers[0])),
            "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "cwd": os.getcwd(),
        }
        self._write(record)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _check_contrastive(self, module, inputs, output) -> None:
        if not module.training:
            return
        audio, video = (F.normalize(x.detach().float(), dim=-1) for x in inputs)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        gathered = [torch.empty_like(audio) for _ in range(world)]
        if world > 1:
            dist.all_gather(gathered, audio.contiguous())
        else:
            gathered = [audio]
        everyone = torch.cat(gathered)
        targets = torch.arange(len(video)) + rank * len(audio)
        self._contrastive = {
            "model": float(output[0]),
            "global_batch": float(F.cross_entropy(video @ everyone.T / module.temperature, targets)),
            "local_batch": float(
                F.cross_entropy(video @ audio.T / module.temperature, torch.arange(len(video)))
            ),
            "negatives": len(everyone),
        }


def _flat_weights(pl_module: L.LightningModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()


def _flat_optimizer_state(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    tensors = [
        value.detach().float().flatten() for state in optimizer.state.values() for value in state.values()
    ]
    return torch.cat(tensors) if tensors else torch.zeros(0)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def read_records(out_dir: Path) -> dict[int, list[dict]]:
    """rank -> everything it recorded (training starts and steps), in order."""
    return {
        int(path.stem.removeprefix("steps-rank")): [
            json.loads(line) for line in path.read_text().splitlines()
        ]
        for path in sorted(Path(out_dir).glob("steps-rank*.jsonl"))
    }


def read_steps(out_dir: Path) -> dict[int, list[dict]]:
    """rank -> its step records, in order."""
    return {rank: [r for r in records if "event" not in r] for rank, records in read_records(out_dir).items()}


class Ballast(L.Callback):
    """Adds `megabytes` of zeros to every checkpoint, so that a save takes long enough to be killed in."""

    def __init__(self, megabytes: int) -> None:
        self.megabytes = megabytes

    def state_dict(self) -> dict:
        return {"ballast": torch.zeros(self.megabytes * 2**20, dtype=torch.uint8)}

    def load_state_dict(self, state_dict: dict) -> None:
        assert state_dict["ballast"].numel() == self.megabytes * 2**20
