"""Finding shards and streaming them with a webdataset pipeline, split across ranks and workers.

Shard specifications (`resolve_shards`): a directory written by `avsync prepare` (its manifest lists
the shards), a glob (`/data/as2m/shard-*.tar`), a brace pattern (`/data/as2m/shard-{000000..000099}.tar`,
also remote URLs such as `pipe:aws s3 cp ... -`), a single file, or several of these joined by `::`.

Splitting: ranks are given explicitly (the DataModule takes them from the Trainer), so the pipeline
does not depend on environment variables or an initialized process group; DataLoader workers split
with `webdataset.split_by_worker`.
- Fixed mode: every shard is read once per epoch; rank `r` reads shards `r, r + W, ...`, worker `k`
  of a rank every `num_workers`-th of those. Training shuffles the shard list first, with a seed and
  the epoch number shared by all ranks (`webdataset.detshuffle`), so the split stays a partition.
  Ranks may get different numbers of samples: use it on one device, or for evaluation.
- Resampled mode (training on several devices): each worker draws shards with replacement from
  its own seeded stream (seed, rank, worker, epoch) and the epoch is cut to a fixed number of
  batches (`with_epoch`), identical on every rank, so DDP ranks never wait on each other.
Per-epoch reshuffling relies on persistent DataLoader workers (the DataModule enables them), which
keep the stages' epoch counters.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch.utils.data
import webdataset as wds

from avsync.data.member_paths import member_path
from avsync.data.samples import ClipDecoder, collate
from avsync.data.tar_stream import tarfile_to_samples


@dataclass
class ShardSet:
    """Shard URLs and, when a manifest was found beside them, that manifest and per-shard clip counts."""

    urls: list[str]
    manifest: dict | None = None
    clips_per_shard: list[int] | None = None

    @property
    def num_clips(self) -> int | None:
        return None if self.clips_per_shard is None else sum(self.clips_per_shard)


def resolve_shards(spec: str) -> ShardSet:
    """The shards a specification names (see the module docstring); raises if it names none."""
    parts = [part for part in spec.split("::") if part]
    sets = [_resolve_one(part) for part in parts]
    if not sets:
        raise FileNotFoundError(f"no shards in {spec!r}")
    urls = [url for shard_set in sets for url in shard_set.urls]
    counts = None
    if all(s.clips_per_shard is not None for s in sets):
        counts = [n for s in sets for n in s.clips_per_shard]
    return ShardSet(urls=urls, manifest=sets[0].manifest, clips_per_shard=counts)


def _resolve_one(spec: str) -> ShardSet:
    path = Path(spec)
    if path.name == "manifest.json" and path.is_file():
        path = path.parent
    if path.is_dir():
        manifest = _read_manifest(path)
        if manifest is None:
            urls = sorted(str(p) for p in path.glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"{path}: neither a manifest.json nor .tar shards")
            return ShardSet(urls)
        names, counts = _manifest_shards(manifest, path / "manifest.json")
        urls = [str(member_path(path, name, path / "manifest.json")) for name in names]
        return ShardSet(urls, manifest, counts)
    if "{" in spec:
        urls = wds.shardlists.expand_urls(spec)
    elif any(char in spec for char in "*?["):
        urls = sorted(glob.glob(spec))
    else:
        urls = [spec]
    if not urls or ("{" not in spec and not all(os.path.exists(u) or ":" in u for u in urls)):
        raise FileNotFoundError(f"no shards at {spec!r}")
    manifest = _read_manifest(Path(urls[0]).parent) if os.path.exists(urls[0]) else None
    counts = None
    if manifest is not None:
        names, clips = _manifest_shards(manifest, Path(urls[0]).parent / "manifest.json")
        by_name = dict(zip(names, clips, strict=True))
        if all(Path(u).name in by_name for u in urls):
            counts = [by_name[Path(u).name] for u in urls]
    return ShardSet(urls, manifest, counts)


def _read_manifest(directory: Path) -> dict | None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        value = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{manifest}: unreadable shard manifest ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{manifest}: not a shard manifest (a JSON {type(value).__name__}, not an object)")
    return value


def _manifest_shards(manifest: dict, where: Path) -> tuple[list[str], list[int]]:
    """The shard names and clip counts a manifest lists, checked to be what `avsync prepare` writes;
    a name is checked further (a plain file in the manifest's folder) by `member_path`."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ValueError(f"{where}: its `shards` is not a list of {{name, clips}} entries")
    names, counts = [], []
    for entry in shards:
        clips = entry.get("clips")
        if not isinstance(clips, int) or isinstance(clips, bool) or clips < 0:
            raise ValueError(f"{where}: shard {entry.get('name')!r} has clips={clips!r}, not a count")
        names.append(entry.get("name"))
        counts.append(clips)
    return names, counts


class SplitByRank:
    """Pipeline stage: rank `r` of `W` keeps items `r, r + W, ...` (ranks passed in, not looked up)."""

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank, self.world_size = rank, world_size

    def __call__(self, source: Iterable) -> Iterator:
        return islice(source, self.rank, None, self.world_size)


class RankWorkerSeed:
    """`worker_seed` for `ResampledShards`: distinct for every (rank, DataLoader worker)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        info = torch.utils.data.get_worker_info()
        return self.rank * 1000 + (info.id if info is not None else 0)


class NoteDecoded:
    """Pipeline stage: tells the handler (a `SkipCounter`) of every sample that decoded, which ends a
    run of skips (the handler itself only hears of failures)."""

    def __init__(self, handler: Callable[[Exception], bool]) -> None:
        self.passed = getattr(handler, "passed", None)

    def __call__(self, source: Iterable) -> Iterator:
        if self.passed is None:
            yield from source
            return
        for sample in source:
            self.passed()
            yield sample


def build_pipeline(
    urls: list[str],
    decoder: ClipDecoder,
    *,
    batch_size: int,
    handler: Callable[[Exception], bool],
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    batches_per_worker: int | None = None,
    partial: bool = True,
    seed: int = 0,
    normalize_pixels: bool = True,
) -> wds.DataPipeline:
    """A pipeline yielding collated batches (see the module docstring for the two modes).

    `resampled` needs `batches_per_worker`; `shuffle` turns on shard-order and sample shuffling (the
    buffer holds samples after `decoder.pick`, i.e. one JPEG and the spectrogram in train shape).
    `normalize_pixels=False` leaves uint8 frames in the batches (normalized on the device).
    `handler` hears of every failure (and, when it has a `passed()` method, of every decoded sample).
    """
    if resampled:
        if batches_per_worker is None:
            raise ValueError("resampled mode needs batches_per_worker (the fixed epoch length)")
        stages: list = [
            wds.ResampledShards(urls, seed=seed, worker_seed=RankWorkerSeed(rank), deterministic=True)
        ]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
        stages += [SplitByRank(rank, world_size), wds.split_by_worker]
    stages += [tarfile_to_samples(handler=handler), wds.map(decoder.pick, handler=handler)]
    if shuffle and shuffle_buffer > 1:
        initial = min(shuffle_buffer, 100)
        stages.append(wds.detshuffle(bufsize=shuffle_buffer, initial=initial, seed=seed + 1 + rank))
    stages += [
        wds.map(decoder, handler=handler),
        NoteDecoded(handler),
        wds.batched(
            batch_size, collation_fn=functools.partial(collate, normalize=normalize_pixels), partial=partial
        ),
    ]
    pipeline = wds.DataPipeline(*stages)
    if resampled:
        pipeline = pipeline.with_epoch(nbatches=batches_per_worker)
    return pipeline


def fixed_mode_batches(
    clips_per_shard: list[int], rank: int, world_size: int, num_workers: int, batch_size: int, partial: bool
) -> int:
    """Batches one rank yields in fixed mode with unshuffled shards (exact when nothing is skipped)."""
    mine = clips_per_shard[rank::world_size]
    workers = max(1, num_workers)
    round_batches = math.ceil if partial else math.floor
    return sum(round_batches(sum(mine[w::workers]) / batch_size) for w in range(workers))
