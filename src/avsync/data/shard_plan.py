"""Which clips go into which shard, decided from sample sizes alone.

`prepare` packs decoded clips into shards in input order, closing a shard when the next clip does not
fit (`shard_writer.fits`). The single-machine engine applies that rule while it writes; an engine that
decodes out of order on many machines (`dask_prepare`) first learns every sample's size and then
replays the same rule here, so that it writes the same shards, byte for byte. The journal entry of a
planned shard (where the next shard starts, the failures met since the previous one) is the one the
single-machine engine would have written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from avsync.data.shard_writer import fits


@dataclass
class PlannedShard:
    """Shard `index`: its samples' `locations` (whatever the caller fed, in order), where the next
    shard starts in the input list, and the failures met since the previous shard."""

    index: int
    locations: list[Any] = field(default_factory=list)
    next_input: int = 0
    failures: list[dict] = field(default_factory=list)
    clips: int = 0
    member_bytes: int = 0


class ShardPlanner:
    """Feed the input list's outcomes in order from `start` (a sample's size, or a failure); get the
    shards that close, numbered from `first_index`. `finish` closes the last one."""

    def __init__(self, start: int, first_index: int, max_bytes: int | None, max_clips: int | None) -> None:
        self.position = start
        self.next_index = first_index
        self.max_bytes, self.max_clips = max_bytes, max_clips
        self.pending: list[dict] = []  # failures not yet attached to a shard
        self.current: PlannedShard | None = None

    def sample(self, position: int, sample_bytes: int, location: Any) -> PlannedShard | None:
        """A decoded clip of `sample_bytes` (`sample_tar_bytes`); returns the shard it closes, if any."""
        self._advance(position)
        closed = None
        current = self.current
        if current is not None and not fits(
            current.clips, current.member_bytes, sample_bytes, self.max_bytes, self.max_clips
        ):
            closed = self._close(position)
        if self.current is None:
            self.current = PlannedShard(self.next_index)
            self.next_index += 1
        self.current.locations.append(location)
        self.current.clips += 1
        self.current.member_bytes += sample_bytes
        return closed

    def failure(self, position: int, failure: dict) -> None:
        self._advance(position)
        self.pending.append(failure)

    def finish(self, end: int) -> tuple[PlannedShard | None, list[dict]]:
        """After the last input (`end` = their count): the last shard, and failures that follow no shard
        (when no clip was decoded at all since the start)."""
        last = self._close(end) if self.current is not None else None
        trailing, self.pending = self.pending, []
        return last, trailing

    def _advance(self, position: int) -> None:
        if position != self.position:
            raise ValueError(f"outcomes must come in input order: got {position}, expected {self.position}")
        self.position += 1

    def _close(self, next_input: int) -> PlannedShard:
        shard, self.current = self.current, None
        shard.next_input = next_input
        shard.failures, self.pending = self.pending, []
        return shard
