"""Training on bad shards, and resuming into the same logs, through real `avsync fit` runs.

Shards are written with the project's own `ShardWriter` and sample schema, then spoiled one member at a
time, so that each fault is exactly one thing a real shard can hold. Every fault must end as a skip
with a reason (counted in `data/skipped_train` and the end-of-run summary), a one-line error, or a
clean stop with a checkpoint - never a hang, a traceback, or training on padding.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.data.datamodule import AVShardDataModule
from avsync.data.images import encode_jpeg
from avsync.data.schema import FBANK_FIELD, SCHEMA_VERSION, encode_npy, encode_sample, frame_field, sample_key
from avsync.data.shard_writer import ShardWriter

from .conftest import avsync_command, avsync_env, checkpoints_dir, fit_config

NUM_CLASSES = 3
JPEGS = [encode_jpeg(np.full((32, 40, 3), 16 * i, np.uint8)) for i in range(16)]


def spectrogram(rows: int = 300, mel: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-5.0, 4.0, (rows, mel)).astype(np.float16)


def clip(clip_id: str, fbank: np.ndarray | None = None, spoil=None, **metadata) -> dict:
    """One sample as `avsync prepare` writes it, then `spoil(sample)` applied to its members."""
    fbank = spectrogram(seed=len(clip_id)) if fbank is None else fbank
    record = {"id": clip_id, "num_frames": 16, "labels": [0], "fbank_frames": int(fbank.shape[0]), **metadata}
    sample = encode_sample(sample_key(clip_id), JPEGS, fbank, record)
    if spoil is not None:
        spoil(sample)
    return sample


def write_shards(directory: Path, shards: list[list[dict]]) -> Path:
    directory.mkdir(parents=True)
    records = []
    for index, samples in enumerate(shards):
        writer = ShardWriter(directory, index, max_bytes=None, max_clips=None)
        for sample in samples:
            writer.write(sample)
        record = writer.finish()
        records.append(
            {"name": record.name, "clips": record.clips, "bytes": record.bytes, "sha256": record.sha256}
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": NUM_CLASSES,
        "classes": [{"index": i, "mid": f"c{i}", "name": f"class {i}"} for i in range(NUM_CLASSES)],
        "preprocessing": {"num_frames": 16},
        "shards": records,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def member(name: str, data: bytes):
    return lambda sample: sample.update({name: data})


def without(name: str):
    return lambda sample: sample.pop(name)


def nan_spectrogram(rows: int = 300) -> np.ndarray:
    fbank = spectrogram(rows)
    fbank[::7, ::5] = np.nan
    return fbank


#: key -> (the sample, the reason logged for it, what the RELIABILITY row calls the fault)
BAD = {
    "mel64": (
        clip("mel64", spectrogram(300, 64)),
        "spectrogram has shape (300, 64), expected (frames, 128) for this model",
        "one spectrogram of shape (S, 64) in a 128-mel shard (crashed `collate` before)",
    ),
    "empty": (
        clip("empty", spectrogram(0)),
        "spectrogram is empty, shorter than min_audio_frames=100",
        "an empty spectrogram, (0, 128) (trained on constant padding before)",
    ),
    "short": (
        clip("short", spectrogram(40)),
        "spectrogram is 40 frame(s) long, shorter than min_audio_frames=100",
        "a 0.4-s spectrogram, (40, 128)",
    ),
    "cut": (
        clip("cut", spectrogram(300), fbank_frames=1000),
        "spectrogram has 300 frames, its metadata records 1000",
        "a spectrogram shorter than the frame count its metadata records",
    ),
    "int16": (
        clip("int16", spoil=member(FBANK_FIELD, encode_npy(np.zeros((300, 128), np.int16)))),
        "spectrogram is int16, expected floating point",
        "a spectrogram of integers (int16)",
    ),
    "nan": (
        clip("nan", nan_spectrogram()),
        f"spectrogram holds {int(np.isnan(nan_spectrogram()).sum())} NaN or infinite value(s)",
        "NaN in a spectrogram",
    ),
    "no_audio": (
        clip("no_audio", spoil=without(FBANK_FIELD)),
        "no fbank.npy member",
        "a sample missing its audio member",
    ),
    "no_frame": (
        clip("no_frame", spoil=without(frame_field(5))),
        "metadata says 16 frames but 1 frame member(s) are missing: f05.jpg",
        "a sample missing one of its 16 frames",
    ),
    "bad_jpeg": (
        clip(
            "bad_jpeg", spoil=lambda s: s.update({frame_field(i): b"\xff\xd8 not a jpeg" for i in range(16)})
        ),
        "undecodable frame",
        "frames that are not decodable JPEGs",
    ),
    "twelve_frames": (
        clip("twelve_frames", num_frames=12),
        "stores 12 frames, not a multiple of 16",
        "a clip storing 12 frames where 16 are read",
    ),
    "label": (
        clip("label", labels=[7]),
        "has labels [7] outside 0..2",
        "a label index out of range",
    ),
    "label_text": (
        clip("label_text", labels="dog"),
        "labels 'dog' is not a list of class indices",
        "labels that are not class indices (metadata of the wrong type)",
    ),
}


def good(n: int, prefix: str = "good") -> list[dict]:
    return [clip(f"{prefix}{k}") for k in range(n)]


def run_fit(config: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        avsync_command("fit", "--config", str(config)), env=avsync_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def read_metrics(runs: Path) -> list[dict]:
    with open(runs / "reliability" / "run" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


CSV_AND_TENSORBOARD = [
    {
        # Lightning's own class: avsync's CLI swaps in its appending writer (avsync.training.logs)
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"name": "reliability", "version": "run"},
    },
    {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"name": "reliability", "version": "run"},
    },
]


def loggers(runs: Path) -> list[dict]:
    return [
        {**spec, "init_args": {**spec["init_args"], "save_dir": str(runs)}} for spec in CSV_AND_TENSORBOARD
    ]


def test_bad_samples_among_good_ones_are_skipped_with_their_reason(tmp_path, reliability):
    # shard 0: every kind of bad sample mixed with good ones; shard 1: all bad (NaN); shard 2: all good.
    bad_shard = [clip(f"all_bad{k}", nan_spectrogram()) for k in range(4)]
    first = [sample for _, (sample, _, _) in BAD.items()] + good(4)
    shards = write_shards(tmp_path / "shards", [first, bad_shard, good(4, "more")])
    good_keys = {f"good{k}" for k in range(4)} | {f"more{k}" for k in range(4)}

    # The pipeline alone: exactly the good clips come out, each bad one is counted under its reason.
    module = AVShardDataModule(
        train_shards=str(shards), batch_size=2, num_workers=0, image_size=32, audio_length=64
    )
    module.setup("fit")
    assert {key for batch in module.train_dataloader() for key in batch["key"]} == good_keys
    assert module.skip_counters["train"].by_reason == {
        "missing member": 2, "bad metadata": 1, "frame count": 1, "undecodable frame": 1,
        "spectrogram dtype": 1, "spectrogram shape": 1, "spectrogram too short": 2, "spectrogram length": 1,
        "non-finite spectrogram": 5, "label": 1,
    }  # fmt: skip

    # A real run: trains on the 8 good clips (4 steps of 2), logs the skips and says why at the end.
    runs = tmp_path / "runs"
    trainer = {"logger": loggers(runs), "max_steps": 4}  # the schedule's length (fixed mode has none)
    config = fit_config(tmp_path / "fit.yaml", shards, runs, trainer=trainer, model={"warmup_steps": 1})
    result = run_fit(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for key, (_, reason, _) in BAD.items():
        assert any(f"sample '{key}' of" in line and reason in line for line in result.stderr.splitlines()), (
            key
        )
    summary = [line for line in result.stderr.splitlines() if "skipped samples in this run" in line]
    assert summary == [
        "skipped samples in this run: train 16 (5 non-finite spectrogram, 2 missing member, "
        "2 spectrogram too short, 1 bad metadata, 1 frame count, 1 undecodable frame, 1 spectrogram dtype, "
        "1 spectrogram shape, 1 spectrogram length, 1 label)"
    ]
    rows = read_metrics(runs)
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) == 3  # steps 0..3: 8 clips, batches of 2
    assert [float(r["data/skipped_train"]) for r in rows if r.get("data/skipped_train")] == [16.0]

    for key, (_, reason, case) in BAD.items():
        if key != "nan":
            reliability.record(
                "Hostile inputs", case, "avsync fit over shards mixing it with good samples",
                f"the sample is skipped, logged as `{reason}`, counted in data/skipped_train and in the "
                "end-of-run summary; the run trains on the good samples",
            )  # fmt: skip
    reliability.record(
        "Hostile inputs", "every sample of one shard bad (NaN), the other shards fine",
        "avsync fit, fixed mode",
        "the shard's 4 samples are skipped and counted; the run trains on the other shards' clips (exactly "
        "the good ones) and exits 0",
    )  # fmt: skip
    reliability.record(
        "Hostile inputs", "skips are logged", "avsync fit (no callback configured)",
        "`data/skipped_train` is logged every epoch, warnings are rate-limited (3 per reason, then totals at "
        "10, 100, ...), and the run ends with `skipped samples in this run: train 16 (5 non-finite "
        "spectrogram, 2 missing member, ...)`",
    )  # fmt: skip


@pytest.mark.parametrize(
    "mode, workers",
    [("resampled", 0), ("resampled", 2), ("fixed", 0)],
)
def test_shards_of_only_bad_samples_stop_the_run_with_a_one_line_error(tmp_path, mode, workers, reliability):
    shards = write_shards(tmp_path / "shards", [[clip(f"bad{k}", nan_spectrogram()) for k in range(8)]] * 2)
    runs = tmp_path / "runs"
    data = {"num_workers": workers, "max_consecutive_skips": 50}
    if mode == "resampled":
        data.update(resampled=True, epoch_length=64)
    trainer = {"max_epochs": 3, "max_steps": 100}  # a schedule length in fixed mode too
    config = fit_config(
        tmp_path / "fit.yaml", shards, runs, data=data, trainer=trainer, model={"warmup_steps": 1}
    )
    started = time.monotonic()
    result = run_fit(config, timeout=600)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    if mode == "resampled":
        where = "worker 0" if workers else "the main process"
        where = "worker" if workers else where  # whichever worker reaches the bound first
        assert last.startswith("error: train: no usable data: 50 samples in a row were skipped in ")
        assert where in last and "(max_consecutive_skips=50): 50 non-finite spectrogram; last: " in last
    else:  # 16 bad samples, fewer than the bound: the epoch gives no batch
        assert last == (
            "error: train: no usable data: a pass over the shards gave no batch; 16 samples were skipped "
            "(16 non-finite spectrogram, in all so far; the reasons of the first few are in the warnings "
            "above)"
        )
    assert result.stderr.count("skipped a sample") <= 3 * max(1, workers)
    assert len(result.stderr) < 20_000
    print(f"{mode}, {workers} workers: stopped after {elapsed:.1f} s, {len(result.stderr)} bytes of log")
    if mode == "resampled":
        reliability.record(
            "Hostile inputs",
            f"every training sample bad (NaN), resampled mode, {workers or 'no'} DataLoader workers",
            "avsync fit (subprocess), max_consecutive_skips=50",
            "stops after 50 skips in a row with one line and exit status 1: `error: train: no usable data: "
            "50 samples in a row were skipped in ... (max_consecutive_skips=50): 50 non-finite spectrogram; "
            "last: ...`; 3 warnings per reason, under 20 kB of log (before: skipped forever, 36 MB in 2 min)",
        )  # fmt: skip
    else:
        reliability.record(
            "Hostile inputs", "every sample bad (NaN), fixed mode (an epoch without a batch)",
            "avsync fit (subprocess)",
            "stops at the first epoch with exit status 1: `error: train: no usable data: a pass over the "
            "shards gave no batch; 16 samples were skipped (16 non-finite spectrogram, ...)`",
        )  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_while_the_loader_skips_stops_with_a_checkpoint(tmp_path, workers, reliability):
    shards = write_shards(tmp_path / "shards", [[clip(f"bad{k}", nan_spectrogram()) for k in range(8)]])
    runs = tmp_path / "runs"
    data = {"num_workers": workers, "resampled": True, "epoch_length": 64, "max_consecutive_skips": None}
    config = fit_config(tmp_path / "fit.yaml", shards, runs, data=data)
    log = tmp_path / "fit.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            avsync_command("fit", "--config", str(config)), env=avsync_env(), stdout=output, stderr=output
        )
        deadline = time.monotonic() + 400
        while process.poll() is None and time.monotonic() < deadline:
            if "100 samples skipped so far" in log.read_text():  # skipping, with no bound
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    waited = time.monotonic() - sent
    text = log.read_text()
    assert "Traceback" not in text
    last = checkpoints_dir(runs) / "last.ckpt"
    assert (
        f"SIGTERM received while fetching the next batch: stopped after step 0; checkpoint saved to {last}"
        in text
    )
    assert torch.load(last, weights_only=True)["global_step"] == 0
    print(f"{workers} workers: exited {waited:.1f} s after SIGTERM")
    reliability.record(
        "Hostile inputs",
        f"SIGTERM while the loader skips bad samples forever ({workers or 'no'} workers)",
        "kill -TERM to avsync fit (subprocess), max_consecutive_skips: null",
        "honoured between steps: writes last.ckpt (the last finished step), logs `SIGTERM received while "
        "fetching the next batch: stopped after step 0; checkpoint saved to ...`, exits 143 without a "
        "traceback (the handler acted only at a batch end before, which never came)",
    )  # fmt: skip


def test_a_resumed_run_appends_to_its_csv_and_tensorboard_logs(tmp_path, reliability):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = write_shards(tmp_path / "shards", [good(8)])
    runs = tmp_path / "runs"
    config = fit_config(
        tmp_path / "fit.yaml", shards, runs, trainer={"logger": loggers(runs), "max_epochs": 2},
        data={"resampled": True, "epoch_length": 6},
    )  # fmt: skip
    first = run_fit(config)  # 2 epochs of 3 steps
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_metrics(runs)
    assert sorted({int(r["step"]) for r in before if r.get("train/loss")}) == [0, 1, 2, 3, 4, 5]

    resumed = subprocess.run(
        avsync_command("fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "4"),
        env=avsync_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_metrics(runs)
    assert after[: len(before)] == before  # the first run's rows, untouched, then the resumed run's
    assert sorted({int(r["step"]) for r in after if r.get("train/loss")}) == list(range(12))

    events = EventAccumulator(str(runs / "reliability" / "run")).Reload()
    steps = sorted({event.step for event in events.Scalars("train/loss")})
    assert steps == list(range(12)), steps
    assert len(list((runs / "reliability" / "run").glob("events.out.tfevents.*"))) == 2
    reliability.record(
        "Resume",
        "resumed into the same log directory (Lightning's CSVLogger and TensorBoardLogger, fixed version)",
        "avsync fit, then avsync fit --ckpt_path last",
        "metrics.csv keeps the first run's rows byte for byte and the resumed run's rows follow (Lightning's "
        "CSV writer deleted them before); TensorBoard gets a second event file beside the first, every step "
        "of both runs is readable",
    )
