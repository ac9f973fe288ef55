"""The shard sample schema (docs/shards.md): member names and encodings, shared by writer and reader.

One sample per clip, all members named `<key>.<field>`:
`f00.jpg` ... `f15.jpg` (frame `i` at `i * D / T`), `fbank.npy` (float16 `(S, 128)`, the whole clip,
unpadded) and `json` (metadata). JSON is written with sorted keys and no spaces so that the same
clip always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np

#: Bumped whenever a reader of old shards would misread new ones.
SCHEMA_VERSION = 1
FBANK_FIELD = "fbank.npy"
METADATA_FIELD = "json"
#: Longest sample key kept as is; longer ids are cut and given a hash suffix (tar member names are
#: limited to 100 characters in the portable ustar format).
MAX_KEY_LENGTH = 80


def frame_field(index: int) -> str:
    return f"f{index:02d}.jpg"


def sample_key(clip_id: str) -> str:
    """A tar-safe WebDataset key for `clip_id`: only `[A-Za-z0-9_-]` (dots would split the key)."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", clip_id) or "_"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 9]}_{hashlib.sha1(clip_id.encode()).hexdigest()[:8]}"
    return key


def stable_json(value: object, indent: int | None = None) -> bytes:
    """JSON bytes that depend only on `value` (sorted keys, fixed separators, UTF-8)."""
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(
        value, sort_keys=True, separators=separators, indent=indent, ensure_ascii=False
    ).encode()


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(key: str, frames: list[bytes], fbank: np.ndarray, metadata: dict) -> dict[str, bytes | str]:
    """The `TarWriter` dict for one clip."""
    sample: dict[str, bytes | str] = {"__key__": key}
    for index, jpeg in enumerate(frames):
        sample[frame_field(index)] = jpeg
    sample[FBANK_FIELD] = encode_npy(fbank.astype(np.float16, copy=False))
    sample[METADATA_FIELD] = stable_json(metadata)
    return sample
