"""`avsync index`: build an index of a gallery's clips, open it, search it.

On disk an index is a directory:

| file | content |
|---|---|
| `index.json` | `kind` (`exact`, `compressed`), sizes, settings, source files, model, build times |
| `ids.npy` | the clip ids, row order |
| `audio.faiss`, `video.faiss` | one FAISS index per gallery modality |

One index per modality, because retrieval is cross-modal: an audio query is searched among the video
tokens (`video.faiss`) and a video query among the audio tokens (`audio.faiss`).

- `exact`: `IndexFlatIP` over the diagonal-mean vectors (`vectors.py`): scores equal the diagonal mean
  of `avsync.evaluation` and the ranking is exhaustive. 48 KiB per clip and modality at 16 x 768.
- `compressed`: PCA + 4-bit scan + 8-bit re-scoring (`compressed.py`), about 1.1 KB per clip and
  modality; approximate scores, optionally re-ranked exactly from the embeddings it was built from.

Where FAISS has GPUs (`faiss-gpu` installed and `faiss.get_num_gpus() > 0`) an exact index is searched on
them; the compressed chain (fast-scan, refine) runs on the CPU.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from avsync.data.member_paths import UnsafeNameError, member_path
from avsync.search.compressed import (
    MIN_CLIPS,
    CompressedSettings,
    Projector,
    add_projected,
    build_structure,
    fit_pca,
    set_candidates,
)
from avsync.search.gallery import MODALITIES, Gallery, GalleryError
from avsync.search.vectors import diagonal_mean_vectors, tokens_of_vectors

FORMAT_VERSION = 1
INDEX_JSON, IDS_FILE = "index.json", "ids.npy"
Kind = Literal["exact", "compressed"]
KINDS: tuple[Kind, ...] = ("exact", "compressed")
#: The gallery modality a query of each modality is searched in.
TARGET = {"audio": "video", "video": "audio"}
DIRECTION = {"audio": "audio_to_video", "video": "video_to_audio"}
#: Model facts copied from the embedding run into index.json (queries from files are embedded alike).
#: `checkpoint` is the absolute path and `weights_digest` what a query model must match (`query_model`).
MODEL_FACTS = (
    "checkpoint",
    "weights_digest",
    "alignment",
    "num_frames",
    "embed_dim",
    "precision",
    "backbone_config",
)


class SearchError(ValueError):
    """An index or a query that cannot be used; the message names the file and the problem."""


class Source(Protocol):
    """What `build_index` reads: a `Gallery`, or anything with the same members (the benchmark's
    synthetic gallery)."""

    ids: np.ndarray
    modalities: tuple[str, ...]
    steps: int
    dim: int
    metadata: dict

    @property
    def num_clips(self) -> int: ...

    def describe(self) -> dict: ...

    def chunks(self, size: int, modalities: Sequence[str] | None = None): ...

    def tokens(self, modality: str, rows) -> np.ndarray: ...

    def sample_rows(self, count: int, seed: int = 0) -> np.ndarray: ...


def _faiss():
    import faiss

    return faiss


# ---------------------------------------------------------------------------------------------- build
def build_index(
    source: Source | str | Path,
    out: str | Path,
    *,
    kind: Kind = "compressed",
    modalities: Sequence[str] | None = None,
    settings: CompressedSettings | None = None,
    chunk_clips: int = 8192,
    overwrite: bool = False,
    on_chunk: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Index `source` (a `Gallery`, an `avsync embed` output path, or a `Source`) into directory `out`.

    Every modality is built in one pass over the gallery, `chunk_clips` clips at a time; `on_chunk(first
    row, {modality: diagonal-mean vectors (n, T * D)})` sees each chunk as it is added. The files are
    written under temporary names and `index.json` last, so a directory with `index.json` holds a
    complete index.
    """
    if kind not in KINDS:
        raise SearchError(f"unknown index kind {kind!r}; choose one of {KINDS}")
    settings = settings or CompressedSettings()
    gallery = Gallery.open(source) if isinstance(source, str | Path) else source
    modalities = tuple(modalities or gallery.modalities)
    for modality in modalities:
        if modality not in MODALITIES:
            raise SearchError(f"unknown modality {modality!r}; choose from {MODALITIES}")
        if modality not in gallery.modalities:
            raise SearchError(f"the gallery holds no {modality} tokens (it has {list(gallery.modalities)})")
    if kind == "compressed" and gallery.num_clips < MIN_CLIPS:
        raise SearchError(
            f"a compressed index is learned from its gallery and needs at least {MIN_CLIPS:,} clips; this "
            f"one has {gallery.num_clips:,}: build an exact index (--kind exact)"
        )
    where = str(source) if isinstance(source, str | Path) else "the gallery"
    model = {name: gallery.metadata[name] for name in MODEL_FACTS if name in gallery.metadata}
    _check_model_facts(model, f"{where} (its embedding metadata)")
    out = Path(out)
    _prepare_directory(out, overwrite)
    say = log or (lambda message: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if kind == "exact":
        indexes = {m: _faiss().IndexFlatIP(gallery.steps * gallery.dim) for m in modalities}
        projectors = {m: None for m in modalities}
    else:
        indexes, projectors = _train_compressed(gallery, modalities, settings, say, where)
        timings["train_s"] = round(time.perf_counter() - started, 2)
    added, reported = time.perf_counter(), 0
    for first, chunk in gallery.chunks(chunk_clips, modalities):
        ids = np.asarray(gallery.ids[first : first + len(next(iter(chunk.values())))])
        vectors = {m: _unit_vectors(chunk.pop(m), f"{m} tokens", ids, where) for m in modalities}
        if on_chunk is not None:
            on_chunk(first, vectors)
        for modality in modalities:
            if projectors[modality] is None:
                indexes[modality].add(vectors[modality])
            else:
                add_projected(indexes[modality], projectors[modality](vectors[modality]))
        done = first + len(next(iter(vectors.values())))
        if done * 10 // gallery.num_clips > reported or done == gallery.num_clips:  # every 10 %
            reported = done * 10 // gallery.num_clips
            say(f"{done:,} of {gallery.num_clips:,} clips added")
    timings["add_s"] = round(time.perf_counter() - added, 2)
    files = {}
    for modality, index in indexes.items():
        if index.ntotal != gallery.num_clips:
            raise RuntimeError(f"{modality} index holds {index.ntotal} vectors for {gallery.num_clips} clips")
        files[modality] = f"{modality}.faiss"
        partial = out / f".{modality}.faiss.partial"
        _faiss().write_index(index, str(partial))
        os.replace(partial, out / files[modality])
    np.save(out / f".{IDS_FILE}.partial.npy", np.asarray(gallery.ids, dtype=np.str_))
    os.replace(out / f".{IDS_FILE}.partial.npy", out / IDS_FILE)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    facts = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "num_clips": int(gallery.num_clips),
        "steps": gallery.steps,
        "dim": gallery.dim,
        "modalities": list(modalities),
        "files": files,
        "bytes": {m: (out / name).stat().st_size for m, name in files.items()},
        "settings": settings.as_dict() if kind == "compressed" else {},
        "source": gallery.describe(),
        "model": model,
        "faiss_version": _faiss().__version__,
        "build": timings,
    }
    partial = out / f".{INDEX_JSON}.partial"
    partial.write_text(json.dumps(facts, indent=1))
    os.replace(partial, out / INDEX_JSON)
    return out


def _prepare_directory(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SearchError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / INDEX_JSON).is_file():
            raise SearchError(f"{out}: a directory that holds other files; give a new or empty one")
        if not _is_index_json(out / INDEX_JSON):  # even --overwrite replaces only an index of avsync's
            raise SearchError(
                f"{out / INDEX_JSON}: not an avsync index description (no format_version, kind and files), "
                "so it is not replaced; give a new or empty directory"
            )
        if not overwrite:
            raise SearchError(f"{out}: already holds an index; pass --overwrite to replace it")
        (out / INDEX_JSON).unlink()  # incomplete until the new one is written
    out.mkdir(parents=True, exist_ok=True)


def _is_index_json(path: Path) -> bool:
    """Whether `path` reads as the `index.json` that `build_index` writes (whatever its version)."""
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(facts, dict) and {"format_version", "kind", "files"} <= set(facts)


def _unit_vectors(tokens: np.ndarray, name: str, ids: np.ndarray, where: str) -> np.ndarray:
    """`diagonal_mean_vectors` of gallery clips `ids`; tokens without a direction (NaN, inf, all zero:
    a model or an embedding run gone wrong) are a `SearchError` naming the gallery and the clips."""
    try:
        return diagonal_mean_vectors(tokens, name, ids=ids)
    except ValueError as error:
        raise SearchError(
            f"{where}: {error}; an index needs finite embeddings (embed those clips again)"
        ) from None


def _train_compressed(
    gallery: Source, modalities: Sequence[str], settings: CompressedSettings, say, where: str = "the gallery"
):
    """A PCA basis and trained quantizers per modality, from `settings.train_clips` sampled clips."""
    rows = gallery.sample_rows(settings.train_clips, settings.seed)
    indexes, projectors = {}, {}
    for modality in modalities:
        say(f"learning the {modality} PCA and quantizers on {len(rows):,} clips")
        vectors = _unit_vectors(
            gallery.tokens(modality, rows), f"{modality} tokens", gallery.ids[rows], where
        )
        basis = fit_pca(vectors, settings.pca_dim, settings.seed)
        projectors[modality] = Projector(basis, settings.projection)
        indexes[modality] = build_structure(basis, projectors[modality](vectors), settings)
        del vectors
    return indexes, projectors


# --------------------------------------------------------------------------------------------- search
@dataclass
class Hits:
    """The best gallery clips for one query, best first: `rows`, `ids`, `scores` (diagonal mean, exact
    when `exact`)."""

    rows: np.ndarray
    ids: list[str]
    scores: np.ndarray
    exact: bool

    def to_json(self) -> list[dict]:
        return [
            {"rank": rank, "clip": clip, "score": round(float(score), 6)}
            for rank, (clip, score) in enumerate(zip(self.ids, self.scores, strict=True), start=1)
        ]


class SearchIndex:
    """An index directory opened for searching (the FAISS files are read when first needed)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        facts_path = self.directory / INDEX_JSON
        if not facts_path.is_file():
            what = "no such directory" if not self.directory.exists() else f"no {INDEX_JSON}"
            raise SearchError(f"{self.directory}: not an index ({what}); build one with `avsync index build`")
        try:
            self.facts = json.loads(facts_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SearchError(f"{facts_path}: unreadable ({error})") from None
        except RecursionError:
            raise SearchError(f"{facts_path}: unreadable (JSON nested too deeply to be an index)") from None
        _check_facts(self.facts, facts_path)
        self.kind: Kind = self.facts["kind"]
        self.steps, self.dim = self.facts["steps"], self.facts["dim"]
        self.num_clips = self.facts["num_clips"]
        self._indexes: dict = {}  # searched (on GPUs where FAISS has them, exact only)
        self._cpu: dict = {}  # the same, as read (reconstructs rows)
        self._ids: np.ndarray | None = None
        self._rows: dict[str, int] | None = None
        self._gallery: Gallery | None = None

    # ------------------------------------------------------------------ parts
    @property
    def modalities(self) -> list[str]:
        return list(self.facts["modalities"])

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            path = self.directory / IDS_FILE
            try:
                self._ids = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise SearchError(f"{path}: unreadable clip ids ({error})") from None
            if len(self._ids) != self.num_clips:
                raise SearchError(f"{path}: {len(self._ids)} ids for an index of {self.num_clips} clips")
        return self._ids

    def row_of(self, clip_id: str) -> int:
        if self._rows is None:
            self._rows = {str(key): row for row, key in enumerate(self.ids)}
        if clip_id not in self._rows:
            import difflib

            near = (
                difflib.get_close_matches(clip_id, list(self._rows), n=3) if self.num_clips <= 50_000 else []
            )
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise SearchError(
                f"{self.directory}: no clip {clip_id!r} among its {self.num_clips:,} clips{hint}"
            )
        return self._rows[clip_id]

    def faiss_index(self, modality: str):
        """The FAISS index over the gallery's `modality` tokens."""
        if modality not in self._indexes:
            if modality not in self.modalities:
                raise SearchError(
                    f"{self.directory}: holds no {modality} gallery (built for {self.modalities}); a "
                    f"{_query_of(modality)} query searches the {modality} tokens"
                )
            try:
                path = member_path(self.directory, self.facts["files"][modality], self.directory / INDEX_JSON)
            except UnsafeNameError as error:
                raise SearchError(str(error)) from None
            if not path.is_file():
                raise SearchError(f"{path}: missing (the index directory is incomplete; rebuild it)")
            faiss = _faiss()
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as error:
                raise SearchError(
                    f"{path}: not a readable FAISS index ({str(error).splitlines()[0]})"
                ) from None
            if index.d != self.steps * self.dim or index.ntotal != self.num_clips:
                raise SearchError(
                    f"{path}: holds {index.ntotal} vectors of {index.d} dimensions; {INDEX_JSON} says "
                    f"{self.num_clips} of {self.steps} x {self.dim}"
                )
            self._cpu[modality] = index
            self._indexes[modality] = _on_gpu(index) if self.kind == "exact" else index
        return self._indexes[modality]

    def gallery(self) -> Gallery:
        """The embeddings the index was built from, checked against what `index.json` recorded."""
        if self._gallery is None:
            source = self.facts.get("source", {})
            files = source.get("files") or []
            if source.get("kind") not in ("npz", "embed --shards") or not files:
                raise SearchError(
                    f"{self.directory}: built from {source.get('kind', 'an unknown source')}, so the "
                    "embeddings behind it cannot be read (build from an `avsync embed` output)"
                )
            for entry in files:
                path = Path(entry["path"])
                if not path.is_file():
                    raise SearchError(f"{path}: the embeddings this index was built from are missing")
                if path.stat().st_size != entry["bytes"]:
                    raise SearchError(f"{path}: changed since the index was built; rebuild the index")
            first = Path(files[0]["path"])
            gallery = Gallery.open(first.parent if source["kind"] == "embed --shards" else first)
            if gallery.num_clips != self.num_clips or (gallery.steps, gallery.dim) != (self.steps, self.dim):
                raise SearchError(f"{first}: no longer matches the index; rebuild the index")
            self._gallery = gallery
        return self._gallery

    # ------------------------------------------------------------------ queries
    def clip_tokens(self, clip_id: str, modality: str) -> np.ndarray:
        """`(T, D)` tokens of gallery clip `clip_id` in `modality`: from the exact index itself, else
        from the embeddings the index was built from."""
        row = self.row_of(clip_id)
        if self.kind == "exact" and modality in self.modalities:
            self.faiss_index(modality)
            vector = self._cpu[modality].reconstruct(row)
            return tokens_of_vectors(vector[None], self.steps)[0]
        try:
            gallery = self.gallery()
            return gallery.tokens(modality, [row])[0]
        except GalleryError as error:
            raise SearchError(str(error)) from None

    def check_query(self, tokens: np.ndarray, what: str = "query") -> np.ndarray:
        """`(T, D)` or `(B, T, D)` query tokens as `(B, T, D)`, refused unless they match the index."""
        tokens = np.asarray(tokens, dtype=np.float32)
        tokens = tokens[None] if tokens.ndim == 2 else tokens
        if tokens.ndim != 3 or tokens.shape[1:] != (self.steps, self.dim):
            shape = "x".join(str(n) for n in tokens.shape[-2:]) if tokens.ndim >= 2 else str(tokens.shape)
            raise SearchError(
                f"{what}: dimension mismatch: {shape} tokens (time steps x dim) against an index of "
                f"{self.steps}x{self.dim} ({self.directory}); embed the query with the model and frame "
                "count the gallery was embedded with"
            )
        return tokens

    def search(
        self,
        tokens: np.ndarray,
        modality: str,
        k: int = 10,
        *,
        candidates: int | None = None,
        rerank: int = 0,
    ) -> list[Hits]:
        """The top-`k` gallery clips for each query: `tokens` `(T, D)` or `(B, T, D)` of the query
        `modality`, searched among the other modality's tokens.

        Compressed index: `candidates` per query from the 4-bit scan (default: the build setting) are
        re-scored in 8 bits; `rerank > 0` then re-scores the best `max(rerank, k)` exactly from the
        stored embeddings, so that the order and the scores of those are exact.
        """
        if modality not in TARGET:
            raise SearchError(f"unknown query modality {modality!r}; choose audio or video")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        tokens = self.check_query(tokens)
        target = TARGET[modality]
        index = self.faiss_index(target)
        try:
            queries = diagonal_mean_vectors(tokens, f"{modality} query")
        except ValueError as error:  # NaN or all-zero query tokens
            raise SearchError(str(error)) from None
        k = min(k, self.num_clips)
        depth = min(max(rerank, k), self.num_clips) if rerank and self.kind == "compressed" else k
        if self.kind == "compressed":
            settings = self.facts.get("settings", {})
            set_candidates(index, depth, candidates or settings.get("candidates", 2000))
        scores, rows = index.search(queries, depth)
        hits = []
        for query, (row_scores, row_ids) in enumerate(zip(scores, rows, strict=True)):
            keep = row_ids >= 0
            row_scores, row_ids = row_scores[keep], row_ids[keep]
            exact = self.kind == "exact"
            if rerank and not exact:
                row_scores, row_ids = self._exact_scores(queries[query], target, row_ids)
                exact = True
            order = np.argsort(-row_scores, kind="stable")[:k]
            row_ids = row_ids[order]
            hits.append(Hits(row_ids, [str(self.ids[r]) for r in row_ids], row_scores[order], exact))
        return hits

    def _exact_scores(self, query: np.ndarray, modality: str, rows: np.ndarray):
        try:
            tokens = self.gallery().tokens(modality, rows)
        except GalleryError as error:
            raise SearchError(f"exact re-ranking: {error}") from None
        vectors = _unit_vectors(
            tokens, f"{modality} gallery", self.ids[rows], f"exact re-ranking: {self.directory}"
        )
        return vectors @ query, rows


def open_index(directory: str | Path) -> SearchIndex:
    return SearchIndex(directory)


def _query_of(gallery_modality: str) -> str:
    return next(query for query, target in TARGET.items() if target == gallery_modality)


def _on_gpu(index):
    """An exact index on every GPU FAISS sees (faiss-gpu), else as it is."""
    faiss = _faiss()
    if hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


# ----------------------------------------------------------------------------------------- index.json
def _check_facts(facts: object, path: Path) -> None:
    """Refuse an `index.json` that `SearchIndex` cannot use, with the entry that is wrong: it is data
    read from disk (edited by hand, cut short, written by another tool), never trusted as built."""

    def fail(problem: str) -> None:
        raise SearchError(f"{path}: {problem}; rebuild the index with `avsync index build`")

    if not isinstance(facts, dict):
        fail(f"holds a JSON {type(facts).__name__}, not an index description (an object)")
    version = facts.get("format_version")
    if version != FORMAT_VERSION:
        raise SearchError(f"{path}: index format {version!r}, this avsync reads {FORMAT_VERSION}; rebuild it")
    for name in ("kind", "num_clips", "steps", "dim", "modalities", "files"):
        if name not in facts:
            fail(f"has no `{name}`")
    if facts["kind"] not in KINDS:
        fail(f"`kind` is {facts['kind']!r:.80}, not one of {list(KINDS)}")
    for name in ("num_clips", "steps", "dim"):
        value = facts[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"`{name}` is {value!r:.80}, not a positive integer")
    modalities = facts["modalities"]
    if (
        not isinstance(modalities, list)
        or not modalities
        or len(set(map(str, modalities))) != len(modalities)
        or not all(m in MODALITIES for m in modalities)
    ):
        fail(f"`modalities` is {modalities!r:.80}, not a list of distinct names among {list(MODALITIES)}")
    files = facts["files"]
    if not isinstance(files, dict) or not all(isinstance(files.get(m), str) for m in modalities):
        fail(f"`files` is {files!r:.80}, not a file name for each of {modalities}")
    for name in ("settings", "source", "model"):
        if not isinstance(facts.get(name, {}), dict):
            fail(f"`{name}` is a {type(facts[name]).__name__}, not a mapping")
    candidates = facts.get("settings", {}).get("candidates", 1)
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        fail(f"`settings.candidates` is {candidates!r:.80}, not a positive integer")
    entries = facts.get("source", {}).get("files", [])
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("bytes"), int)
        for e in entries
    ):
        fail("`source.files` is not a list of {path, bytes} entries")
    try:
        _check_model_facts(facts.get("model", {}), str(path))
    except SearchError as error:
        fail(str(error).removeprefix(f"{path}: "))


def _check_model_facts(model: dict, where: str) -> None:
    """The model facts `query_model` reads: a checkpoint path and a weights digest that are strings, an
    alignment that is a name, a positive frame count."""
    checks = {
        "checkpoint": lambda v: isinstance(v, str) and "\x00" not in v,
        "weights_digest": lambda v: (
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
        ),
        "alignment": lambda v: v is None or v in ("clip", "authors"),  # avsync.data.alignment.AlignmentMode
        "num_frames": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    }
    for name, ok in checks.items():
        if name in model and not ok(model[name]):
            raise SearchError(f"{where}: `model.{name}` is {model[name]!r:.80}, not a valid value")
