"""Class lists and clip labels: AudioSet-style `index,mid,display_name` CSVs and `clip_id,labels` CSVs.

A label may be written as a class's mid (`/m/09x0r`), its display name (`Speech`) or its index (`0`),
tried in that order; several labels share one quoted, comma-separated field. Without a class CSV the
class list is the sorted set of the labels that occur, each its own mid and name.

Both files are hand-made as often as not, so every problem is reported as one line that names the
file, the line and what is wrong (`LabelError`), never as a traceback from the csv module.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_WHOLE_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: "²".isdigit() is true but int("²") fails


class LabelError(ValueError):
    """A label that names no class, or a malformed label/class file."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    mid: str
    name: str


@dataclass(frozen=True)
class LabelRow:
    """The labels of one clip in a labels CSV, and the line they are on (for messages)."""

    labels: tuple[str, ...]
    line: int


def read_utf8(path: str | Path, error: type[Exception] = LabelError) -> str:
    """The text of a UTF-8 file (a BOM is dropped); raises `error` naming the line of a non-UTF-8 byte,
    or what keeps the file from being read."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a text file") from None
    except PermissionError:
        raise error(f"{path}: unreadable (permission denied)") from None
    except OSError as problem:
        raise error(f"{path}: cannot be read ({problem.strerror or problem})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = data.count(b"\n", 0, problem.start) + 1
        column = problem.start - (data.rfind(b"\n", 0, problem.start) + 1) + 1
        raise error(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[problem.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _csv_rows(path: str | Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record; a malformed record raises `LabelError` with its line."""
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), strict=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as problem:
            raise LabelError(f"{path}:{reader.line_num}: not valid CSV ({problem})") from None
        yield reader.line_num, row


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
        """Read `index,mid,display_name` (with that header, columns in any order), as AudioSet's
        class_labels_indices.csv."""
        rows = _csv_rows(path)
        header_line, header = next(((n, r) for n, r in rows if any(f.strip() for f in r)), (1, []))
        header = [field.strip() for field in header]
        missing = {"index", "mid", "display_name"} - set(header)
        if missing:
            raise LabelError(
                f"{path}:{header_line}: class CSV lacks column(s) {sorted(missing)}; "
                "want the header index,mid,display_name"
            )
        column = {name: header.index(name) for name in ("index", "mid", "display_name")}
        classes: list[ClassInfo] = []
        line_of_index: dict[int, int] = {}
        line_of_mid: dict[str, int] = {}
        for line, row in rows:
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise LabelError(
                    f"{path}:{line}: {len(row)} field(s), the header has {len(header)} "
                    f"({','.join(header)}); quote a display name that holds a comma"
                )
            text = row[column["index"]].strip()
            if not _WHOLE_NUMBER.fullmatch(text):
                raise LabelError(f"{path}:{line}: class index {text!r} is not a whole number")
            index, mid = int(text), row[column["mid"]].strip()
            if not mid:
                raise LabelError(f"{path}:{line}: class {index} has an empty mid")
            if index in line_of_index:
                raise LabelError(
                    f"{path}:{line}: class index {index} again (first on line {line_of_index[index]})"
                )
            if mid in line_of_mid:
                raise LabelError(f"{path}:{line}: mid {mid!r} again (first on line {line_of_mid[mid]})")
            line_of_index[index], line_of_mid[mid] = line, line
            classes.append(ClassInfo(index, mid, row[column["display_name"]].strip()))
        if not classes:
            raise LabelError(f"{path}: no classes (a header and nothing else)")
        return cls(classes, source=str(path))

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
        if _WHOLE_NUMBER.fullmatch(label) and int(label) < len(self.classes):
            return int(label)
        raise LabelError(
            f"label {label!r} is not in {self.source} (neither a mid, a display name nor an index)"
        )

    def to_json(self) -> list[dict]:
        return [{"index": c.index, "mid": c.mid, "name": c.name} for c in self.classes]


def split_labels(field: str) -> list[str]:
    """`"a, b,c"` -> `["a", "b", "c"]`; empty pieces dropped."""
    return [piece.strip() for piece in field.split(",") if piece.strip()]


def clip_id_for_matching(clip_id: str) -> str:
    """Clip ids are matched in Unicode NFC: macOS writes file names decomposed (NFD), editors compose."""
    return unicodedata.normalize("NFC", clip_id)


def read_labels_csv(path: str | Path) -> tuple[dict[str, LabelRow], list[str]]:
    """`clip_id -> LabelRow` from a `clip_id,labels` CSV (an optional header row is recognized); clip
    ids in NFC (`clip_id_for_matching`).

    Returns the mapping and a list of problems (repeated clip ids: the first row is kept, and the
    message says whether the repeat agrees with it).
    """
    labels: dict[str, LabelRow] = {}
    problems: list[str] = []
    first = True
    for line, row in _csv_rows(path):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        header, first = first and row[0].strip().lower() in ("clip_id", "id", "video_id", "ytid"), False
        if header:
            continue
        clip_id = clip_id_for_matching(row[0].strip())
        found = tuple(label for field in row[1:] for label in split_labels(field))
        kept = labels.get(clip_id)
        if kept is None:
            labels[clip_id] = LabelRow(found, line)
        elif sorted(set(found)) == sorted(set(kept.labels)):
            problems.append(f"{path}:{line}: clip {clip_id!r} listed again (as on line {kept.line}); ignored")
        else:
            problems.append(
                f"{path}:{line}: clip {clip_id!r} listed again with other labels {list(found)} "
                f"(line {kept.line}: {list(kept.labels)}); keeping line {kept.line}"
            )
    return labels, problems
