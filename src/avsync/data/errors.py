"""The one error type that decoding raises, so that batch jobs can skip a bad input and say why."""

from __future__ import annotations

from pathlib import Path


class DecodeError(Exception):
    """An input that cannot become a clip: `path` names the file, `reason` says what is wrong with it.

    Raised for unreadable paths, files that are not media, missing streams, truncated or corrupt
    streams, and clips outside the accepted duration range. `prepare` records `reason` in its failures
    file; the message is meant for a person reading that file.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep both fields when the error crosses a process boundary
        return type(self), (self.path, self.reason)
