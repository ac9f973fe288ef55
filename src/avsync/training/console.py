"""What a training run prints: progress that a log file can hold, and a model summary without FLOPs.

Lightning's progress bars redraw one terminal line; written to a file (`make demo > demo.log`, a batch
job) `TQDMProgressBar` leaves a stream of carriage returns, redrawn every step, and `RichProgressBar`
nothing until the run ends. `LogLineProgress` prints a plain line every `interval` seconds instead:
steps done of the run's total, the rate, the elapsed time and an estimate of the time left (times
formatted by tqdm). `progress_callback()` picks Lightning's tqdm bar in a terminal and these lines
elsewhere.

Kept (issue 22 item 7), measured against both of Lightning's bars in one run, a real 2,000-step fit
writing to a file (BENCHMARKS.md, `progress_lines`; 2 busy cores, a line a second): the log holds 5
lines (353 bytes) against tqdm's 4,005 redraws joined by carriage returns (246 KB) and rich's single
line at the end (no ETA while the run lasts); the fit pays 169 us a step against tqdm's 763 and rich's
272.

Lightning's `ModelSummary` ends with "Total Flops", which is 0 unless the module defines
`example_input_array` (avsync's take dict batches, so it never does): `SummaryWithoutFlops` leaves
the FLOPs column and line out.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from tqdm import tqdm

format_interval = tqdm.format_interval  # `mm:ss`, or `h:mm:ss` from an hour


class LogLineProgress(ProgressBar):
    """A progress bar for logs: `step i/N (p%), r it/s, elapsed t, ETA e` every `interval` seconds of
    training, and a line when each fit, validation and test pass ends.

    Args:
        interval: seconds between two lines while a pass runs.
        stream: where the lines go (default: standard output, flushed after each line).
    """

    def __init__(self, interval: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.stream = stream
        self._enabled = True
        self._started = self._last_line = 0.0
        self._first_step = 0
        self._eval_started = 0.0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, message: str) -> None:
        if self._enabled:
            print(message, file=self.stream or sys.stdout, flush=True)

    # ------------------------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last_line = time.monotonic()
        self._first_step = trainer.global_step  # a resumed run counts its rate from where it resumed
        total = self._total_steps(trainer)
        resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
        self._print(f"[train] {total or '?'} steps in {trainer.max_epochs or '?'} epochs{resumed}")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._print(self.line(trainer, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(self.line(trainer, time.monotonic()) + " (done)")

    def line(self, trainer: L.Trainer, now: float) -> str:
        """The progress line: where the run is, how fast it goes, and how long it will still take."""
        step, total = trainer.global_step, self._total_steps(trainer)
        elapsed = now - self._started
        rate = (step - self._first_step) / elapsed if elapsed > 0 else 0.0
        epochs = trainer.max_epochs
        epoch = f"epoch {min(trainer.current_epoch + 1, epochs)}/{epochs}" if epochs and epochs > 0 else ""
        parts = [f"[train] step {step}/{total}" if total else f"[train] step {step}"]
        if total:
            parts[0] += f" ({100 * step / total:.0f}%)"
        parts += [epoch, f"{rate:.2f} it/s", f"elapsed {format_interval(elapsed)}"]
        if total and rate > 0:
            parts.append(f"ETA {format_interval((total - step) / rate)}")
        return ", ".join(part for part in parts if part)

    @staticmethod
    def _total_steps(trainer: L.Trainer) -> int | None:
        total = trainer.estimated_stepping_batches
        return int(total) if total not in (None, float("inf")) else None

    # ------------------------------------------------------------------------------------ evaluation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_started = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            took = format_interval(time.monotonic() - self._eval_started)
            self._print(f"[validate] epoch {trainer.current_epoch + 1}: done in {took}")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_started = time.monotonic()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(f"[test] done in {format_interval(time.monotonic() - self._eval_started)}")


def is_interactive() -> bool:
    """Whether progress goes to a terminal (Lightning's bar draws on standard error)."""
    return sys.stderr.isatty()


def progress_callback(interactive: bool | None = None, interval: float = 30.0) -> dict:
    """The progress display as a callback for `--trainer.callbacks` (`class_path` and `init_args`):
    Lightning's tqdm bar in a terminal (`interactive`, default `is_interactive()`), else a line every
    `interval` seconds."""
    interactive = is_interactive() if interactive is None else interactive
    if interactive:
        return {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"}
    return {"class_path": f"{__name__}.LogLineProgress", "init_args": {"interval": interval}}


class SummaryWithoutFlops(ModelSummary):
    """Lightning's model summary without the FLOPs column and "Total Flops" line (see the module
    docstring)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.callbacks.model_summary import log

        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        lines = [line for line in table.splitlines() if not line.rstrip().endswith("Total Flops")]
        log.info("\n" + "\n".join(lines))
