"""Issue 22 item 7: each hand-rolled part against the library's equivalent, alone and end to end.

Every comparison runs both variants in one process, interleaved run by run (`interleaved_medians`), so
machine load hits both alike; each part is kept only where it wins by a margin that shows in the
figure it serves.

- `tar_reader`: `avsync.data.tar_stream` (tar headers parsed directly) against webdataset's
  `tar_file_expander` (Python's `tarfile`), alone (members/s over one shard) and in the loader (training
  samples/s and evaluation clips/s of one worker on one core, `benchmarks.data`'s set-up), on shards
  that `prepare` wrote from the real clips. Both readers are checked to give the same samples.
- `pca_fit`: `avsync.search.compressed.fit_pca` against `faiss.PCAMatrix` on the same training sample of
  a clustered synthetic gallery (`avsync.synth.embeddings`): fit time and the share of the sample's
  energy each basis keeps; end to end, a compressed index built with either basis (build time,
  recall@10 against exact search).
- `gallery_reads`: `avsync.search.gallery` memory-mapping the members of an npz in place, against the
  same arrays as `.npy` files opened with `np.load(mmap_mode="r")`, and against `np.load` of the npz
  (which reads a member whole: numpy maps only `.npy` files): opening a gallery and reading the rows of
  an exact re-ranking, and streaming it in chunks as an index build does.
- `progress_lines`: `avsync.training.console.LogLineProgress` against Lightning's `TQDMProgressBar`,
  both writing to a file (a log, as a batch job or `make demo > demo.log` has): the time of a real
  `Trainer.fit` of many small steps, and what the log holds (bytes, lines, carriage returns).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

from benchmarks.harness import interleaved_medians, peak_rss_mib, pin_to_one_core


# ---------------------------------------------------------------------------------------- tar reader
def tar_reader(
    train_samples: int = 512, eval_clips: int = 64, repeats: int = 5, source: str = "auto"
) -> dict:
    """Members/s of the two tar readers alone, and the loader's samples/s with each (module docstring)."""
    import webdataset as wds
    from webdataset.tariterators import tar_file_expander as webdataset_expander
    from webdataset.tariterators import url_opener

    from avsync.data import tar_stream
    from benchmarks.data import _count, _datamodule, make_shard

    with tempfile.TemporaryDirectory() as scratch:
        train_shard, described = make_shard(Path(scratch) / "train", train_samples, source)
        eval_shard, _ = make_shard(Path(scratch) / "eval", eval_clips, source)
        same = _same_samples(train_shard, tar_stream.tar_samples, wds.tarfile_samples)
        core = pin_to_one_core()

        def members(expander) -> int:
            return sum(1 for _ in expander(url_opener([{"url": train_shard}])))

        count = members(tar_stream.tar_file_expander)
        alone = interleaved_medians(
            {
                "avsync": lambda: members(tar_stream.tar_file_expander),
                "webdataset": lambda: members(webdataset_expander),
            },
            repeats,
        )
        train = _datamodule(train_shard, 16, 4, 0)
        evaluation = _datamodule(eval_shard, 16, 4, 0)

        def with_webdataset(module, split: str) -> int:
            with mock.patch("avsync.data.pipeline.tarfile_to_samples", wds.tarfile_to_samples):
                return _count(module.pipeline(split))

        loader = {
            "train": interleaved_medians(
                {
                    "avsync": lambda: _count(train.pipeline("train")),
                    "webdataset": lambda: with_webdataset(train, "train"),
                },
                repeats,
            ),
            "eval": interleaved_medians(
                {
                    "avsync": lambda: _count(evaluation.pipeline("val")),
                    "webdataset": lambda: with_webdataset(evaluation, "val"),
                },
                repeats,
            ),
        }
        shard_mib = Path(train_shard).stat().st_size / 2**20
    rates = {
        "members_per_s": {name: round(count / t.median) for name, t in alone.items()},
        "train_samples_per_s": {n: round(train_samples / t.median, 1) for n, t in loader["train"].items()},
        "eval_clips_per_s": {n: round(eval_clips / t.median, 1) for n, t in loader["eval"].items()},
    }
    return {
        "shards": described,
        "core": core,
        "train_samples": train_samples,
        "eval_clips": eval_clips,
        "members": count,
        "shard_mib": round(shard_mib, 1),
        "same_samples": same,
        **rates,
        "ratios": {name: round(r["avsync"] / r["webdataset"], 3) for name, r in rates.items()},
        "runs_s": {
            "alone": {n: t.as_dict() for n, t in alone.items()},
            **{split: {n: t.as_dict() for n, t in timings.items()} for split, timings in loader.items()},
        },
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def _same_samples(shard: str, ours, theirs) -> bool:
    """Whether both readers give the same samples (keys, fields and bytes) in the same order."""
    return list(ours([{"url": shard}])) == list(theirs([{"url": shard}]))


# ---------------------------------------------------------------------------------------------- PCA
def faiss_pca_basis(vectors: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """`fit_pca`'s output from `faiss.PCAMatrix`: its top-`dim` axes as `(d_in, dim)` columns, uncentred
    as `fit_pca`'s (`have_bias = False`, as FAISS's own ITQ trains it): an inner-product index cannot
    subtract a mean without changing the ranking."""
    import faiss

    data = np.ascontiguousarray(vectors, dtype=np.float32)
    pca = faiss.PCAMatrix(data.shape[1], dim)
    pca.have_bias = False
    pca.train(data)
    axes = faiss.vector_to_array(pca.A).reshape(-1, data.shape[1])[:dim]
    return np.ascontiguousarray(axes.T)


def pca_fit(
    train_clips: tuple[int, ...] = (1024, 2048),
    gallery_clips: int = 20_000,
    queries: int = 50,
    repeats: int = 1,
    pca_dim: int = 1024,
    seed: int = 0,
) -> dict:
    """Fit time and kept energy of both PCAs per training-sample size; a compressed index (video tokens,
    searched by audio queries) built with each basis at the largest size (module docstring)."""
    import faiss

    from avsync.search.compressed import CompressedSettings, fit_pca
    from avsync.search.index import SearchIndex, build_index
    from avsync.search.vectors import diagonal_mean_vectors
    from avsync.synth.embeddings import ClusteredGallery
    from benchmarks.index import GroundTruth

    gallery = ClusteredGallery(num_clips=gallery_clips, chunk_size=min(10_000, gallery_clips), seed=seed)
    held_out = diagonal_mean_vectors(gallery.tokens("video", np.arange(gallery_clips - 1000, gallery_clips)))
    fits = {}
    for count in train_clips:
        rows = gallery.sample_rows(count, seed)
        vectors = diagonal_mean_vectors(gallery.tokens("video", rows))
        bases: dict[str, np.ndarray] = {}

        def fit(name: str, fitter, vectors=vectors, bases=bases) -> None:
            bases[name] = fitter(vectors, pca_dim, seed)

        timings = interleaved_medians(
            {
                "avsync": lambda fit=fit: fit("avsync", fit_pca),
                "faiss": lambda fit=fit: fit("faiss", faiss_pca_basis),
            },
            repeats,
            warmup=0,
        )
        total = float(np.square(held_out).sum())
        fits[str(count)] = {
            "fit_s": {name: round(t.median, 3) for name, t in timings.items()},
            "ratio": round(timings["faiss"].median / timings["avsync"].median, 2),
            "held_out_energy": {
                name: round(float(np.square(held_out @ basis).sum()) / total, 5)
                for name, basis in bases.items()
            },
            "subspace_overlap": round(
                float(np.square(bases["avsync"].T @ bases["faiss"]).sum()) / bases["avsync"].shape[1], 4
            ),
            "runs_s": {name: t.as_dict() for name, t in timings.items()},
        }
    largest = max(train_clips)
    settings = CompressedSettings(pca_dim=pca_dim, train_clips=largest, seed=seed)
    query_rows = np.arange(queries)
    audio = gallery.tokens("audio", query_rows)
    builds = {}
    with tempfile.TemporaryDirectory(prefix="avsync-pca-bench-") as scratch:
        for name, fitter in (("avsync", fit_pca), ("faiss", faiss_pca_basis)):
            truth = GroundTruth({"audio": audio})
            with mock.patch("avsync.search.index.fit_pca", fitter):
                out = build_index(
                    gallery, Path(scratch) / name, kind="compressed", modalities=("video",),
                    settings=settings, chunk_clips=gallery.chunk_size, on_chunk=truth,
                )  # fmt: skip
            index = SearchIndex(out)
            build = index.facts["build"]
            hits = index.search(audio, "audio", 10)
            builds[name] = {
                "train_s": build["train_s"],
                "total_s": build["total_s"],
                **truth.recall("audio", [hit.rows for hit in hits]),
            }
    return {
        "faiss": faiss.__version__,
        "gallery_clips": gallery_clips,
        "pca_dim": pca_dim,
        "input_dim": gallery.steps * gallery.dim,
        "fits": fits,
        "index": {"train_clips": largest, "modality": "video (audio queries)", "queries": queries, **builds},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


# ------------------------------------------------------------------------------------------ gallery
def gallery_reads(
    clips: int = 10_000, steps: int = 16, dim: int = 768, rerank: int = 100, reads: int = 20, repeats: int = 5
) -> dict:
    """One float16 gallery (as `avsync embed` writes it) read three ways (module docstring): opening it
    and reading `rerank` random clips' tokens `reads` times (a search with `--rerank`, one query each), and
    streaming it in chunks of 8,192 clips (an index build). Files are page-cached: this is the CPU's part."""
    from avsync.search.gallery import Gallery

    rng = np.random.default_rng(0)
    keys = np.array([f"clip{i:07d}" for i in range(clips)], dtype=np.str_)
    tokens = {
        m: rng.standard_normal((clips, steps, dim), dtype=np.float32).astype(np.float16)
        for m in ("audio", "video")
    }
    picks = [np.sort(rng.choice(clips, rerank, replace=False)) for _ in range(reads)]
    with tempfile.TemporaryDirectory(prefix="avsync-gallery-bench-") as scratch:
        scratch = Path(scratch)
        npz = scratch / "gallery.npz"
        with npz.open("wb") as handle:
            np.savez(handle, keys=keys, **tokens)
        for name, array in {"keys": keys, **tokens}.items():
            np.save(scratch / f"{name}.npy", array)
        del tokens

        def npy_mapped() -> Gallery:
            mapped = {m: np.load(scratch / f"{m}.npy", mmap_mode="r") for m in ("audio", "video")}
            return Gallery.from_arrays(np.load(scratch / "keys.npy"), **mapped)

        def npz_whole() -> Gallery:
            with np.load(npz) as data:
                return Gallery.from_arrays(data["keys"], audio=data["audio"], video=data["video"])

        openers = {
            "avsync (npz, members mapped)": lambda: Gallery.open(npz),
            "npy, mmap_mode": npy_mapped,
            "npz, np.load": npz_whole,
        }
        first = {name: opener() for name, opener in openers.items()}
        reference = first["avsync (npz, members mapped)"]
        same = all(
            np.array_equal(g.ids, reference.ids)
            and np.array_equal(g.tokens("video", picks[0]), reference.tokens("video", picks[0]))
            for g in first.values()
        )
        del first, reference

        def search_reads(opener) -> None:
            for rows in picks:
                opener().tokens("video", rows)

        def stream(opener) -> None:
            for _ in opener().chunks(8192, ("video",)):
                pass

        reads_timing = interleaved_medians(
            {n: lambda o=o: search_reads(o) for n, o in openers.items()}, repeats
        )
        stream_timing = interleaved_medians({n: lambda o=o: stream(o) for n, o in openers.items()}, repeats)
        file_mib = npz.stat().st_size / 2**20
    return {
        "clips": clips,
        "steps": steps,
        "dim": dim,
        "file_mib": round(file_mib, 1),
        "rerank": rerank,
        "reads": reads,
        "same_values": same,
        "open_and_rerank_ms": {n: round(1e3 * t.median / reads, 2) for n, t in reads_timing.items()},
        "stream_s": {n: round(t.median, 3) for n, t in stream_timing.items()},
        "runs_s": {
            "open_and_rerank": {n: t.as_dict() for n, t in reads_timing.items()},
            "stream": {n: t.as_dict() for n, t in stream_timing.items()},
        },
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


# ----------------------------------------------------------------------------------------- progress
def progress_lines(steps: int = 2000, repeats: int = 3, interval: float = 1.0) -> dict:
    """A real `Trainer.fit` of `steps` small steps with each progress display writing to a file (what
    a log holds, and the fit's time) against no display (module docstring)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import TQDMProgressBar

    try:
        from lightning.pytorch.callbacks import RichProgressBar

        RichProgressBar()
    except ModuleNotFoundError:
        RichProgressBar = None

    from avsync.training.console import LogLineProgress

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_index):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(steps, 8))
    bars = {
        "none": None,
        "avsync LogLineProgress": lambda: LogLineProgress(interval),
        "Lightning TQDMProgressBar": TQDMProgressBar,
    }
    if RichProgressBar is not None:  # needs `rich`, which Lightning does not require
        bars["Lightning RichProgressBar"] = RichProgressBar
    logs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="avsync-progress-bench-") as scratch:

        def fit(name: str) -> None:
            make = bars[name]
            log = Path(scratch) / "log.txt"
            with (
                log.open("w") as handle,
                contextlib.redirect_stdout(handle),
                contextlib.redirect_stderr(handle),
            ):
                trainer = L.Trainer(
                    max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    callbacks=[make()] if make else [], enable_progress_bar=make is not None,
                    default_root_dir=scratch, accelerator="cpu", devices=1,
                )  # fmt: skip
                trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=1))
            logs[name] = log.read_bytes().decode(errors="replace")  # keeps carriage returns

        timings = interleaved_medians({name: lambda name=name: fit(name) for name in bars}, repeats)
    none = timings["none"].median
    return {
        "steps": steps,
        "interval_s": interval,
        "fit_s": {name: round(t.median, 3) for name, t in timings.items()},
        "overhead_us_per_step": {
            name: round(1e6 * (t.median - none) / steps, 1) for name, t in timings.items()
        },
        "log": {
            name: {"bytes": len(text), "lines": text.count("\n"), "carriage_returns": text.count("\r")}
            for name, text in logs.items()
        },
        "last_lines": {
            name: text.replace("\r", "\n").strip().splitlines()[-1:] for name, text in logs.items()
        },
        "runs_s": {name: t.as_dict() for name, t in timings.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
