"""Backbone features stored on disk, so that probing epochs read them instead of re-running the backbone.

A cached split is a directory `<root>/<split>-<key>/`: `part-*.safetensors` files (`features`
float16 `(n, T, W)`, `labels` as the data gave them, the clip keys in the file metadata) and a
`manifest.json` written last. `key` hashes everything the features depend on - the backbone's
weights and config, the data source, the split, the token/modality options - so a stale cache is
never reused: any change gives another directory.

Writes go to a staging directory renamed into place at the end, so an interrupted build leaves no
half cache behind. Under DDP each rank extracts its own share of the data into the staging directory
(which must be on a file system all ranks see) and every rank then loads the whole split.
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

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


class _PartWriter:
    """Accumulates extracted batches and writes them as safetensors parts of bounded size."""

    def __init__(self, directory: Path, prefix: str, clips_per_part: int):
        self.directory, self.prefix, self.clips_per_part = directory, prefix, clips_per_part
        self.features: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.keys: list[str] = []
        self.parts = 0
        self.clips = 0
        self.label_signature: tuple | None = None
        self.feature_shape: tuple[int, ...] | None = None

    def add(self, features: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> None:
        if len(keys) != features.shape[0] or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"batch sizes disagree: {features.shape[0]} feature rows, {labels.shape[0]} labels, "
                f"{len(keys)} keys"
            )
        signature = (labels.dtype, tuple(labels.shape[1:]))
        if self.label_signature is None:
            self.label_signature, self.feature_shape = signature, tuple(features.shape[1:])
        elif signature != self.label_signature or tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"batches disagree in shape: labels {signature} vs {self.label_signature}, "
                f"features {tuple(features.shape[1:])} vs {self.feature_shape}"
            )
        self.features.append(features.detach().to("cpu", torch.float16))
        self.labels.append(labels.detach().cpu())
        self.keys.extend(str(key) for key in keys)
        self.clips += len(keys)
        if len(self.keys) >= self.clips_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        path = self.directory / f"part-{self.prefix}{self.parts:06d}.safetensors"
        tensors = {
            "features": torch.cat(self.features).contiguous(),
            "labels": torch.cat(self.labels).contiguous(),
        }
        save_file(tensors, str(path), metadata={"keys": json.dumps(self.keys)})
        self.features, self.labels, self.keys = [], [], []
        self.parts += 1


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
        except json.JSONDecodeError as error:
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
            path = directory / name
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
        batches: Iterable[dict],
        extract: Callable[[dict], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        broadcast: Callable[[object], object] = lambda value: value,
        progress: bool = True,
    ) -> CachedSplit:
        """Run `extract` (a batch -> `(B, T, W)` features) over `batches` and store the result.

        With `world_size > 1` every rank calls this with its own share of the data and the same
        components; `barrier` and `broadcast` are the strategy's collectives."""
        final = self.directory(split, components)
        staging = final.with_name(f".{final.name}.{broadcast(uuid.uuid4().hex[:12])}.partial")
        if rank == 0:
            staging.mkdir(parents=True, exist_ok=False)
        barrier()
        writer = _PartWriter(staging, f"r{rank:03d}-", self.clips_per_part)
        started = time.perf_counter()
        try:
            iterator = batches
            if progress and rank == 0:
                from tqdm.auto import tqdm

                iterator = tqdm(  # disable=None: no bar when the output is not a terminal (logs, CI)
                    batches,
                    desc=f"probe features, {split} (rank {rank})",
                    unit="batch",
                    leave=False,
                    disable=None,
                )
            for batch in iterator:
                missing = [name for name in ("label", "key") if name not in batch]
                if missing:
                    raise ValueError(
                        f"{split} batches lack {missing}: probing needs labelled clips with keys"
                    )
                keys = batch["key"]
                keys = [keys] if isinstance(keys, str) else list(keys)
                writer.add(extract(batch), batch["label"], keys)
            writer.flush()
            (staging / f"rank-{rank:03d}.json").write_text(
                json.dumps({"clips": writer.clips, "parts": writer.parts})
            )
        except BaseException:
            if rank == 0:  # rank 0 owns the staging directory
                shutil.rmtree(staging, ignore_errors=True)
            raise
        barrier()
        counts = [json.loads((staging / f"rank-{r:03d}.json").read_text()) for r in range(world_size)]
        barrier()  # every rank has read the counts before rank 0 moves the directory
        if sum(count["clips"] for count in counts) == 0:  # every rank raises, none waits
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(f"the {split} data gave no clips to cache")
        if rank == 0:
            self._finish(staging, final, components, counts, time.perf_counter() - started)
        barrier()
        cached = self.load(split, components)
        if cached is None:
            raise RuntimeError(
                f"{final}: the cache was written but cannot be read back "
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
