"""Range checks of settings, made where they are taken (typed constructors, tool parsers), so that the API, a
config file and a command line all refuse the same values, before any work and in one line naming the key.

`ConfigError` is a `ValueError`; `avsync` prints it as a usage error (one line, exit status 2) whether it
comes from a tool or from a LightningCLI config, where jsonargparse wraps it in errors of its own.
This module imports nothing heavy: the tool parsers use it before torch is imported.
"""

from __future__ import annotations

import math
from numbers import Real


class ConfigError(ValueError):
    """A setting outside what it may be; the message is one line and names the setting."""


_COUNT_WORDS = {
    -1: "-1 (no limit) or a non-negative integer",
    0: "a non-negative integer",
    1: "a positive integer",
}


def _where(owner: str, name: str) -> str:
    return f"{owner}: {name}" if owner else name


def describe_count(minimum: int = 1, maximum: int | None = None) -> str:
    """`a positive integer`, `an integer in 1..100`, ... (the words of `check_count`'s errors)."""
    if maximum is not None:
        return f"an integer in {minimum}..{maximum}"
    return _COUNT_WORDS.get(minimum, f"an integer >= {minimum}")


def is_count(value: object, minimum: int = 1, maximum: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    )


def check_count(
    owner: str,
    name: str,
    value: object,
    minimum: int = 1,
    optional: bool = False,
    maximum: int | None = None,
) -> None:
    """`value` must be an integer from `minimum` to `maximum` (None allowed with `optional`)."""
    if value is None and optional:
        return
    if not is_count(value, minimum, maximum):
        raise ConfigError(f"{_where(owner, name)} must be {describe_count(minimum, maximum)}, got {value!r}")


def in_range(
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> bool:
    """Whether `value` is a finite real number between the bounds (NaN and infinities never are)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    return ok and (high is None or (value < high if high_open else value <= high))


def check_number(
    owner: str,
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """`value` must be a finite real number in the interval from `low` to `high` (each bound closed unless
    `*_open`; None = unbounded); NaN and infinities are always refused (None allowed with `optional`)."""
    if value is None and optional:
        return
    if not in_range(value, low, high, low_open, high_open):
        raise ConfigError(
            f"{_where(owner, name)} must be {describe_range(low, high, low_open, high_open)}, got {value!r}"
        )


def describe_range(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """`a finite number in [0, 1)`, `a finite number > 0`, ... (the words of `check_number`'s errors)."""
    if low is not None and high is not None:
        return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_optimizer(
    owner: str,
    lr: object,
    weight_decay: object,
    betas: object,
    warmup_epochs: object,
    min_lr: object,
) -> None:
    """The Adam + warm-up/cosine settings the task modules share: a NaN or non-positive rate used to reach
    torch's optimizer as a traceback, a negative warm-up or a beta of 1 trained on silently."""
    check_number(owner, "lr", lr, 0, low_open=True)
    check_number(owner, "weight_decay", weight_decay, 0)
    pair = tuple(betas) if isinstance(betas, (tuple, list)) else (betas,)
    if len(pair) != 2:
        raise ConfigError(f"{_where(owner, 'betas')} must be two numbers in [0, 1), got {betas!r}")
    for beta in pair:
        check_number(owner, "betas", beta, 0, 1, high_open=True)
    check_number(owner, "warmup_epochs", warmup_epochs, 0)
    check_number(owner, "min_lr", min_lr, 0)


def check_trainer(trainer: object) -> None:
    """Trainer options (the config's `trainer:` mapping) that Lightning accepts and no run can use, and the
    run-length ones it refuses only with a traceback: refused before the model is built."""
    get = getattr(trainer, "get", None)
    if get is None:
        return
    owner = "trainer"
    for name in ("max_steps", "max_epochs", "num_sanity_val_steps"):  # -1: no limit / every batch
        check_count(owner, name, get(name), -1, optional=True)
    for name in ("min_steps", "min_epochs", "log_every_n_steps"):
        check_count(owner, name, get(name), 0, optional=True)
    for name in ("accumulate_grad_batches", "check_val_every_n_epoch"):
        check_count(owner, name, get(name), 1, optional=True)
    check_number(owner, "gradient_clip_val", get("gradient_clip_val"), 0, optional=True)
