"""Skip counting in isolation: reasons, rate-limited warnings, the bound on skips in a row, and the
CSV writer that appends instead of deleting."""

from __future__ import annotations

import csv
import logging

import pytest

from avsync.data.samples import SampleError
from avsync.data.skips import NoUsableData, SkipCounter, TooManySkips, _checked, _original_message
from avsync.training.logs import AppendingExperimentWriter


def nan_error(key: str) -> SampleError:
    return SampleError(
        f"sample {key!r} of shard.tar: ValueError: spectrogram holds 1 NaN", "non-finite spectrogram"
    )


def test_warnings_are_rate_limited_per_reason_and_counts_kept_by_reason(caplog):
    counter = SkipCounter("train", num_workers=1, log_first=3)
    with caplog.at_level(logging.WARNING, logger="avsync.data.skips"):
        for k in range(1000):
            counter(nan_error(f"clip{k}"))
            counter.passed()
        counter(OSError("unexpected end of data @ shard-000001.tar"))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipped a sample (non-finite spectrogram" in m for m in messages) == 3
    assert "further ones are counted, not logged one by one" in messages[2]
    assert [m for m in messages if "so far for" in m] == [
        f"train: {n} samples skipped so far for non-finite spectrogram" for n in (10, 100, 1000)
    ]
    assert "skipped a sample (unreadable shard; 1 skipped" in messages[-1]
    assert counter.by_reason == {"non-finite spectrogram": 1000, "unreadable shard": 1}
    assert counter.count == 1001


def test_skips_in_a_row_are_bounded_and_a_decoded_sample_ends_the_run():
    counter = SkipCounter("train", num_workers=1, max_consecutive_skips=5)
    for _ in range(3):
        for k in range(4):
            counter(nan_error(f"clip{k}"))
        counter.passed()  # 4 in a row, then a good one: never 5
    counter(OSError("unexpected end of data"))
    for k in range(3):
        counter(nan_error(f"clip{k}"))
    with pytest.raises(TooManySkips) as error:
        counter(nan_error("clip9"))
    assert str(error.value) == (
        "train: no usable data: 5 samples in a row were skipped in the main process "
        "(max_consecutive_skips=5): 4 non-finite spectrogram, 1 unreadable shard; last: SampleError: sample "
        "'clip9' of shard.tar: ValueError: spectrogram holds 1 NaN. Fix or remove these shards, or raise "
        "max_consecutive_skips if they hold longer runs of bad samples."
    )


def test_the_loader_turns_a_workers_error_and_an_empty_pass_into_one_line():
    message = "train: no usable data: 5 samples in a row were skipped in worker 1 (...)"
    reraised = TooManySkips(
        "Caught TooManySkips in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise\n'
        f"avsync.data.skips.TooManySkips: {message}\n"
    )
    assert _original_message(reraised) == message

    counter = SkipCounter("val", num_workers=1)

    def failing():
        yield from ()
        raise reraised

    with pytest.raises(NoUsableData) as stop:
        list(_checked(failing(), counter))
    assert (stop.value.code, stop.value.split) == (f"error: {message}", "val")

    def all_skipped():
        for k in range(3):
            counter(nan_error(f"clip{k}"))
        yield from ()

    with pytest.raises(
        NoUsableData, match=r"^error: val: no usable data: a pass over the shards gave no batch; 3"
    ):
        list(_checked(all_skipped(), counter))
    assert (
        list(_checked(iter([]), counter)) == []
    )  # nothing skipped, nothing yielded: an empty split, no error


def test_the_csv_writer_keeps_earlier_rows_and_widens_the_header(tmp_path):
    first = AppendingExperimentWriter(str(tmp_path))
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.9, "lr": 0.1}, step=1)
    first.save()
    second = AppendingExperimentWriter(str(tmp_path))  # a resumed run, same directory
    second.log_metrics({"train/loss": 0.8}, step=2)
    second.save()
    second.log_metrics({"val/r1": 0.5}, step=2)  # a column the file lacks: rewritten with the union
    second.save()
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["train/loss"], r["lr"], r["val/r1"]) for r in rows] == [
        ("0", "1.0", "", ""), ("1", "0.9", "0.1", ""), ("2", "0.8", "", ""), ("2", "", "", "0.5"),
    ]  # fmt: skip
    assert not list(tmp_path.glob("*.tmp"))
