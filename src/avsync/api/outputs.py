"""The files `avsync embed` writes (layouts documented in docs/embedding.md).

npz (numpy, no pickle): `keys (N,)`, `paths (N,)`, `audio (N, T, D)`, `video (N, T, D)` float32, with
`--patches` also `audio_patches (N, T, N_audio, D)` and `video_patches (N, T, N_video, D)`,
`frame_times (N, T)` and `durations (N,)` in seconds, and `metadata`: one JSON string (the model,
the settings, per-clip decoder metadata under `clips`, skipped videos under `failures`).

Parquet (needs pyarrow, `pip install 'avsync[parquet]'`): one row per clip with columns `key`, `path`,
`audio`, `video` (`audio_patches`, `video_patches`), `frame_times`, `duration` - tensors as nested
fixed-size lists - and `metadata` (the clip's JSON); the run metadata (with `failures`) is the JSON
under the `avsync` key of the schema metadata.

`avsync embed --shards` (`embed_shards`) writes a directory instead: per rank float16 npz parts
(`keys`, `audio`, `video`), an index of each rank's parts, and a `manifest.json` (`ShardEmbeddingWriter`,
the prediction writer of that `Trainer.predict`); `read_shard_embeddings` reads it back.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from avsync import __version__
from avsync.api.model import EmbeddingRun
from avsync.data.member_paths import member_path
from avsync.output_paths import OutputError, check_output_file, check_output_folder, same_file
from avsync.tasks.features import FeatureWriter, atomic_write_text

OutputFormat = Literal["npz", "parquet"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("npz", "parquet")
#: Version of the output layout; bumped whenever a reader of old files would misread new ones.
EMBEDDINGS_FORMAT_VERSION = 1
PARQUET_METADATA_KEY = b"avsync"
MISSING_PYARROW = (
    "writing parquet needs pyarrow, which is not installed: pip install 'avsync[parquet]' "
    "(or pip install pyarrow), or write npz instead (--format npz / an .npz path)"
)


def format_of(path: str | Path, requested: OutputFormat | None = None) -> OutputFormat:
    """The requested format, else the one the suffix names (`.parquet`, `.pq`), else npz."""
    if requested is not None:
        if requested not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {requested!r}; choose one of {OUTPUT_FORMATS}")
        return requested
    return "parquet" if Path(path).suffix.lower() in (".parquet", ".pq") else "npz"


def require_pyarrow() -> None:
    """Fail before any work is done when parquet was asked for and cannot be written."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError(MISSING_PYARROW) from error


def is_embeddings_file(path: str | Path) -> bool:
    """Whether `path` is an `avsync embed` output, the only kind of existing file `--out` replaces: an
    npz whose `metadata` is the JSON `run_metadata` writes (with `format_version` and `avsync_version`),
    or a parquet file with that JSON under the `avsync` key of its schema metadata."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"keys", "audio", "video", "metadata"} <= set(data.files):
                return False
            metadata = json.loads(str(data["metadata"]))
    except (OSError, ValueError, EOFError, TypeError, AttributeError):  # not an npz (a .npy, a pickle)
        metadata = _parquet_metadata(path)
    return isinstance(metadata, dict) and {"format_version", "avsync_version"} <= set(metadata)


def check_embeddings_out(path: str | Path, inputs: list[str | Path]) -> Path:
    """`path` as the output file of `avsync embed`: not one of the `inputs` (videos), not a folder, and
    when it exists an earlier embed output (`is_embeddings_file`); `OutputError` otherwise."""
    return check_output_file(
        path,
        inputs=inputs,
        ours=is_embeddings_file,
        what="an avsync embed output (an npz or parquet file with avsync's embedding metadata)",
    )


def _parquet_metadata(path: str | Path) -> dict | None:
    try:
        import pyarrow.parquet as pq

        stored = (pq.read_schema(path).metadata or {}).get(PARQUET_METADATA_KEY)
        return json.loads(stored) if stored else None
    except Exception:  # no pyarrow, or not a parquet file: not recognised
        return None


def run_metadata(run: EmbeddingRun, model_facts: dict, patches: bool) -> dict:
    """Everything about the run that is not an array: how the model embedded, and what was skipped."""
    return {
        "format_version": EMBEDDINGS_FORMAT_VERSION,
        "avsync_version": __version__,
        **model_facts,
        "patches": patches,
        "num_clips": len(run.embeddings),
        "failures": [failure.to_json() for failure in run.failures],
    }


def arrays(run: EmbeddingRun, patches: bool) -> dict[str, np.ndarray]:
    """The per-clip arrays shared by both formats, stacked over clips."""
    if not run.embeddings:
        raise ValueError("no embeddings to write: every video failed")
    out = {
        "keys": np.array(run.keys, dtype=np.str_),
        "paths": np.array([e.path for e in run.embeddings], dtype=np.str_),
        "audio": run.audio.numpy(),
        "video": run.video.numpy(),
    }
    if patches:
        out["audio_patches"] = np.stack([e.audio_patches.numpy() for e in run.embeddings])
        out["video_patches"] = np.stack([e.video_patches.numpy() for e in run.embeddings])
    out["frame_times"] = np.array([e.frame_times for e in run.embeddings], dtype=np.float64)
    out["durations"] = np.array([e.metadata["duration"] for e in run.embeddings], dtype=np.float64)
    return out


def write_embeddings(
    run: EmbeddingRun,
    path: str | Path,
    model_facts: dict,
    *,
    patches: bool,
    output_format: OutputFormat | None = None,
) -> Path:
    """Write `run` to `path` (format: `output_format`, else from the suffix); the file appears complete
    or not at all. Refused (`OutputError`) over one of the run's videos or over an existing file that
    is not an earlier `avsync embed` output (`check_embeddings_out`)."""
    path = Path(path)
    chosen = format_of(path, output_format)
    check_embeddings_out(path, [e.path for e in run.embeddings] + [f.path for f in run.failures])
    metadata = run_metadata(run, model_facts, patches)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: a user's `<name>.partial` beside the output is not this run's to replace
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        (_write_npz if chosen == "npz" else _write_parquet)(run, partial, metadata, patches)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path


def _write_npz(run: EmbeddingRun, path: Path, metadata: dict, patches: bool) -> None:
    metadata = {**metadata, "clips": [e.metadata for e in run.embeddings]}
    with path.open("wb") as handle:  # a handle: numpy would append `.npz` to a path lacking it
        np.savez(handle, **arrays(run, patches), metadata=np.array(json.dumps(metadata)))


def _write_parquet(run: EmbeddingRun, path: Path, metadata: dict, patches: bool) -> None:
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    def nested(array: np.ndarray) -> pa.Array:
        """`(N, a, b, ...)` -> a column of N nested fixed-size lists (shape kept in the type)."""
        column = pa.array(np.ascontiguousarray(array).reshape(-1))
        for size in reversed(array.shape[1:]):
            column = pa.FixedSizeListArray.from_arrays(column, size)
        return column

    row_names = {"keys": "key", "paths": "path", "durations": "duration"}
    columns = {
        row_names.get(name, name): nested(value) if value.ndim > 1 else pa.array(value.tolist())
        for name, value in arrays(run, patches).items()
    }
    columns["metadata"] = pa.array([json.dumps(e.metadata) for e in run.embeddings])
    table = pa.table(columns).replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(metadata).encode()})
    pq.write_table(table, path)


# ------------------------------------------------------------------ `avsync embed --shards`: a directory
#: One part file of one rank; `part` counts on across runs, so a resumed run never overwrites a part.
SHARD_PART = "embeddings-rank{rank}-{part:05d}.npz"
SHARD_MANIFEST = "manifest.json"
_PART_PATTERN = re.compile(r"embeddings-rank(\d+)-(\d+)\.npz")


def _index_name(rank: int) -> str:
    return f"index-rank{rank}.json"


def _part_keys(path: Path) -> list[str]:
    try:
        with np.load(path) as data:
            return [str(key) for key in data["keys"]]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: unreadable embeddings part ({error}); delete it and run again") from None


def written_parts(directory: str | Path, settings: dict | None = None) -> dict[str, list[str]]:
    """Part file name -> its clip ids, for every complete part in `directory`: from the per-rank
    indexes, and for a part renamed into place just before a crash (not yet indexed) from the part
    itself. With `settings`, a directory written with other settings is refused."""
    directory = Path(directory)
    parts: dict[str, list[str]] = {}
    for path in sorted([*directory.glob("index-rank*.json"), *directory.glob(SHARD_MANIFEST)]):
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{path}: unreadable index ({error}); delete it and run again") from None
        if not isinstance(index, dict):
            kind = type(index).__name__
            raise ValueError(f"{path}: not an embed index (a JSON {kind}); delete it and run again")
        if settings is not None and index.get("settings") != settings:
            changed = sorted(
                name
                for name in {*settings, *index.get("settings", {})}
                if settings.get(name) != index.get("settings", {}).get(name)
            )
            raise ValueError(
                f"{directory}: holds embeddings made with other settings ({', '.join(changed)} differ); "
                "give another --out, or delete it"
            )
        if path.name != SHARD_MANIFEST:
            listed = index.get("parts")
            if not isinstance(listed, dict):
                raise ValueError(f"{path}: unreadable index (its `parts` is not a name -> clip ids map)")
            for name, keys in listed.items():
                member_path(directory, name, path)  # a plain file in this folder, or refused
                parts[name] = keys
    for path in sorted(directory.glob("embeddings-rank*-*.npz")):
        if path.name not in parts and _PART_PATTERN.fullmatch(path.name):
            parts[path.name] = _part_keys(path)
    return {name: keys for name, keys in sorted(parts.items()) if (directory / name).is_file()}


def check_shard_embeddings_out(directory: str | Path, shards: str | Path | None = None) -> Path:
    """`directory` as the output of `avsync embed --shards`, before any work: a folder (new or
    existing), not the shard folder, and without a `manifest.json` of anything else (an embed manifest
    holds `settings` and `parts`): the one file of another program this writer would replace."""
    directory = check_output_folder(directory)
    if shards is not None and same_file(directory, shards):
        raise OutputError(f"--out {directory}: is the shard folder; give another folder for the embeddings")
    manifest = directory / SHARD_MANIFEST
    if manifest.exists() or manifest.is_symlink():
        try:
            stored = json.loads(manifest.read_text()) if manifest.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            stored = None
        if not (isinstance(stored, dict) and {"settings", "parts"} <= set(stored)):
            raise OutputError(
                f"--out {directory}: its {SHARD_MANIFEST} is not one of avsync embed --shards (no `settings` "
                "and `parts`), so it is not replaced; give another folder"
            )
    return directory


class ShardEmbeddingWriter(FeatureWriter):
    """The prediction writer of `avsync embed --shards`: rank `r` writes `embeddings-rank{r}-*.npz`
    (`keys`, `audio` and `video` `(n, T, D)` float16), each renamed into place complete, then records
    it in `index-rank{r}.json` (rewritten atomically). On start every rank reads what earlier runs
    wrote and tells the extractor to skip those clips; at the end rank 0 writes `manifest.json`."""

    def __init__(self, directory: str | Path, settings: dict, facts: dict, clips_per_part: int = 4096):
        super().__init__(clips_per_part, float16=("audio", "video"))
        self.directory, self.settings, self.facts = Path(directory), settings, facts
        self.index: dict[str, list[str]] = {}
        self.first_part = 0
        self.resumed = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier()
        done = written_parts(self.directory, self.settings)
        prefix = f"embeddings-rank{self.rank}-"
        self.index = {name: keys for name, keys in done.items() if name.startswith(prefix)}
        numbers = [
            int(match.group(2))
            for path in self.directory.glob(f"{prefix}*.npz")
            if (match := _PART_PATTERN.fullmatch(path.name)) and int(match.group(1)) == self.rank
        ]
        self.first_part = max(numbers, default=-1) + 1
        if self.index:  # parts of this rank's that a crash left unindexed are indexed now
            self._write_index()
        done_keys = {key for keys in done.values() for key in keys}
        self.resumed = len(done_keys)
        pl_module.skip_keys |= done_keys
        trainer.strategy.barrier()  # every rank knows what is written before any rank writes

    def save_part(self, index: int, arrays: dict, keys: list[str]) -> None:
        name = SHARD_PART.format(rank=self.rank, part=self.first_part + index)
        partial = self.directory / f".{name}.partial"
        with partial.open("wb") as handle:
            np.savez(
                handle,
                keys=np.array(keys, dtype=np.str_),
                audio=arrays["audio"].numpy(),
                video=arrays["video"].numpy(),
            )
        os.replace(partial, self.directory / name)
        self.index[name] = keys
        self._write_index()

    def _write_index(self) -> None:
        index_text = json.dumps({"settings": self.settings, "parts": self.index})
        atomic_write_text(self.directory / _index_name(self.rank), index_text)

    def report(self, trainer) -> dict:
        skipped = getattr(trainer.datamodule, "skipped_samples", {}) if trainer.datamodule else {}
        return {**super().report(trainer), "skipped_samples": sum(skipped.values())}

    def merge(self, reports: list[dict]) -> None:
        parts = written_parts(self.directory, self.settings)
        seen: set[str] = set()
        repeated = 0
        for keys in parts.values():
            repeated += sum(key in seen for key in keys)
            seen.update(keys)
        manifest = {
            "format_version": EMBEDDINGS_FORMAT_VERSION,
            "avsync_version": __version__,
            **self.facts,
            "settings": self.settings,
            "num_clips": len(seen),
            "repeated_clips": repeated,
            "parts": [{"name": name, "clips": len(keys)} for name, keys in parts.items()],
            "last_run": {
                "world_size": len(reports),
                "embedded": sum(report["clips"] for report in reports),
                "already_written": self.resumed,
                "skipped_samples": sum(report["skipped_samples"] for report in reports),
            },
        }
        atomic_write_text(self.directory / SHARD_MANIFEST, json.dumps(manifest, indent=1))


def read_shard_embeddings(directory: str | Path) -> dict[str, np.ndarray]:
    """`keys (N,)`, `audio`/`video` `(N, T, D)` float16 of an `avsync embed --shards` directory: its
    parts in name order, each clip id once (the first)."""
    directory = Path(directory)
    keys, audio, video = [], [], []
    seen: set[str] = set()
    for name in written_parts(directory):
        with np.load(directory / name) as data:
            rows = [i for i, key in enumerate(data["keys"]) if key not in seen and not seen.add(key)]
            keys += [str(data["keys"][i]) for i in rows]
            audio.append(data["audio"][rows])
            video.append(data["video"][rows])
    if not keys:
        raise ValueError(f"{directory}: holds no embeddings")
    return {"keys": np.array(keys), "audio": np.concatenate(audio), "video": np.concatenate(video)}


def embed_shards(
    shards: str,
    checkpoint: str | Path,
    out: str | Path,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    num_nodes: int = 1,
    precision: str | None = None,
    alignment: str | None = None,
    num_frames: int = 16,
    clips_per_part: int = 4096,
    progress: bool = False,
    **authors_kwargs,
) -> dict:
    """Embed every clip of prepared shards into `out` (a directory, see `ShardEmbeddingWriter`) with a
    `Trainer.predict` on `devices` x `num_nodes` (run under torchrun or SLURM for several nodes), and
    return its manifest. A rerun into the same directory embeds only the clips not yet written."""
    from avsync.checkpoints import load_backbone
    from avsync.data.alignment import default_alignment
    from avsync.data.datamodule import AVShardDataModule
    from avsync.data.pipeline import resolve_shards
    from avsync.tasks.features import FeatureExtractor, predict, predict_trainer
    from avsync.tasks.probe.features import fingerprint

    shard_set = resolve_shards(str(shards))
    if shard_set.manifest is None:
        raise ValueError(f"{shards}: no manifest.json beside the shards (written by avsync prepare)")
    check_shard_embeddings_out(out, Path(shard_set.urls[0]).parent)  # before the model is read
    backbone = load_backbone(checkpoint, **authors_kwargs).eval().requires_grad_(False)
    alignment = alignment or default_alignment(backbone.audio_length)
    cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", None: "bf16-mixed" if cuda else "32-true"}[
        precision
    ]
    settings = {
        "backbone": fingerprint(backbone),
        "alignment": alignment,
        "num_frames": num_frames,
        "precision": precision,
    }
    facts = {
        "shards": str(shards),
        "checkpoint": str(Path(checkpoint).resolve()),
        "weights_digest": settings["backbone"],  # what `avsync index search` checks its query model by
        "backbone_config": dict(backbone.config),
        "embed_dim": backbone.embed_dim,
        "image_size": backbone.image_size,
        "audio_length": backbone.audio_length,
        "dtype": "float16",
    }
    datamodule = AVShardDataModule(
        predict_shards=str(shards),
        eval_batch_size=batch_size,
        num_workers=num_workers,
        num_frames=num_frames,
        alignment=alignment,
    )

    def extract(batch: dict) -> dict:
        encoded = backbone.encode(batch["audio"], batch["video"])
        return {"audio": encoded.global_audio, "video": encoded.global_video}

    extractor = FeatureExtractor(extract, backbone=backbone, name=str(shards))
    writer = ShardEmbeddingWriter(out, settings, facts, clips_per_part)
    world = (len(devices) if isinstance(devices, list) else devices) * num_nodes
    trainer = predict_trainer(
        [writer],
        progress=progress,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if world > 1 else "auto",
        precision=precision,
    )
    predict(trainer, extractor, datamodule)
    return json.loads((Path(out) / SHARD_MANIFEST).read_text())
