"""`avsync prepare`'s local engine: clips decoded by a process pool on this machine, packed in input order.

Clips are decoded out of order by the pool but consumed in input order (`prepare_core.pack_in_order`),
so shard contents do not depend on the number of workers or on timing. The Dask engine
(`dask_prepare.py`) writes the same bytes; the two share `prepare_core.py` and import nothing of each
other.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context

from avsync.data.clip import ExtractionOptions
from avsync.data.prepare_core import (
    PackJob,
    Resume,
    WorkItem,
    WorkResult,
    failure_record,
    pack_in_order,
    process,
    progress_bar,
    quiet_ffmpeg,
    set_up_worker,
)
from avsync.data.shard_writer import ShardRecord

#: The signals that stop the command cleanly (a terminal's Ctrl-C; schedulers and `kill`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def pack(job: PackJob, *, workers: int = 1) -> tuple[list[ShardRecord], list[dict]]:
    """The `prepare_core.Packer` of a pool of `workers` processes (one: in this process)."""
    resume = Resume.from_entries(job.entries)
    bar = progress_bar(len(job.items), resume.start, job.progress)
    try:
        outcomes = _run(job.items[resume.start :], job.options, workers)
        return pack_in_order(
            outcomes,
            len(job.items),
            resume,
            job.journal,
            job.max_bytes,
            job.max_clips,
            bar,
            job.failed_before,
        )
    finally:
        bar.close()


def _run(items: list[WorkItem], options: ExtractionOptions, workers: int) -> Iterator[WorkResult]:
    """Results in input order. One worker: in this process. More: a spawn pool with bounded look-ahead;
    if a decoder crashes its process, the pool is rebuilt and the input that crashed it is reported."""
    quiet_ffmpeg()
    if workers <= 1:
        for item in items:
            yield process(item, options)
        return
    queue = deque(items)
    in_flight: deque = deque()
    pool = _new_pool(workers)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < 4 * workers:
                item = queue.popleft()
                in_flight.append((item, _submit(pool, item, options)))
            item, future = in_flight.popleft()
            try:
                yield future.result()
                continue
            except BrokenProcessPool:
                pass
            queue.extendleft(reversed([waiting for waiting, _ in in_flight]))
            in_flight.clear()
            pool.shutdown(cancel_futures=True)
            pool = _new_pool(workers)
            try:  # alone in a fresh pool: did this input crash the decoder?
                yield _submit(pool, item, options).result()
            except BrokenProcessPool:
                pool.shutdown(cancel_futures=True)
                pool = _new_pool(workers)
                yield WorkResult(
                    None, failure_record(item.source, "the decoder crashed (its worker process died)")
                )
    finally:
        pool.shutdown(cancel_futures=True)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )


def _submit(pool: ProcessPoolExecutor, item: WorkItem, options: ExtractionOptions):
    """`pool.submit`, with SIGINT and SIGTERM held meanwhile: a submit may start a worker process,
    which inherits them held until `_init_worker` ignores them (a Ctrl-C at that moment would
    otherwise print the traceback of a half-started worker)."""
    with _signals_held():
        return pool.submit(process, item, options)


@contextmanager
def _signals_held() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _init_worker(parent_pid: int | None = None) -> None:
    # Stopping is the parent's decision (a Ctrl-C reaches every process of the terminal's group): it
    # shuts the pool down once the current clips are done; a killed parent takes the workers along.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    set_up_worker()


_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Make this worker process end when `parent_pid` dies, even by `kill -9`.

    A pool worker otherwise waits for its next task on a pipe that it holds both ends of, forever, with
    its memory (torch and all), and so does multiprocessing's resource tracker. On Linux the kernel
    kills it (`prctl(PR_SET_PDEATHSIG, SIGKILL)`); everywhere, a daemon thread checks once per `poll_s`
    that the parent is still there (its parent pid changes when it is gone) and exits otherwise.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no usable libc: the watchdog alone
            pass
    if os.getppid() != parent_pid:  # the parent died before the kernel was asked to tell us
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="avsync-parent-watchdog", daemon=True).start()
