"""Logs that a resumed run continues instead of rewriting: `avsync.training.logs.CSVLogger`.

Lightning's `CSVLogger` deletes `metrics.csv` when its writer starts in a directory that holds one
(`_ExperimentWriter._check_log_dir_exists`), so a run resumed into the same version directory (as
`--ckpt_path last` with a fixed logger version does) loses every row logged before the checkpoint.
And when a resumed run logs a column the file lacks, the writer rewrites the file with only the
columns it has itself logged, which fails on the old rows' other columns (or, killed in the middle,
leaves half a file).

avsync's `CSVLogger` uses a writer that appends: it keeps the file, starts
from its header, and when new columns appear rewrites it with the union of the columns through a
temporary file and a rename, so that a kill never leaves it truncated. Rows of the steps a killed run
logged after its last checkpoint stay in the file; the resumed run logs those steps again, after
them (readers take the last row of a step).

TensorBoard needs nothing: each run writes a new event file beside the old ones, which are never
opened for writing again. (Do not pass `purge_step` to `TensorBoardLogger`: it tells TensorBoard to
hide the earlier files' events from that step on.)
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing `metrics.csv` (see the module docstring)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))

    def _check_log_dir_exists(self) -> None:
        """Keep what the directory holds (Lightning's writer deletes `metrics.csv` here)."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        temporary = f"{self.metrics_file_path}.tmp"
        with self._fs.open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(temporary, self.metrics_file_path)


class CSVLogger(LightningCSVLogger):
    """Lightning's `CSVLogger` with a writer that appends to the directory's `metrics.csv` (module
    docstring). Use it as `class_path: avsync.training.logs.CSVLogger` with a fixed `version`, so that
    `--ckpt_path last` resumes into the same directory.

    A logger subclass, not a callback: Lightning creates the loggers' writers before any callback's
    `setup`, and the stock writer deletes the file as it is created.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def keep_history(logger):
    """`logger` (one, a list, or None/bool as the Trainer takes them) with every plain Lightning
    `CSVLogger` replaced by avsync's, same folder and settings: `avsync fit` resumes append to a config's
    CSV log whichever of the two classes it names."""
    if isinstance(logger, list):
        return [keep_history(one) for one in logger]
    if type(logger) is not LightningCSVLogger:
        return logger
    return CSVLogger(
        save_dir=logger.save_dir,
        name=logger.name,
        version=logger._version,
        prefix=logger._prefix,
        flush_logs_every_n_steps=logger._flush_logs_every_n_steps,
    )
