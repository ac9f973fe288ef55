"""Counting how often a file is opened, by anyone in the process (Python, torch's C++ reader, the
safetensors Rust library), through Linux inotify: the kernel reports every `open` of the watched file.

The kernel merges an event into an identical one still unread, so closes are watched too: an open,
close, open again is two opens (two opens held at the same time would read as one)."""

from __future__ import annotations

import ctypes
import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

IN_OPEN = 0x20
IN_CLOSE = 0x08 | 0x10  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
_EVENT_HEADER = 16  # int wd, uint32 mask, cookie, len (then `len` bytes of name: 0 for a watched file)


class Opens:
    """The number of opens seen so far (`count`), read from the inotify queue."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor: int | None = descriptor
        self._count = 0

    @property
    def count(self) -> int:
        while self._descriptor is not None and select.select([self._descriptor], [], [], 0)[0]:
            data = os.read(self._descriptor, 1 << 16)
            offset = 0
            while offset < len(data):
                length = int.from_bytes(data[offset + 12 : offset + 16], sys.byteorder)
                mask = int.from_bytes(data[offset + 4 : offset + 8], sys.byteorder)
                self._count += bool(mask & IN_OPEN)
                offset += _EVENT_HEADER + length
        return self._count

    def close(self) -> None:
        """Read the last events, then stop watching (`count` keeps its value)."""
        if self._descriptor is not None:
            self.count  # noqa: B018 - drains the queue
            os.close(self._descriptor)
            self._descriptor = None


@contextmanager
def count_opens(path: str | Path) -> Iterator[Opens]:
    """Count the opens of the existing file `path` inside the `with` block (`opens.count`, also after
    it); skips where there is no inotify (it is Linux's)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("counting opens needs Linux inotify")
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if descriptor < 0:
        pytest.skip(f"inotify unavailable ({os.strerror(ctypes.get_errno())})")
    opens = Opens(descriptor)
    try:
        if libc.inotify_add_watch(descriptor, os.fsencode(path), IN_OPEN | IN_CLOSE) < 0:
            raise OSError(ctypes.get_errno(), f"cannot watch {path}")
        yield opens
    finally:
        opens.close()
