"""Backbone features stored on disk, so that probing epochs read them instead of re-running the backbone.

A cached split is a directory `<root>/<split>-<key>/`: `part-*.safetensors` files (`features`
float16 `(n, T, W)`, `labels` as the data gave them, the clip keys in the file metadata) and a
`manifest.json` written last. `key` hashes everything the features depend on - the backbone's
weights and config, the data source, the split, the token/modality options - so a stale cache is
never reused: any change gives another directory.

Extraction is a `Trainer.predict` of a `FeatureExtractor` with a prediction writer (`_CacheWriter`, see
`tasks/features.py`): under DDP each rank extracts its own share of the data into a staging directory
(which must be on a file system all ranks see), rank 0 writes the manifest and renames the directory
into place once every rank is done, and every rank then loads the whole split. An interrupted build
leaves no half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from avsync.data.member_paths import member_path
from avsync.tasks.features import FeatureExtractor, FeatureWriter, LoaderSource, predict, predict_trainer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class CachedSplit:
    """One split in memory: `features` float16 `(N, T, W)`, `labels` `(N, C)` or `(N,)`, `keys`."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    directory: Path

    def __len__(self) -> int:
        return len(self.keys)


def cache_key(components: dict) -> str:
    """Hex SHA-256 of the JSON of `components` (sorted keys)."""
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """The cached splits under one root directory (see the module docstring).

    Args:
        root: directory holding the cached splits.
        clips_per_part: clips per safetensors part file (bounds the memory used while extracting).
    """

    def __init__(self, root: str | Path, clips_per_part: int = 4096):
        if clips_per_part < 1:
            raise ValueError(f"clips_per_part must be positive, got {clips_per_part}")
        self.root = Path(root)
        self.clips_per_part = clips_per_part

    def directory(self, split: str, components: dict) -> Path:
        return self.root / f"{split}-{cache_key(components)[:20]}"

    # ------------------------------------------------------------------ reading
    def load(self, split: str, components: dict) -> CachedSplit | None:
        """The cached split, or None when no complete cache with exactly these components exists."""
        directory = self.directory(split, components)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise json.JSONDecodeError("not a JSON object", "", 0)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(
                f"{manifest_path}: unreadable cache manifest ({error}); delete {directory}"
            ) from error
        if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != cache_key(components):
            log.warning("%s: written for other inputs or by another avsync version; ignoring it", directory)
            return None
        return self._read_parts(directory, manifest)

    @staticmethod
    def _read_parts(directory: Path, manifest: dict) -> CachedSplit:
        total = int(manifest["clips"])
        features = labels = None
        keys: list[str] = []
        row = 0
        for name in manifest["parts"]:
            path = member_path(directory, name, directory / MANIFEST)  # refused: a name, not a file
            try:
                with safe_open(str(path), framework="pt") as handle:
                    part_keys = json.loads(handle.metadata()["keys"])
                    part_features, part_labels = handle.get_tensor("features"), handle.get_tensor("labels")
            except Exception as error:  # safetensors raises its own types
                raise ValueError(
                    f"{path}: unreadable cache part ({error}); delete {directory} to rebuild"
                ) from error
            if features is None:
                features = torch.empty((total, *part_features.shape[1:]), dtype=part_features.dtype)
                labels = torch.empty((total, *part_labels.shape[1:]), dtype=part_labels.dtype)
            count = len(part_keys)
            if row + count > total or part_features.shape[0] != count or part_labels.shape[0] != count:
                raise ValueError(
                    f"{path}: part sizes disagree with {directory / MANIFEST}; delete {directory}"
                )
            features[row : row + count] = part_features
            labels[row : row + count] = part_labels
            keys.extend(part_keys)
            row += count
        if row != total or features is None:
            raise ValueError(
                f"{directory}: holds {row} clips, its manifest says {total}; delete it to rebuild"
            )
        return _drop_duplicates(CachedSplit(features, labels, keys, directory))

    @staticmethod
    def _is_complete(directory: Path, components: dict) -> bool:
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return manifest.get("format") == FORMAT_VERSION and manifest.get("key") == cache_key(components)

    # ------------------------------------------------------------------ writing
    def build(
        self,
        split: str,
        components: dict,
        batches: DataLoader | Callable[[], Iterable[dict]] | Iterable[dict],
        extract: Callable[[dict], torch.Tensor],
        *,
        within: L.Trainer | None = None,
        progress: bool = True,
        **trainer_options,
    ) -> CachedSplit:
        """Run `extract` (a batch on the device -> `(B, T, W)` features) over `batches` (a loader, a
        function making one, or batch dicts with `label` and `key`) as a `Trainer.predict`, and store the
        result. `within`: the Trainer of a run in progress, whose devices and process group the pass
        shares (each rank extracts its share; the cache root must be on a file system all ranks see).
        Without it the pass runs on `trainer_options` (default: one CPU)."""
        writer = _CacheWriter(self, split, components)
        extractor = FeatureExtractor(
            lambda batch: {"features": extract(batch)}, carry=("label",), name=f"the {split} data"
        )
        options = {} if within is not None else {"accelerator": "cpu", "devices": 1, **trainer_options}
        trainer = predict_trainer([writer], within=within, progress=progress, **options)
        predict(trainer, extractor, LoaderSource(batches))
        cached = self.load(split, components)
        if cached is None:
            raise RuntimeError(
                f"{self.directory(split, components)}: the cache was written but cannot be read back "
                f"(is {self.root} on a file system all ranks share?)"
            )
        return cached

    def _finish(
        self, staging: Path, final: Path, components: dict, counts: list[dict], seconds: float
    ) -> None:
        """Write the manifest and move the staging directory into place (rank 0)."""
        clips = sum(count["clips"] for count in counts)
        parts = sorted(path.name for path in staging.glob("part-*.safetensors"))
        with safe_open(str(staging / parts[0]), framework="pt") as handle:
            feature_shape = list(handle.get_slice("features").get_shape()[1:])
            label_shape = list(handle.get_slice("labels").get_shape()[1:])
        manifest = {
            "format": FORMAT_VERSION,
            "key": cache_key(components),
            "components": components,
            "clips": clips,
            "parts": parts,
            "feature_shape": feature_shape,
            "label_shape": label_shape,
            "clips_per_rank": [count["clips"] for count in counts],
            "extraction_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            if self._is_complete(final, components):  # another job built the same cache meanwhile
                shutil.rmtree(staging, ignore_errors=True)
                return
            shutil.rmtree(final)  # an unusable leftover (another format version, a broken copy)
        os.replace(staging, final)
        log.info("cached %d clips %s in %.1f s: %s", clips, feature_shape, seconds, final)


class _CacheWriter(FeatureWriter):
    """The probe's prediction writer: each rank's parts go to one staging directory (made by rank 0,
    named with a token all ranks share); rank 0 writes the manifest and moves it into place."""

    def __init__(self, cache: FeatureCache, split: str, components: dict):
        super().__init__(cache.clips_per_part, float16=("features",))
        self.cache, self.split, self.components = cache, split, components
        self.final = cache.directory(split, components)
        self.staging: Path | None = None
        self.started = time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        token = trainer.strategy.broadcast(uuid.uuid4().hex[:12])
        self.staging = self.final.with_name(f".{self.final.name}.{token}.partial")
        if self.rank == 0:
            self.staging.mkdir(parents=True, exist_ok=False)
        trainer.strategy.barrier()
        self.started = time.perf_counter()

    def save_part(self, index: int, arrays: dict[str, torch.Tensor], keys: list[str]) -> None:
        save_file(
            {"features": arrays["features"], "labels": arrays["label"]},
            str(self.staging / f"part-r{self.rank:03d}-{index:06d}.safetensors"),
            metadata={"keys": json.dumps(keys)},
        )

    def merge(self, reports: list[dict]) -> None:
        if sum(report["clips"] for report in reports) == 0:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise ValueError(f"the {self.split} data gave no clips to cache")
        self.cache._finish(
            self.staging, self.final, self.components, reports, time.perf_counter() - self.started
        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.rank == 0 and self.staging is not None:  # rank 0 owns the staging directory
            shutil.rmtree(self.staging, ignore_errors=True)


def _drop_duplicates(split: CachedSplit) -> CachedSplit:
    """Keep the first clip of each key: a key seen twice (overlapping shards, a resampling source)
    would otherwise count twice in training and evaluation."""
    counts = Counter(split.keys)
    repeated = {key: n for key, n in counts.items() if n > 1}
    if not repeated:
        return split
    examples = ", ".join(list(repeated)[:5])
    log.warning(
        "%s: %d clip keys occur more than once (%s ...); keeping the first of each",
        split.directory,
        len(repeated),
        examples,
    )
    seen: set[str] = set()
    keep = []
    for index, key in enumerate(split.keys):
        if key not in seen:
            seen.add(key)
            keep.append(index)
    rows = torch.tensor(keep)
    return CachedSplit(
        split.features[rows], split.labels[rows], [split.keys[i] for i in keep], split.directory
    )
