"""The fast tar reader gives what `tarfile` gives, on every layout a shard can have, and fails like it."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

from avsync.data.tar_stream import tar_members, tar_samples


def reference(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r|") as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive if member.isreg()]


def write(path: Path, members: list[tuple[str, bytes]], tar_format: int, extras: bool = False) -> Path:
    with tarfile.open(path, "w", format=tar_format) as archive:
        if extras:
            directory = tarfile.TarInfo("frames")
            directory.type = tarfile.DIRTYPE
            archive.addfile(directory)
            link = tarfile.TarInfo("frames/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
            archive.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1234567890.5  # a fractional mtime makes PAX headers
            archive.addfile(info, io.BytesIO(data))
    return path


MEMBERS = [
    ("clip0.f00.jpg", b"\xff\xd8jpeg" * 100),
    ("clip0.json", b"{}"),
    ("clip1." + "x" * 150 + ".npy", b"long name"),  # beyond ustar's 100 characters
    ("dir/" + "d" * 120 + "/clip2.jpg", b"long path"),
    ("clip3.empty", b""),
    ("cl\u00efp4.json", b"non-ascii name"),
    ("clip5.block", bytes(512)),  # a member of exactly one block of zeros
]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_equal_tarfiles_in_every_format(tmp_path, tar_format):
    members = (
        MEMBERS
        if tar_format != tarfile.USTAR_FORMAT
        else [m for m in MEMBERS if len(m[0]) < 100 and m[0].isascii()]
    )
    path = write(tmp_path / "shard.tar", members, tar_format, extras=True)
    with path.open("rb") as stream:
        ours = list(tar_members(stream))
    assert ours == reference(path) == members


def test_samples_group_members_by_key(tmp_path):
    path = write(
        tmp_path / "shard.tar", [("a.jpg", b"1"), ("a.json", b"2"), ("b.jpg", b"3")], tarfile.PAX_FORMAT
    )
    samples = list(tar_samples([{"url": str(path)}]))
    assert [(s["__key__"], s.get("jpg"), s.get("json")) for s in samples] == [
        ("a", b"1", b"2"),
        ("b", b"3", None),
    ]
    assert all(s["__url__"] == str(path) for s in samples)


def test_webdataset_metadata_members_are_not_samples(tmp_path):
    members = [("__info__", b"m"), ("__meta__/a.json", b"m"), ("a.jpg", b"1"), ("b__c__.jpg", b"2")]
    path = write(tmp_path / "shard.tar", members, tarfile.PAX_FORMAT)
    samples = list(tar_samples([{"url": str(path)}]))
    assert [s["__key__"] for s in samples] == [
        "a",
        "b__c__",
    ]  # only names that *start* with __x__ are metadata


def test_a_cut_shard_raises_tarfiles_error_naming_the_stream(tmp_path):
    path = write(tmp_path / "shard.tar", [("a.jpg", b"x" * 5000), ("b.jpg", b"y" * 5000)], tarfile.PAX_FORMAT)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    errors = []
    samples = list(tar_samples([{"url": str(path)}], handler=lambda e: errors.append(e) or True))
    assert [s["__key__"] for s in samples] == ["a"]  # whole before the cut; `b` is cut short
    (error,) = errors
    assert isinstance(error, tarfile.ReadError)
    assert str(error) == f"unexpected end of data @ <_io.BufferedReader name='{path}'>"


def test_empty_and_garbage_files_are_errors_and_a_bad_later_header_ends_the_archive(tmp_path):
    empty, garbage = tmp_path / "empty.tar", tmp_path / "garbage.tar"
    empty.write_bytes(b"")
    garbage.write_bytes(b"not a tar" * 100)
    for path, reason in ((empty, "empty file"), (garbage, "bad checksum")):
        with path.open("rb") as stream, pytest.raises(tarfile.ReadError, match=reason):
            list(tar_members(stream))
        with pytest.raises(tarfile.ReadError):
            reference(path)
    corrupt = write(tmp_path / "corrupt.tar", [("a.jpg", b"1"), ("b.jpg", b"2")], tarfile.USTAR_FORMAT)
    data = bytearray(corrupt.read_bytes())
    data[1024 + 10] ^= 0xFF  # the second header (after a's header and data block): its checksum breaks
    corrupt.write_bytes(bytes(data))
    with corrupt.open("rb") as stream:
        assert list(tar_members(stream)) == reference(corrupt) == [("a.jpg", b"1")]


_OPENED: list[str] | None = None  # paths opened while a test records them (an audit hook stays installed)


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | Path):
        _OPENED.append(str(args[0]))


def test_a_pass_over_shards_opens_each_shard_file_once(tmp_path):
    """Issue 22: each shard is opened once per use (by webdataset's `url_opener`, read as one stream)."""
    global _OPENED
    from avsync.data.datamodule import AVShardDataModule

    from .conftest import write_shards

    ids = write_shards(tmp_path / "shards", [3, 2])
    module = AVShardDataModule(
        train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), batch_size=2,
        eval_batch_size=2, num_workers=0, image_size=32, audio_length=64,
    )  # fmt: skip
    module.setup("fit")
    sys.addaudithook(_record_opens)
    _OPENED = []
    try:
        keys = [key for batch in module.val_dataloader() for key in batch["key"]]
    finally:
        opened, _OPENED = _OPENED, None
    assert len(keys) == len(ids)
    shards = sorted(str(path) for path in (tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 2
    assert sorted(path for path in opened if path.endswith(".tar")) == shards
