"""The files `avsync embed` writes (layouts documented in docs/embedding.md).

npz (numpy, no pickle): `keys (N,)`, `paths (N,)`, `audio (N, T, D)`, `video (N, T, D)` float32, with
`--patches` also `audio_patches (N, T, N_audio, D)` and `video_patches (N, T, N_video, D)`,
`frame_times (N, T)` and `durations (N,)` in seconds, and `metadata`: one JSON string (the model,
the settings, per-clip decoder metadata under `clips`, skipped videos under `failures`).

Parquet (needs pyarrow, `pip install 'avsync[parquet]'`): one row per clip with columns `key`, `path`,
`audio`, `video` (`audio_patches`, `video_patches`), `frame_times`, `duration` - tensors as nested
fixed-size lists - and `metadata` (the clip's JSON); the run metadata (with `failures`) is the JSON
under the `avsync` key of the schema metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from avsync import __version__
from avsync.api.model import EmbeddingRun

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
    or not at all."""
    path = Path(path)
    chosen = format_of(path, output_format)
    metadata = run_metadata(run, model_facts, patches)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
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
