"""Code written against the earlier home of the loaders (`avsync.loading`, in the notebooks and docs of
earlier versions) keeps working: the names are the package's own functions, not copies."""

from __future__ import annotations

import pytest

import avsync.checkpoints
import avsync.loading


def test_the_earlier_module_gives_the_packages_functions():
    for name in avsync.loading.__all__:
        assert getattr(avsync.loading, name) is getattr(avsync.checkpoints, name), name
    assert {"load_backbone", "save_backbone", "resolve_backbone"} <= set(avsync.loading.__all__)


def test_the_moved_authors_loader_names_its_new_home():
    from avsync.model import CAVMAESync

    moved = r"avsync\.checkpoints\.load_authors_checkpoint\('released\.pth'\)"
    with pytest.raises(AttributeError, match=moved):
        CAVMAESync.from_authors_checkpoint("released.pth")
