"""Benchmark 3c: the data path - `prepare` per clip, and the shard loader per worker on one core.

`prepare`: one clip decoded into its shard sample (what a `prepare` worker process does per clip: PyAV
decoding of the 16 frames and the audio, JPEG encoding, the Kaldi fbank), on the real 144p and 720p
clips of `../shared/data/videos` when they are there. With `end_to_end`, whole `avsync prepare` runs on
one core (listing, decoding, shard writing, journal and manifest) over copies of each real clip and of
the 720p one brought to 360p (the common resolution of downloaded AudioSet and VGGSound clips): clips/s
and CPU seconds per clip, projected to AudioSet-2M on one 64-core node; with `dask`, the same 360p run
through `--engine dask` on a one-worker local cluster on that core, for the engine's cost.

`loader`: `AVShardDataModule`'s pipeline on one core, augmentation off, 224 px, ViT-B window length:
training samples/s (one frame and its window per clip) and evaluation clips/s (all 16 pairs). Shards are
made of the real clips prepared by `avsync prepare` (repeated under new keys), or of synthetic 224-px
samples when the clips are absent. Measured twice: iterating the pipeline in this process (the decode
work of one worker, comparable to a per-sample `__getitem__` loop) and through a real `DataLoader`
with one worker process pinned to one core (adds the hand-over of batches to the main process). In
this process the loader as it was before this package's data-path optimizations (`reference_data_path`,
reading shards prepared with the earlier 256-px frames, `BEFORE_SHORT_SIDE`) is timed interleaved with
the current one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import av
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from avsync.data.clip import ExtractionOptions
from avsync.data.datamodule import AVShardDataModule
from avsync.data.images import encode_jpeg
from avsync.data.prepare import WorkItem, prepare, process
from avsync.data.samples import ClipDecoder
from avsync.data.schema import encode_sample, stable_json
from avsync.data.shard_writer import ShardWriter
from avsync.data.sources import discover
from benchmarks.harness import interleaved_medians, peak_rss_mib, pin_to_one_core, time_runs

#: The real clips, as `tests` find them: `../shared/data/videos` relative to the repository root.
REAL_CLIPS = {
    "144p": "00W1lcxW-WU_40.000.mp4",
    "720p": "KlsG1EnBEjc_000361.mp4",
}


#: The stored frames' short side before `prepare` defaulted to the model's input side (224).
BEFORE_SHORT_SIDE = 256


def real_clips_dir() -> Path | None:
    """`../shared/data/videos` beside the repository (or from the working directory), if present."""
    candidates = [Path(__file__).resolve().parents[3].parent / "shared" / "data" / "videos"]
    candidates.append(Path.cwd().parent / "shared" / "data" / "videos")
    return next(
        (path for path in candidates if all((path / name).is_file() for name in REAL_CLIPS.values())), None
    )


# ------------------------------------------------------------------------------------------ prepare
#: The projection's data set (AudioSet-2M) and node.
PROJECTED_CLIPS = 2_000_000
PROJECTED_CORES = 64


def prepare_throughput(
    repeats: int = 3,
    videos: str | None = None,
    end_to_end: bool = False,
    seconds: float = 8.0,
    dask: bool = False,
) -> dict:
    """Clips/s of one `prepare` worker on one core, per real clip; with `end_to_end`, whole runs of about
    `seconds` each per resolution and the projection to `PROJECTED_CLIPS` (module docstring)."""
    directory = Path(videos) if videos else real_clips_dir()
    if directory is None:
        return {"skipped": "the real clips (../shared/data/videos) are not present"}
    core = pin_to_one_core()
    options = ExtractionOptions()
    result: dict = {"core": core}
    sources = {Path(source.path).name: source for source in discover([directory]).sources}
    for label, name in REAL_CLIPS.items():
        item = WorkItem(sources[name], (), ())
        outcome = process(item, options)
        if outcome.failure is not None:
            raise RuntimeError(f"{name}: {outcome.failure['reason']}")
        before = _cpu_seconds()
        timing = time_runs(lambda item=item: process(item, options), repeats)  # and one warm-up run
        cpu = (_cpu_seconds() - before) / (repeats + 1)
        result[label] = {
            "clip": name, "clips_per_s": round(1 / timing.median, 2), "cpu_s_per_clip": round(cpu, 4),
            **timing.as_dict(),
        }  # fmt: skip
    if end_to_end:
        with tempfile.TemporaryDirectory() as scratch:
            runs = _end_to_end_runs(directory, Path(scratch), repeats, seconds, dask)
        result["end_to_end"] = runs
        result["projection"] = _projection(runs)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def _end_to_end_runs(videos: Path, scratch: Path, repeats: int, seconds: float, dask: bool) -> dict:
    """Per resolution: `prepare` (process-pool engine, one worker: in this process, on this core) over
    copies of one clip, sized to last about `seconds`."""
    clips = {
        "144p": videos / REAL_CLIPS["144p"],
        "360p": transcode(videos / REAL_CLIPS["720p"], scratch / "KlsG1EnBEjc_000361_360p.mp4", 360),
        "720p": videos / REAL_CLIPS["720p"],
    }
    runs: dict = {}
    for label, clip in clips.items():
        single = scratch / f"single_{label}"
        single.mkdir()
        shutil.copy(clip, single / clip.name)
        item = WorkItem(discover([single]).sources[0], (), ())
        process(item, ExtractionOptions())
        before = _cpu_seconds()
        process(item, ExtractionOptions())
        count = min(400, max(4, math.ceil(seconds / (_cpu_seconds() - before))))  # CPU: load-independent
        inputs = scratch / label
        inputs.mkdir()
        for index in range(count):
            shutil.copy(clip, inputs / f"{clip.stem}_{index:04d}.mp4")
        measured = [_timed_prepare(inputs, scratch / f"out_{label}_{run}") for run in range(repeats)]
        wall = sorted(m["wall_s"] for m in measured)[len(measured) // 2]
        cpu = sorted(m["cpu_s"] for m in measured)[len(measured) // 2]
        runs[label] = {
            "clip": clip.name, "size": _video_size(clip), "clip_bytes": clip.stat().st_size, "clips": count,
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "clips_per_s": round(count / wall, 2),
            "cpu_s_per_clip": round(cpu / count, 4), "sample_bytes": measured[0]["sample_bytes"],
            "runs_wall_s": [round(m["wall_s"], 3) for m in measured],
        }  # fmt: skip
        if dask and label == "360p":
            runs["dask_360p"] = _dask_run(inputs, scratch, repeats, count)
            runs["dask_360p"]["vs_pool"] = round(runs["dask_360p"]["wall_s"] / wall, 3)
    return runs


def _timed_prepare(inputs: Path, out: Path, **engine) -> dict:
    before, started = _cpu_seconds(), time.perf_counter()
    summary = prepare([inputs], out, workers=1, progress=False, **engine)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - before
    sample_bytes = round(sum(shard.bytes for shard in summary.shards) / summary.clips)
    shutil.rmtree(out)
    return {"wall_s": wall, "cpu_s": cpu, "sample_bytes": sample_bytes}


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _dask_run(inputs: Path, scratch: Path, repeats: int, count: int) -> dict:
    """The same clips through `--engine dask`: a local cluster of one single-threaded worker process,
    which inherits this process's core, 4 partitions; CPU time of driver and worker together."""
    from distributed import Client, LocalCluster

    from avsync.data.dask_prepare import quiet_dask_logs

    quiet_dask_logs()
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        partition = max(1, math.ceil(count / 4))
        engine = {"engine": "dask", "scheduler": client, "partition_size": partition}
        _timed_prepare(inputs, scratch / "dask_warmup", **engine)  # the worker imports torch and PyAV
        measured = []
        for run in range(repeats):
            worker_before = sum(client.run(_cpu_seconds).values())
            timing = _timed_prepare(inputs, scratch / f"dask_{run}", **engine)
            timing["cpu_s"] += sum(client.run(_cpu_seconds).values()) - worker_before
            measured.append(timing)
    wall = sorted(m["wall_s"] for m in measured)[len(measured) // 2]
    cpu = sorted(m["cpu_s"] for m in measured)[len(measured) // 2]
    return {
        "clips": count, "partition_size": partition, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "clips_per_s": round(count / wall, 2), "cpu_s_per_clip": round(cpu / count, 4),
        "runs_wall_s": [round(m["wall_s"], 3) for m in measured],
    }  # fmt: skip


def _projection(runs: dict) -> dict:
    """Hours for `PROJECTED_CLIPS` on `PROJECTED_CORES` cores at the measured CPU seconds per clip (the
    work of independent processes, so it scales with cores), and the shards' size."""
    projected = {"clips": PROJECTED_CLIPS, "cores": PROJECTED_CORES}
    for label in ("144p", "360p", "720p"):
        run = runs[label]
        cpu = run["cpu_s_per_clip"]
        projected[label] = {
            "clips_per_s_per_core": round(1 / cpu, 2),
            "hours": round(PROJECTED_CLIPS * cpu / PROJECTED_CORES / 3600, 2),
            "hours_at_measured_wall": round(PROJECTED_CLIPS / run["clips_per_s"] / PROJECTED_CORES / 3600, 2),
            "shards_tb": round(PROJECTED_CLIPS * run["sample_bytes"] / 1e12, 2),
        }
    if "dask_360p" in runs:
        cpu = runs["dask_360p"]["cpu_s_per_clip"]
        projected["dask_360p"] = {"hours": round(PROJECTED_CLIPS * cpu / PROJECTED_CORES / 3600, 2)}
    return projected


def _video_size(path: Path) -> str:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return f"{stream.width}x{stream.height}, {float(stream.average_rate):.3g} fps"


def transcode(source: Path, target: Path, height: int) -> Path:
    """`source` with its video scaled to `height` (H.264, libx264 veryfast, CRF 23) and its AAC audio
    copied: the same content at another resolution."""
    with av.open(str(source)) as given, av.open(str(target), "w") as output:
        video_in, audio_in = given.streams.video[0], given.streams.audio[0]
        width = round(video_in.width * height / video_in.height / 2) * 2
        video = output.add_stream("libx264", rate=video_in.average_rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23"}
        video.time_base = video.codec_context.time_base = video_in.time_base
        audio = output.add_stream_from_template(audio_in)
        for packet in given.demux(video_in, audio_in):
            if packet.dts is None:
                continue
            if packet.stream.type == "audio":
                packet.stream = audio
                output.mux(packet)
                continue
            for frame in packet.decode():
                image = frame.reformat(width=width, height=height, format="yuv420p")
                image.pts, image.time_base = frame.pts, frame.time_base
                output.mux(video.encode(image))
        output.mux(video.encode())
    return target


# ------------------------------------------------------------------------------------------- shards
def make_shard(
    directory: Path, samples: int, source: str = "auto", seed: int = 0, short_side: int | None = None
) -> tuple[str, str]:
    """`(path, description)` of one shard of `samples` clips written in `directory` by `prepare`'s own
    `ShardWriter`: the real clips prepared (frames at `short_side`, default `prepare`'s) and repeated
    under new keys, or (`source="synthetic"`, or no real clips) synthetic 16:9 JPEG frames of that short
    side and 10-s spectrograms."""
    short_side = short_side or ExtractionOptions().short_side
    videos = real_clips_dir() if source in ("auto", "real") else None
    if source == "real" and videos is None:
        raise FileNotFoundError("the real clips (../shared/data/videos) are not present")
    directory.mkdir(parents=True, exist_ok=True)
    templates = (
        _prepared_samples(videos, directory / "prepared", short_side)
        if videos
        else _synthetic_samples(seed, short_side)
    )
    writer = ShardWriter(directory, 0, None, None)
    for index in range(samples):
        template = templates[index % len(templates)]
        key = f"clip{index:06d}"
        metadata = {**json.loads(template["json"]), "id": key, "key": key}
        writer.write({**template, "__key__": key, "json": stable_json(metadata)})
    record = writer.finish()
    described = "real clips (144p and 720p), prepared" if videos else "synthetic 16:9 frames"
    return str(directory / record.name), described


def _prepared_samples(videos: Path, output: Path, short_side: int) -> list[dict]:
    options = ExtractionOptions(short_side=short_side)
    summary = prepare([videos], output, options=options, workers=1, progress=False)
    samples: dict[str, dict] = {}
    with tarfile.open(output / summary.shards[0].name) as archive:
        for member in archive:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    return list(samples.values())


def _synthetic_samples(seed: int, short_side: int, count: int = 2, frames: int = 16) -> list[dict]:
    generator = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        base = generator.integers(
            0, 256, size=(8, 15, 3), dtype=np.uint8
        )  # smooth content compresses like video
        jpegs = []
        for frame in range(frames):
            image = Image.fromarray(np.roll(base, frame, axis=1)).resize(
                (round(short_side * 16 / 9), short_side), Image.Resampling.BICUBIC
            )
            jpegs.append(encode_jpeg(image))
        fbank = generator.normal(-5.0, 4.0, size=(1000, 128)).astype(np.float16)
        metadata = {"id": f"synthetic{index}", "num_frames": frames, "labels": [index], "duration": 10.0}
        samples.append(encode_sample(f"synthetic{index}", jpegs, fbank, metadata))
    return [{name: value for name, value in sample.items() if name != "__key__"} for sample in samples]


# ------------------------------------------------------------------------------------------- loader
def _datamodule(shard: str, batch_size: int, eval_batch_size: int, num_workers: int) -> AVShardDataModule:
    module = AVShardDataModule(
        train_shards=shard, val_shards=shard, batch_size=batch_size, eval_batch_size=eval_batch_size,
        num_workers=num_workers, image_size=224, audio_length=416, num_classes=527,
        random_resized_crop=False, horizontal_flip=False, shuffle_buffer=100,
    )  # fmt: skip
    module.setup("fit")
    return module


def _count(batches) -> int:
    return sum(batch["video"].shape[0] for batch in batches)


def _stack_collate(examples: list[dict], normalize: bool = True) -> dict:
    """The old collate: frames were normalized per clip by the decoder, so `normalize` has nothing left
    to do (accepted because the pipeline passes it)."""
    names = ("audio", "video", "label", "frame_index")
    return {
        **{name: torch.stack([e[name] for e in examples]) for name in names},
        "key": [e["key"] for e in examples],
    }


@contextlib.contextmanager
def reference_data_path() -> Iterator[None]:
    """The loader as it was before the benchmark work: webdataset's `tarfile`-based reader, a full
    `isfinite` count of every spectrogram, each clip's frames normalized on their own and the batch
    stacked by `torch.stack`."""
    with (
        mock.patch("avsync.data.datamodule.ClipDecoder", _per_clip_normalizing_decoder),
        mock.patch("avsync.data.pipeline.tarfile_to_samples", wds.tarfile_to_samples),
        mock.patch(
            "avsync.data.samples._count_non_finite", lambda values: int((~torch.isfinite(values)).sum())
        ),
        mock.patch("avsync.data.pipeline.collate", _stack_collate),
    ):
        yield


def _per_clip_normalizing_decoder(*args, **kwargs) -> ClipDecoder:
    return ClipDecoder(*args, **{**kwargs, "pixels": False})


def _pass_before(module: AVShardDataModule, split: str) -> int:
    with reference_data_path():
        return _count(module.pipeline(split))


def loader_throughput(
    train_samples: int = 512,
    eval_clips: int = 64,
    repeats: int = 3,
    source: str = "auto",
    batch_size: int = 16,
    eval_batch_size: int = 4,
    dataloader_worker: bool = True,
) -> dict:
    """Training samples/s and evaluation clips/s of one worker on one core (see the module docstring)."""
    with tempfile.TemporaryDirectory() as scratch:
        train_shard, described = make_shard(Path(scratch) / "train", train_samples, source)
        eval_shard, _ = make_shard(Path(scratch) / "eval", eval_clips, source)
        side_before = BEFORE_SHORT_SIDE
        train_shard_before, _ = make_shard(
            Path(scratch) / "before_train", train_samples, source, short_side=side_before
        )
        eval_shard_before, _ = make_shard(
            Path(scratch) / "before_eval", eval_clips, source, short_side=side_before
        )
        core = pin_to_one_core()
        train = _datamodule(train_shard, batch_size, eval_batch_size, 0)
        evaluation = _datamodule(eval_shard, batch_size, eval_batch_size, 0)
        train_before = _datamodule(train_shard_before, batch_size, eval_batch_size, 0)
        evaluation_before = _datamodule(eval_shard_before, batch_size, eval_batch_size, 0)
        in_process = {
            "train": interleaved_medians(
                {
                    "before": lambda: _pass_before(train_before, "train"),
                    "avsync": lambda: _count(train.pipeline("train")),
                },
                repeats,
            ),
            "eval": interleaved_medians(
                {
                    "before": lambda: _pass_before(evaluation_before, "val"),
                    "avsync": lambda: _count(evaluation.pipeline("val")),
                },
                repeats,
            ),
        }
        result: dict = {
            "shards": described,
            "short_side": ExtractionOptions().short_side,
            "before_short_side": BEFORE_SHORT_SIDE,
            "core": core,
            "image_size": 224,
            "audio_length": 416,
            "augmentation": "off",
            "in_process": {
                "train_samples_per_s": round(train_samples / in_process["train"]["avsync"].median, 1),
                "eval_clips_per_s": round(eval_clips / in_process["eval"]["avsync"].median, 1),
                "before_train_samples_per_s": round(train_samples / in_process["train"]["before"].median, 1),
                "before_eval_clips_per_s": round(eval_clips / in_process["eval"]["before"].median, 1),
                "train": in_process["train"]["avsync"].as_dict(),
                "eval": in_process["eval"]["avsync"].as_dict(),
            },
        }
        if dataloader_worker and (os.cpu_count() or 1) > 1:
            result["dataloader_worker"] = _through_a_worker(
                train_shard, eval_shard, train_samples, eval_clips, repeats, batch_size, eval_batch_size, core
            )
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def _through_a_worker(
    train_shard: str, eval_shard: str, train_samples: int, eval_clips: int, repeats: int,
    batch_size: int, eval_batch_size: int, core: int,
) -> dict:  # fmt: skip
    """The same passes through `DataLoader(num_workers=1)`: the worker on `core`, this process on another."""
    others = set(range(os.cpu_count() or 1)) - {core}
    os.sched_setaffinity(0, others)
    rates = {}
    for split, shard, count in (("train", train_shard, train_samples), ("val", eval_shard, eval_clips)):
        module = _datamodule(shard, batch_size, eval_batch_size, 1)
        loader = torch.utils.data.DataLoader(
            module.pipeline(split), batch_size=None, num_workers=1, persistent_workers=True,
            worker_init_fn=_WorkerOnCore(core),
        )  # fmt: skip
        timing = time_runs(lambda loader=loader: _count(loader), repeats)
        rates[split] = round(count / timing.median, 1)
    os.sched_setaffinity(0, {core})
    return {"train_samples_per_s": rates["train"], "eval_clips_per_s": rates["val"]}


class _WorkerOnCore:
    def __init__(self, core: int):
        self.core = core

    def __call__(self, worker_id: int) -> None:
        os.sched_setaffinity(0, {self.core})
        torch.set_num_threads(1)
