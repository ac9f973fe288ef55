"""The resume journal of `prepare`: one JSON line per finished shard, after a header naming the run.

Inputs are processed in a fixed order and packed into shards in that order, so a finished shard is
fully described by how far into the input list it reaches (`next_input`). A rerun keeps the journaled
shards that are still on disk with their recorded size and continues from the last `next_input`; the
shards it then writes are the ones an uninterrupted run would have written. A line cut short by a
kill is ignored (its shard is simply written again, with the same bytes).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avsync.data.member_paths import member_path
from avsync.data.shard_writer import ShardRecord

JOURNAL_NAME = "prepare.journal.jsonl"


class JournalMismatch(RuntimeError):
    """The output directory holds (part of) a preparation of different inputs or settings."""


@dataclass
class JournalEntry:
    shard: ShardRecord
    next_input: int
    failures: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {"shard": asdict(self.shard), "next_input": self.next_input, "failures": self.failures}
        )

    @classmethod
    def from_json(cls, line: str) -> JournalEntry:
        value = json.loads(line)
        return cls(ShardRecord(**value["shard"]), int(value["next_input"]), list(value["failures"]))


class Journal:
    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.path = Path(directory) / JOURNAL_NAME
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> list[JournalEntry]:
        """Entries whose shard is intact on disk, in order; stops at the first that is not.

        Raises `JournalMismatch` when the journal belongs to another run.
        """
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        header = _parse(lines[0]) if lines else None
        if header is None or header.get("fingerprint") != self.fingerprint:
            raise JournalMismatch(
                f"{self.path} belongs to a preparation with other inputs or settings; "
                "use a new output directory or --overwrite"
            )
        entries: list[JournalEntry] = []
        for line in lines[1:]:
            if _parse(line) is None:
                break
            try:
                entry = JournalEntry.from_json(line)
                shard = member_path(self.path.parent, entry.shard.name, self.path)
            except (KeyError, TypeError, ValueError):  # damaged: the shards from here on are made again
                break
            if not shard.is_file() or shard.stat().st_size != entry.shard.bytes:
                break
            entries.append(entry)
        return entries

    def start(self, entries: list[JournalEntry] | None = None) -> None:
        """(Re)write the journal: header plus the `entries` that are kept."""
        lines = [json.dumps({"fingerprint": self.fingerprint})] + [e.to_json() for e in entries or []]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)

    def append(self, entry: JournalEntry) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(entry.to_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
