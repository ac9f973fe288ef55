"""`avsync prepare --engine dask`: decoding on a Dask cluster, the same shards as one machine writes.

Why Dask (`distributed`; docs/prepare_cluster.md has the comparison with Ray, submitit and
video2dataset): a pure-Python scheduler and workers that start from the same virtualenv with
`dask scheduler` / `dask worker` under `srun` (scripts/slurm/prepare.sbatch), a `LocalCluster` for one
machine and CI, futures that tell a failed task from a finished one, and rescheduling of the tasks of
a lost worker.

How a run goes (the layout and its guarantees are `prepare`'s, see there):
1. the input list, in `prepare`'s fixed order, is cut into fixed partitions (`parts.py`); each
   partition is one task that decodes its clips into a part file on the shared output directory;
2. as soon as the partitions before it are done, the driver replays `prepare`'s packing rule on the
   samples' sizes (`shard_plan.py`) and submits each shard it closes as a task that copies the
   samples from the part files through `ShardWriter`: the same bytes as the single-machine engine,
   whatever the number of workers or the order in which tasks finish;
3. finished shards are journaled in order (`journal.py`, the same journal as the single-machine
   engine, which can resume a Dask run and vice versa) and the part files they used are deleted;
   every failure travels in the part records to the driver, which writes the one `failures.jsonl`;
4. a partition or shard task that fails does not stop the others; the run then ends with an error
   naming it, and the same command reruns only what is missing (finished partitions are reused).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tqdm import tqdm

from avsync.data.clip import ExtractionOptions
from avsync.data.parts import (
    PARTS_DIR,
    PartRecord,
    load_parts,
    part_name,
    partition_bounds,
    read_samples,
    remove_part,
    write_part,
)
from avsync.data.prepare_core import (
    PackJob,
    PrepareError,
    Resume,
    journal_shard,
    process,
    progress_bar,
    set_up_worker,
)
from avsync.data.shard_plan import PlannedShard, ShardPlanner
from avsync.data.shard_writer import ShardRecord, ShardWriter
from avsync.tools import DEFAULT_PARTITION_SIZE  # about a minute of one core per task on 10-s clips

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # `prepare` refuses --engine dask without distributed, naming the package to install
    WorkerPlugin = object

log = logging.getLogger(__name__)


@contextmanager
def connect(scheduler, workers: int) -> Iterator:
    """A `distributed.Client`: `scheduler` is a `Client` (used as is), `"local"` or None (a
    `LocalCluster` of `workers` single-threaded processes on this machine, closed afterwards), a
    scheduler file (`dask scheduler --scheduler-file`) or an address (`tcp://host:8786`)."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
    elif scheduler in (None, "local"):
        with ExitStack() as stack:
            # Stopping is the driver's to do (`prepare` closes the cluster), but a terminal's Ctrl-C
            # reaches every process of its group: the workers ignore SIGINT, from their start (they
            # inherit it) and once restarted (the plugin). Their logs are kept to CRITICAL: the driver
            # reports every failed task itself, and a run stopped early would end with the workers'
            # tracebacks of the scheduler going away while they were busy.
            with _sigint_ignored():
                cluster = stack.enter_context(
                    LocalCluster(
                        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.CRITICAL,
                    )
                )  # fmt: skip
            client = stack.enter_context(Client(cluster))
            client.register_plugin(IgnoreSigint())
            yield client
    elif Path(scheduler).is_file():
        with Client(scheduler_file=str(scheduler)) as client:
            yield client
    else:
        with Client(scheduler) as client:
            yield client


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored for the block, and so in the processes started meanwhile (an ignored signal stays
    ignored across `exec`, and Python then installs no handler of its own). A Ctrl-C in those seconds
    is lost: pressed again, it stops the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class IgnoreSigint(WorkerPlugin):
    """Makes a worker (one restarted after a crash, too) ignore SIGINT; see `connect`."""

    idempotent = True
    name = "avsync-ignore-sigint"

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_dask_logs() -> None:
    """Keep the command's output to progress and problems: Dask logs every connection at INFO (its
    import sets that level, so this comes after it), and a warning when it stops a local cluster's
    workers that take a while to exit."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------ tasks (on workers)
_worker_ready = False


def decode_partition(
    directory: str, fingerprint: str, partition: int, start: int, items: list, options: ExtractionOptions
) -> PartRecord:
    """Decode one partition's `items` (inputs `start`...) into its part file; returns its record."""
    _set_up_worker()
    outcomes = ((result.sample, result.failure) for result in (process(item, options) for item in items))
    return write_part(Path(directory), fingerprint, partition, start, outcomes)


def assemble_shard(
    output: str, index: int, sources: list[tuple[str, int, int]], max_bytes: int | None, max_clips: int | None
) -> ShardRecord:
    """Write shard `index` from `(part tar, first sample, count)` ranges, in order, through the
    `ShardWriter` of the single-machine engine."""
    writer = ShardWriter(output, index, max_bytes, max_clips)
    try:
        for path, first, count in sources:
            copied = 0
            for sample in read_samples(Path(path), first, count):
                if not writer.fits(sample):
                    raise RuntimeError(f"{path}: sample {first + copied} does not fit the planned shard")
                writer.write(sample)
                copied += 1
            if copied != count:
                raise RuntimeError(f"{path}: holds {copied} of samples {first}-{first + count - 1}")
        return writer.finish()
    except BaseException:
        writer.abandon()
        raise


def _set_up_worker() -> None:
    """Once per worker process, as `prepare`'s pool does: one torch thread, ffmpeg's log quiet."""
    global _worker_ready
    if _worker_ready:
        return
    set_up_worker()
    _worker_ready = True


# ----------------------------------------------------------------------------------- the driver
def pack(
    job: PackJob, *, scheduler=None, workers: int = 1, partition_size: int = DEFAULT_PARTITION_SIZE
) -> tuple[list[ShardRecord], list[dict]]:
    """The `prepare_core.Packer` of a Dask cluster: the same result and journal as the local engine's."""
    with _connected(scheduler, workers) as client:
        run = _Run(client, job, partition_size)
        bar = progress_bar(len(job.items), run.start, job.progress)
        try:
            return run.execute(bar, job.failed_before)
        finally:
            bar.close()
            run.cancel()


@contextmanager
def _connected(scheduler, workers: int) -> Iterator:
    """`connect`, with a scheduler that cannot be reached reported as a `PrepareError`."""
    with ExitStack() as stack:
        try:
            client = stack.enter_context(connect(scheduler, workers))
        except (OSError, TimeoutError) as error:
            raise PrepareError(f"cannot reach the Dask scheduler {scheduler}: {error}") from error
        yield client


class _Run:
    def __init__(self, client, job: PackJob, partition_size: int) -> None:
        self.client, self.items, self.journal, self.options = client, job.items, job.journal, job.options
        self.max_bytes, self.max_clips = job.max_bytes, job.max_clips
        self.output = job.journal.path.parent
        self.parts = self.output / PARTS_DIR
        resume = Resume.from_entries(job.entries)
        items, journal, max_bytes, max_clips = job.items, job.journal, job.max_bytes, job.max_clips
        self.start, self.shards, self.failures = resume.start, resume.shards, resume.failures
        self.bounds = partition_bounds(len(items), partition_size)
        first = self.start // partition_size
        self.needed = list(range(first, len(self.bounds))) if self.start < len(items) else []
        self.done: dict[int, PartRecord] = load_parts(
            self.parts, journal.fingerprint, self.bounds, set(self.needed)
        )
        self.planner = ShardPlanner(self.start, len(self.shards), max_bytes, max_clips)
        self.fed = 0  # partitions of `needed` given to the planner
        self.consumed = 0  # partitions of `needed` whose files are deleted
        self.planned: dict[int, PlannedShard] = {}
        self.assembled: dict[int, ShardRecord] = {}
        self.trailing: list[dict] = []
        self.planning_done = False
        self.failed: dict[str, str] = {}
        self.futures: dict = {}
        self.run_id = uuid.uuid4().hex[:8]
        from distributed import as_completed

        self.completed = as_completed()

    def execute(self, bar: tqdm, failed_before: int) -> tuple[list[ShardRecord], list[dict]]:
        reused = [p for p in self.needed if p in self.done]
        if reused:
            log.info("reusing %d decoded partition(s) of %s", len(reused), self.parts)
            bar.update(sum(self._new_inputs(self.done[p]) for p in reused))
        for partition in self.needed:
            if partition not in self.done:
                self._submit_decode(partition)
        self._plan()
        failed_clips = failed_before + len(self.failures)
        for future in self.completed:
            kind, index = self.futures.pop(future)
            if future.status != "finished":
                error = future.exception() if future.status == "error" else future.status
                what = f"partition {index}" if kind == "decode" else f"shard {index}"
                self.failed[what] = f"{type(error).__name__}: {error}"
                log.error("%s failed: %s", what, self.failed[what])
                continue
            result = future.result()
            future.release()
            if kind == "decode":
                self.done[index] = result
                bar.update(self._new_inputs(result))
                failed_clips += len(result.failures)
                bar.set_postfix(failed=failed_clips, refresh=False)
                self._plan()
            else:
                self.assembled[index] = result
                self._journal()
        if self.failed:
            return self._fail()
        self.failures += self.trailing
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.shards, self.failures

    def cancel(self) -> None:
        if self.futures:
            self.client.cancel(list(self.futures))

    def _new_inputs(self, record: PartRecord) -> int:
        return record.stop - max(record.start, self.start)

    def _submit_decode(self, partition: int) -> None:
        start, stop = self.bounds[partition]
        future = self.client.submit(
            decode_partition, str(self.parts), self.journal.fingerprint, partition, start,
            self.items[start:stop], self.options,
            key=f"avsync-decode-{partition:06d}-{self.run_id}", priority=-partition,
        )  # fmt: skip
        self._track(future, "decode", partition)

    def _track(self, future, kind: str, index: int) -> None:
        self.futures[future] = (kind, index)
        self.completed.add(future)

    def _plan(self) -> None:
        """Give the planner the decoded partitions that follow the ones it has; assemble what closes."""
        while self.fed < len(self.needed) and self.needed[self.fed] in self.done:
            record = self.done[self.needed[self.fed]]
            for position, size, index, failure in record.outcomes():
                if position < self.start:
                    continue
                if failure is not None:
                    self.planner.failure(position, failure)
                else:
                    self._assemble(self.planner.sample(position, size, (record.partition, index)))
            self.fed += 1
        if self.fed == len(self.needed) and not self.planning_done:
            last, self.trailing = self.planner.finish(len(self.items))
            self._assemble(last)
            self.planning_done = True
            self._journal()  # a resumed run whose shards are all journaled already

    def _assemble(self, shard: PlannedShard | None) -> None:
        if shard is None:
            return
        sources: list[list] = []
        for partition, index in shard.locations:
            path = str(self.parts / f"{part_name(partition)}.tar")
            if sources and sources[-1][0] == path:
                sources[-1][2] += 1
            else:
                sources.append([path, index, 1])
        self.planned[shard.index] = shard
        future = self.client.submit(
            assemble_shard, str(self.output), shard.index, [tuple(s) for s in sources],
            self.max_bytes, self.max_clips, key=f"avsync-shard-{shard.index:06d}-{self.run_id}", priority=1,
        )  # fmt: skip
        self._track(future, "assemble", shard.index)

    def _journal(self) -> None:
        """Journal the assembled shards that follow the journaled ones; drop the parts used up."""
        while len(self.shards) in self.assembled:
            index = len(self.shards)
            record, plan = self.assembled.pop(index), self.planned.pop(index)
            journal_shard(self.journal, record, plan.next_input, plan.failures)
            self.shards.append(record)
            self.failures += plan.failures
            while self.consumed < self.fed and self.bounds[self.needed[self.consumed]][1] <= plan.next_input:
                remove_part(self.parts, self.needed[self.consumed])
                self.consumed += 1

    def _fail(self):
        missing = len(self.needed) - len(self.done)
        named = "; ".join(f"{what}: {error}" for what, error in sorted(self.failed.items()))
        raise PrepareError(
            f"{len(self.failed)} task(s) failed ({named}). Finished partitions and shards are kept: rerun "
            f"the same command to redo only the {missing} partition(s) still to decode and the shards after "
            f"{len(self.shards)} journaled one(s)"
        )
