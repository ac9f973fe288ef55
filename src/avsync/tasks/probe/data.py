"""Probing data as cached backbone features: `CachedFeatureDataModule`.

It wraps the data module that gives the clips (`source`, e.g. `AVShardDataModule` with
`train_mode: eval`, so that training clips also carry all T pairs) and the `ProbeModule` being fitted:
on `setup` each split the stage needs is loaded from the cache, or extracted once with the module's
frozen backbone and cached (see `cache.py`). Batches are then `{"features" (B, T, W) float16,
"label", "key"}`, served from memory; class-balanced sampling is available because the cached
training set is a map-style dataset.

The cache key of a split combines the module's `feature_signature` (backbone fingerprint, modality,
token) with the source's identity (`source_identity`): its class, its settings (public attributes,
minus performance settings and those of other splits), and the size and modification time of every
local file its settings name, so that re-prepared shards invalidate the cache. Data that can change
without any of these changing (an in-memory dataset) needs a `source_id` that changes with it.
"""

from __future__ import annotations

import glob as globbing
import logging
import os

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from avsync.config_checks import check_count
from avsync.data.datamodule import AVShardDataModule
from avsync.tasks.probe.cache import CachedSplit, FeatureCache

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
#: Source settings that change how fast data arrives, not what it is.
PERFORMANCE_SETTINGS = frozenset(
    {
        "batch_size",
        "eval_batch_size",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "shuffle_buffer",
    }
)


class FeatureDataset(Dataset):
    """A cached split as a map-style dataset; fetches whole batches by fancy indexing (`__getitems__`)."""

    def __init__(self, split: CachedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return {
            "features": self.split.features[index],
            "label": self.split.labels[index],
            "key": self.split.keys[index],
        }

    def __getitems__(self, indices: list[int]) -> dict:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {
            "features": self.split.features[rows],
            "label": self.split.labels[rows],
            "key": [self.split.keys[i] for i in indices],
        }


def _whole_batch(batch: dict) -> dict:
    return batch


def class_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-clip sampling weights inversely proportional to class frequency.

    Class indices `(N,)`: `1 / count(class)`, so every class is drawn equally often. Multi-hot
    `(N, C)`: the sum over the clip's classes of `1 / count(class)` (the AudioSet recipe of AST and
    CAV-MAE); a clip without any label gets the mean weight."""
    if labels.ndim == 1:
        counts = torch.bincount(labels.long())
        return 1.0 / counts[labels.long()].double()
    positives = (labels > 0.5).double()
    counts = positives.sum(dim=0).clamp(min=1)
    weights = (positives / counts).sum(dim=1)
    unlabeled = weights == 0
    if unlabeled.all():
        raise ValueError("class-balanced sampling needs labelled clips; no clip has a positive class")
    weights[unlabeled] = weights[~unlabeled].mean()
    return weights


def class_balanced_sampler(labels: torch.Tensor, num_samples: int | None = None) -> WeightedRandomSampler:
    """Draws `num_samples` (default: one epoch's worth) clips with replacement, weighted as above."""
    weights = class_balanced_weights(labels)
    return WeightedRandomSampler(weights, num_samples=num_samples or len(weights), replacement=True)


def _path_stats(value: str) -> list[list]:
    """`[path, size, mtime_ns]` of the local files a shard specification names (directories are
    walked; globs and brace patterns expanded); remote URLs and plain words give nothing."""
    from braceexpand import braceexpand

    stats = []
    for part in (p for p in value.split("::") if p):
        if part.startswith("pipe:") or "://" in part:
            continue
        for pattern in braceexpand(part):
            if os.path.isdir(pattern):
                paths = [os.path.join(d, f) for d, _, files in os.walk(pattern) for f in files]
            elif globbing.has_magic(pattern):
                paths = globbing.glob(pattern)
            elif os.path.isfile(pattern):
                paths = [pattern]
            else:
                continue
            for path in paths:
                info = os.stat(path)
                stats.append([os.path.abspath(path), info.st_size, info.st_mtime_ns])
    return sorted(stats)


_NOT_PLAIN = object()


def _plain_settings(value, other_splits: tuple[str, ...]):
    """The JSON-friendly part of a setting: numbers, strings, None and containers of them; entries
    named after another split (`val`, `test_shards`, ...) and other objects are left out."""
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_") or _names_other_split(key, other_splits):
                continue
            plain = _plain_settings(item, other_splits)
            if plain is not _NOT_PLAIN:
                kept[key] = plain
        return kept
    if isinstance(value, list | tuple):
        items = [_plain_settings(item, other_splits) for item in value]
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return _NOT_PLAIN


def _names_other_split(name: str, other_splits: tuple[str, ...]) -> bool:
    return any(name == other or name.startswith(f"{other}_") for other in other_splits)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def source_identity(source: L.LightningDataModule, split: str, source_id: str | None = None) -> dict:
    """What identifies the clips `source` gives for `split` (see the module docstring): its class, its
    public plain attributes (not `hparams`, which LightningCLI fills with the outer module's values
    for nested data modules) except performance settings and those named after other splits, and
    the size and modification time of the local files its string settings name."""
    other_splits = tuple(other for other in (*SPLITS, "predict") if other != split)
    attributes = {
        name: value
        for name, value in vars(source).items()
        if name not in PERFORMANCE_SETTINGS and name not in ("trainer", "hparams")
    }
    settings = _plain_settings(attributes, other_splits)
    files = sorted({tuple(stat) for text in _strings(settings) for stat in _path_stats(text)})
    return {
        "source": f"{type(source).__module__}.{type(source).__qualname__}",
        "source_id": source_id,
        "settings": settings,
        "files": [list(stat) for stat in files],
        "split": split,
    }


class CachedFeatureDataModule(L.LightningDataModule):
    """Serves cached backbone features of `source`'s clips to a `ProbeModule` (see the module docstring).

    Args:
        source: the data module giving eval-mode clip batches (`audio (B, T, L, mel)`,
            `video (B, T, 3, H, W)`, `label`, `key`) for the splits used; its batch size and workers
            are used for the one extraction pass.
        cache_dir: where cached splits live.
        batch_size: clips per training batch (Table 9: 48). eval_batch_size: for val/test (default:
            `batch_size`).
        class_balanced: draw training clips with weights inversely proportional to class frequency.
        num_workers: DataLoader workers over the in-memory features (0 is usually fastest).
        source_id: a name for the source's data, added to the cache key; change it when the data
            changes in a way its settings and files do not show.
        clips_per_part: clips per cache file.
    """

    def __init__(
        self,
        source: L.LightningDataModule,
        cache_dir: str = "cache/probe_features",
        batch_size: int = 48,
        eval_batch_size: int | None = None,
        class_balanced: bool = False,
        num_workers: int = 0,
        source_id: str | None = None,
        clips_per_part: int = 4096,
    ):
        super().__init__()
        check_count("CachedFeatureDataModule", "batch_size", batch_size, 1)  # ConfigError naming the key
        check_count("CachedFeatureDataModule", "eval_batch_size", eval_batch_size, 1, optional=True)
        check_count("CachedFeatureDataModule", "num_workers", num_workers, 0)
        check_count("CachedFeatureDataModule", "clips_per_part", clips_per_part, 1)
        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.cache = FeatureCache(cache_dir, clips_per_part)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.class_balanced, self.num_workers, self.source_id = class_balanced, num_workers, source_id
        self.splits: dict[str, CachedSplit] = {}
        self._identities: dict[str, dict] = {}
        self._source_ready: set[str] = set()

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # the Trainer passes its TrainerFn enum
        if stage not in STAGE_SPLITS:
            raise ValueError(f"CachedFeatureDataModule supports {sorted(STAGE_SPLITS)}; got stage {stage!r}")
        module = self._probe_module()
        if not self._identities:  # before the source is set up: its set-up fills in settings
            self._identities = {
                split: source_identity(self.source, split, self.source_id) for split in SPLITS
            }
        for split in STAGE_SPLITS[stage]:
            if split in self.splits:
                continue
            if not self.source_has(split):
                if split == "val" and stage == "fit":
                    continue  # fitting without validation
                raise ValueError(
                    f"{stage} needs the {split} split, which {type(self.source).__name__} does not provide"
                )
            self.splits[split] = self._load_or_build(split, stage, module)
            self._check_labels(split, module)

    def _probe_module(self):
        module = None if self.trainer is None else self.trainer.lightning_module
        if (
            module is None
            or not hasattr(module, "extract_features")
            or not hasattr(module, "feature_signature")
        ):
            raise RuntimeError(
                "CachedFeatureDataModule extracts features with the trainer's model: use it in "
                "Trainer.fit/validate/test/predict with a ProbeModule"
            )
        return module

    def source_has(self, split: str) -> bool:
        """Whether `source` gives the split: for `AVShardDataModule` whether its shards are set, for
        other data modules whether they override `<split>_dataloader`."""
        if isinstance(self.source, AVShardDataModule):
            return self.source.shard_specs.get(split) is not None
        return is_overridden(f"{split}_dataloader", self.source, L.LightningDataModule)

    def components(self, split: str, module) -> dict:
        """Everything the cached features of `split` depend on (hashed into the cache key)."""
        identity = self._identities.get(split) or source_identity(self.source, split, self.source_id)
        return {**module.feature_signature, "data": identity, "dtype": "float16"}

    def _load_or_build(self, split: str, stage: str, module) -> CachedSplit:
        components = self.components(split, module)
        cached = self.cache.load(split, components)
        if cached is not None:
            log.info("probe features of %s: %d clips from %s", split, len(cached), cached.directory)
            return cached
        if getattr(self.source, "resampled", False):
            raise ValueError(
                "the feature cache needs every clip exactly once: set resampled: false on the source"
            )
        self._prepare_source(stage)
        # A prediction pass on this run's devices and process group (tasks/features.py); a map-style
        # source loader gets Lightning's unrepeated distributed sampler, shard streams split by rank.
        return self.cache.build(
            split,
            components,
            lambda: self._source_loader(split),
            module.extract_features,
            within=self.trainer,
            progress=self.trainer.progress_bar_callback is not None,
        )

    def _source_loader(self, split: str):
        """Every clip of the split once: the source's `full_pass_dataloader(split)` where it has one
        (`AVShardDataModule`: its training loader would shuffle, augment and drop partial batches),
        else its `<split>_dataloader()`."""
        if hasattr(self.source, "full_pass_dataloader"):
            return self.source.full_pass_dataloader(split)
        return getattr(self.source, f"{split}_dataloader")()

    def _prepare_source(self, stage: str) -> None:
        if stage in self._source_ready:
            return
        self.source.trainer = self.trainer  # lets the source read the model's input sizes and the ranks
        self.source.setup(stage)
        self._source_ready.add(stage)

    def _check_labels(self, split: str, module) -> None:
        labels = self.splits[split].labels
        num_classes = module.hparams.num_classes
        if labels.ndim == 2 and labels.shape[1] != num_classes:
            raise ValueError(
                f"{self.splits[split].directory}: labels have {labels.shape[1]} classes, "
                f"the probe's num_classes is {num_classes}"
            )

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, training: bool) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"the {split} split is not set up (call setup with the right stage first)")
        dataset = FeatureDataset(self.splits[split])
        sampler = (
            class_balanced_sampler(self.splits[split].labels) if training and self.class_balanced else None
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if training else self.eval_batch_size,
            shuffle=training and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_whole_batch,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", training=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", training=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (predictions carry the clip keys)."""
        return self._loader("test", training=False)
