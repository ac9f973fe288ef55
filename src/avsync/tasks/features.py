"""Features of every clip of a data set, extracted with `Trainer.predict` on any number of devices.

Two pieces, shared by the probe's feature cache (`tasks/probe/cache.py`) and `avsync embed --shards`
(`api/outputs.py`):

- `FeatureExtractor`, the LightningModule: a frozen backbone's pass over one batch, returning
  `{"key": [...], name: (B, ...)}`; clips it is told to skip (already written) are not run at all.
- `FeatureWriter`, a `BasePredictionWriter` (`write_interval="batch"`): each rank writes what it
  extracted into its own part files, dropping clip ids it already wrote (a padding sampler's repeats,
  a clip id in two shards). In the `teardown` hook, which every rank reaches (also a rank whose share
  was empty and whose prediction loop never started), the ranks' reports are gathered and rank 0
  merges the parts (`merge`); an error there is raised on every rank, so none waits forever.

`predict_trainer` builds the Trainer. Inside a running `fit` (the probe builds its cache in its data
module's `setup`) it makes a second Trainer on the same devices that reuses the running process group:
Lightning does not initialize a process group twice, and a prediction run neither wraps the model in
DDP nor destroys the group at its end. This keeps `trainer.fit(probe, CachedFeatureDataModule(...))`
one call in Python and in `avsync fit`, where building the cache before `fit` would need the model's
fingerprint and the source's set-up outside Lightning's hooks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, IterableDataset

from avsync.data.transforms import normalize_batch_video
from avsync.training.kernels import KernelChoice

log = logging.getLogger(__name__)


def batch_keys(batch: dict) -> list[str]:
    keys = batch["key"]
    return [keys] if isinstance(keys, str) else [str(key) for key in keys]


def select_rows(batch: dict, rows: list[int], size: int) -> dict:
    """The rows `rows` of every per-clip entry of a batch of `size` clips (tensors and lists)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    selected = {}
    for name, value in batch.items():
        if torch.is_tensor(value) and value.ndim and value.shape[0] == size:
            selected[name] = value[index.to(value.device)]
        elif isinstance(value, list | tuple) and len(value) == size:
            selected[name] = [value[i] for i in rows]
        else:
            selected[name] = value
    return selected


class FeatureExtractor(L.LightningModule):
    """`predict_step`: a batch of clips -> `{"key": [...], **extract(batch), **carried entries}`.

    Args:
        extract: a batch (on the device) -> dict of `(B, ...)` tensors.
        backbone: the module `extract` runs, registered here so that the strategy places it on the
            device (None when `extract` places its model itself).
        carry: batch entries copied into the prediction (e.g. `label`); a batch without them, or
            without `key`, is refused.
        skip_keys: clip ids not to extract (already written by an earlier run).
        name: what the data is, for error messages.
    """

    def __init__(
        self,
        extract: Callable[[dict], dict[str, torch.Tensor]],
        backbone: torch.nn.Module | None = None,
        carry: Iterable[str] = (),
        skip_keys: Iterable[str] = (),
        name: str = "the data",
    ):
        super().__init__()
        self.extract, self.backbone = extract, backbone
        self.carry, self.skip_keys, self.name = tuple(carry), set(skip_keys), name
        self.skipped = 0

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 frames (sent as bytes to a GPU by the shard data module) are normalized here."""
        return normalize_batch_video(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        missing = [name for name in ("key", *self.carry) if name not in batch]
        if missing:
            raise ValueError(f"{self.name}: batches lack {missing}; every clip needs a key and {self.carry}")
        keys = batch_keys(batch)
        if self.skip_keys:
            rows = [row for row, key in enumerate(keys) if key not in self.skip_keys]
            self.skipped += len(keys) - len(rows)
            if not rows:
                return None
            if len(rows) < len(keys):
                batch, keys = select_rows(batch, rows, len(keys)), [keys[row] for row in rows]
        return {"key": keys, **self.extract(batch), **{name: batch[name] for name in self.carry}}


def gather_objects(value: object) -> list:
    """`value` of every rank, in rank order (a synchronization point); `[value]` without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class FeatureWriter(BasePredictionWriter):
    """Writes each rank's predictions (`{"key": [...], name: (B, ...)}`) into part files of at most
    `clips_per_part` clips, then lets rank 0 merge them (see the module docstring).

    Subclasses implement `save_part(index, arrays, keys)` and `merge(reports)`; `setup` may prepare
    directories (call `super().setup` first). Entries named in `float16` are stored as float16, others
    as they come (labels keep their dtype).
    """

    def __init__(self, clips_per_part: int = 4096, float16: Iterable[str] = ()):
        super().__init__(write_interval="batch")
        if clips_per_part < 1:
            raise ValueError(f"clips_per_part must be positive, got {clips_per_part}")
        self.clips_per_part, self.float16 = clips_per_part, frozenset(float16)
        self.rank, self.world_size = 0, 1
        self._reset()

    def _reset(self) -> None:
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_keys: list[str] = []
        self.seen: set[str] = set()
        self.signature: dict[str, tuple] | None = None
        self.clips = self.parts = self.repeats = 0

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._reset()
        self.rank, self.world_size = trainer.global_rank, trainer.world_size

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if prediction is not None:
            self.add(prediction)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.flush()
        reports = gather_objects(self.report(trainer))
        error = None
        if self.rank == 0:
            try:
                self.merge(reports)
            except Exception as exception:  # re-raised below, on every rank
                error = exception
        message = trainer.strategy.broadcast(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        if message is not None:
            kind, text = message
            raise (ValueError if kind == "ValueError" else RuntimeError)(text)

    # ------------------------------------------------------------------ accumulation
    def add(self, prediction: dict) -> None:
        keys = list(prediction["key"])
        fields = {name: value for name, value in prediction.items() if name != "key"}
        for name, value in fields.items():
            if not torch.is_tensor(value) or value.shape[:1] != (len(keys),):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"batch sizes disagree: {len(keys)} keys, {name} {shape}")
        signature = {name: (value.dtype, tuple(value.shape[1:])) for name, value in fields.items()}
        if self.signature is None:
            self.signature = signature
        elif signature != self.signature:
            raise ValueError(f"batches disagree in shape: {signature} vs {self.signature}")
        rows = []
        for row, key in enumerate(keys):
            if key in self.seen:
                self.repeats += 1
            else:
                self.seen.add(key)
                rows.append(row)
        if not rows:
            return
        index = torch.as_tensor(rows)
        for name, value in fields.items():
            value = value.detach()[index.to(value.device)].cpu()
            self.pending.setdefault(name, []).append(value.half() if name in self.float16 else value)
        self.pending_keys += [keys[row] for row in rows]
        self.clips += len(rows)
        if len(self.pending_keys) >= self.clips_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.pending_keys:
            return
        arrays = {name: torch.cat(values).contiguous() for name, values in self.pending.items()}
        self.save_part(self.parts, arrays, self.pending_keys)
        self.pending, self.pending_keys = {}, []
        self.parts += 1

    def report(self, trainer: L.Trainer) -> dict:
        """What this rank did, gathered for `merge`."""
        return {"rank": self.rank, "clips": self.clips, "parts": self.parts, "repeats": self.repeats}

    # ------------------------------------------------------------------ for subclasses
    def save_part(self, index: int, arrays: dict[str, torch.Tensor], keys: list[str]) -> None:
        raise NotImplementedError

    def merge(self, reports: list[dict]) -> None:
        """Rank 0, once every rank has written its parts: combine them."""


class _Batches(IterableDataset):
    """Ready-made batch dicts as a dataset (for a DataLoader with `batch_size=None`)."""

    def __init__(self, batches: Iterable[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class LoaderSource(L.LightningDataModule):
    """A data module whose predict loader is `make_loader()`: lets Lightning create (and, under DDP,
    re-create with its sampler) a loader given as a factory or as plain batches."""

    def __init__(self, batches: DataLoader | Callable[[], Iterable[dict]] | Iterable[dict]):
        super().__init__()
        self.batches = batches

    def predict_dataloader(self):
        batches = self.batches
        if callable(batches) and not isinstance(batches, DataLoader):
            batches = batches()
        if isinstance(batches, DataLoader):
            return batches
        return DataLoader(_Batches(batches), batch_size=None)


def predict_trainer(
    callbacks: list[L.Callback],
    *,
    within: L.Trainer | None = None,
    progress: bool = False,
    **options,
) -> L.Trainer:
    """A Trainer for a prediction pass: on `within`'s devices and process group when given (a run in
    progress), else built from `options` (accelerator, devices, num_nodes, strategy, precision)."""
    common = dict(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[*callbacks, KernelChoice()],  # the CPU kernels measured fastest on this host
    )
    if within is None:
        return L.Trainer(**common, **options)
    strategy = within.strategy
    device = strategy.root_device
    precision = str(within.precision)
    # "*-true" precisions would cast the inputs for a model they never converted (it is not registered)
    precision = precision if "mixed" in precision or precision in ("32-true", "64-true") else "32-true"
    if within.world_size == 1:
        devices = [device.index] if device.type == "cuda" and device.index is not None else 1
        return L.Trainer(accelerator=device.type, devices=devices, precision=precision, **common)
    if not isinstance(strategy, DDPStrategy) or not strategy.cluster_environment.creates_processes_externally:
        raise RuntimeError(
            f"features can be extracted inside a {within.world_size}-process run only under DDP with "
            f"processes started outside Python (torchrun, SLURM, Lightning's default `ddp`), not under "
            f"{type(strategy).__name__} ({getattr(strategy, '_start_method', '')}); build the cache first "
            "with strategy=ddp"
        )
    nested = DDPStrategy(
        parallel_devices=strategy.parallel_devices,
        cluster_environment=strategy.cluster_environment,
        process_group_backend=strategy.process_group_backend,
    )
    return L.Trainer(
        strategy=nested,
        devices=len(strategy.parallel_devices),
        num_nodes=within.num_nodes,
        precision=precision,
        **common,
    )


def predict(trainer: L.Trainer, module: FeatureExtractor, datamodule: L.LightningDataModule) -> None:
    """`trainer.predict` without keeping the predictions (the writer has them), and without Lightning's
    warnings that do not apply: batch indices unknown (the writer goes by clip ids), a step returning
    None (a batch of clips already written), the data module's `on_after_batch_transfer` taking
    precedence (it normalizes the same way)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        warnings.filterwarnings("ignore", message="predict returned None")  # all clips of a batch skipped
        warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")
        trainer.predict(module, datamodule=datamodule, return_predictions=False)


def atomic_write_text(path: Path, text: str) -> None:
    """`path` holds the old text or the new one, never a part (written beside it, then renamed)."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    temporary.replace(path)
