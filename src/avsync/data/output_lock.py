"""One `avsync prepare` at a time per output directory: an advisory lock on `OUT/prepare.lock`.

Two runs into the same OUT write the same temporary shard files and journal, and both fail (one with
"wrote N bytes, the tar layout predicts M"); the second one is refused at once instead. The lock is
`fcntl.flock`, which the kernel drops when its process ends, however it ends: a killed run leaves no
stale lock (its file stays, and is simply locked again). On NFS, Linux turns `flock` into a lock that
the server arbitrates, so runs on different machines exclude each other too. The file holds the
holder's pid and host, for the refusal's message only, and is deleted when the run ends; a run that
opened it just before is not fooled by the deletion: after locking, it checks that the path still
names the file it locked, and starts again otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
from contextlib import suppress
from pathlib import Path

LOCK_NAME = "prepare.lock"
_OWNER = re.compile(r"pid \d+ on [\w.-]{1,100}")
#: `flock` not available on this file system: the run goes on unlocked, with a warning.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

log = logging.getLogger(__name__)


class OutputInUse(RuntimeError):
    """Another process holds the lock of the output directory."""


class OutputLock:
    """Holds `directory`'s lock until `release()` (or the end of a `with` block); the directory must
    exist. Raises `OutputInUse` at once when another process holds it, `OSError` when the lock file
    cannot be made."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._descriptor = _acquire(self.path)

    def release(self) -> None:
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        try:
            with suppress(OSError):  # another user's lock file, in a directory this one cannot write
                self.path.unlink(missing_ok=True)  # while still locked: see the module docstring
        finally:
            os.close(descriptor)  # releases the lock

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _open(path: Path) -> tuple[int | None, bool]:
    """The lock file, and whether it is writable. A lock file of another user is locked read-only (a
    lock needs no write access); with none and OUT not writable, None: this process cannot write into
    OUT, so it cannot disturb a run there (a finished OUT on a read-only mount stays usable)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except (FileNotFoundError, PermissionError):
        return None, False


def _acquire(path: Path) -> int | None:
    while True:
        descriptor, writable = _open(path)
        if descriptor is None:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(descriptor)
            os.close(descriptor)
            held_by = f"another avsync prepare ({owner})" if owner else "another avsync prepare"
            raise OutputInUse(
                f"{path.parent}: in use by {held_by}; wait for it to end or use another directory "
                f"(the lock, {LOCK_NAME}, goes with the process that holds it)"
            ) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in _UNSUPPORTED:
                raise
            log.warning(
                "%s: cannot be locked (%s): make sure that no other avsync prepare writes into it",
                path.parent,
                error.strerror or error,
            )
            return None
        try:
            locked = os.stat(path)
        except FileNotFoundError:
            locked = None
        mine = os.fstat(descriptor)
        if locked is not None and (locked.st_dev, locked.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(descriptor)  # the previous holder deleted it meanwhile: lock the new one
    if writable:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return descriptor


def _owner(descriptor: int) -> str | None:
    """The holder named in the lock file, if it reads as `pid N on HOST` (nothing else is shown)."""
    try:
        text = os.pread(descriptor, 200, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if _OWNER.fullmatch(text) else None
