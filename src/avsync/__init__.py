"""avsync: CAV-MAE Sync as installable software."""

__version__ = "0.1.0"

_API = ("load", "export", "AVSyncModel")


def __getattr__(name: str):
    """`avsync.load` / `avsync.export` without importing torch for a bare `import avsync` (PEP 562)."""
    if name in _API:
        from avsync import api

        return getattr(api, name)
    raise AttributeError(f"module 'avsync' has no attribute {name!r}")
