"""Class lists and clip labels: AudioSet-style `index,mid,display_name` CSVs and `clip_id,labels` CSVs.

A label may be written as a class's mid (`/m/09x0r`), its display name (`Speech`) or its index (`0`),
tried in that order; several labels share one quoted, comma-separated field. Without a class CSV the
class list is the sorted set of the labels that occur, each its own mid and name.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class LabelError(ValueError):
    """A label that names no class, or a malformed label/class file."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    mid: str
    name: str


class ClassList:
    """Classes by index, with lookup of a label written as mid, display name or index."""

    def __init__(self, classes: Iterable[ClassInfo], source: str = "the class list") -> None:
        self.classes = sorted(classes, key=lambda c: c.index)
        self.source = source
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise LabelError(f"{source}: class indices must be 0..{len(self.classes) - 1} without gaps")
        self._by_mid = {c.mid: c.index for c in self.classes}
        self._by_name = {}
        for c in self.classes:
            self._by_name.setdefault(c.name, c.index)

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def from_csv(cls, path: str | Path) -> ClassList:
        """Read `index,mid,display_name` (with that header), as AudioSet's class_labels_indices.csv."""
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {"index", "mid", "display_name"} - set(reader.fieldnames or [])
            if missing:
                raise LabelError(
                    f"{path}: class CSV lacks column(s) {sorted(missing)}; want index,mid,display_name"
                )
            try:
                rows = [
                    ClassInfo(int(row["index"]), row["mid"].strip(), row["display_name"].strip())
                    for row in reader
                ]
            except ValueError as error:
                raise LabelError(f"{path}: a class index is not an integer ({error})") from error
        return cls(rows, source=str(path))

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> ClassList:
        """A class list made of the distinct `labels`, sorted, each its own mid and display name."""
        return cls(
            (ClassInfo(i, label, label) for i, label in enumerate(sorted(set(labels)))),
            source="the labels found",
        )

    def resolve(self, label: str) -> int:
        """Index of the class that `label` names (mid, then display name, then index)."""
        if label in self._by_mid:
            return self._by_mid[label]
        if label in self._by_name:
            return self._by_name[label]
        if label.isdigit() and int(label) < len(self.classes):
            return int(label)
        raise LabelError(
            f"label {label!r} is not in {self.source} (neither a mid, a display name nor an index)"
        )

    def to_json(self) -> list[dict]:
        return [{"index": c.index, "mid": c.mid, "name": c.name} for c in self.classes]


def split_labels(field: str) -> list[str]:
    """`"a, b,c"` -> `["a", "b", "c"]`; empty pieces dropped."""
    return [piece.strip() for piece in field.split(",") if piece.strip()]


def read_labels_csv(path: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """`clip_id -> labels` from a `clip_id,labels` CSV (an optional header row is recognized).

    Returns the mapping and a list of problems (repeated clip ids: the first row is kept).
    """
    labels: dict[str, list[str]] = {}
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if line_number == 1 and row[0].strip().lower() in ("clip_id", "id", "video_id", "ytid"):
                continue
            clip_id = row[0].strip()
            if clip_id in labels:
                problems.append(f"{path}:{line_number}: clip {clip_id!r} listed again; keeping its first row")
                continue
            labels[clip_id] = [label for field in row[1:] for label in split_labels(field)]
    return labels, problems
