"""avsync: CAV-MAE Sync as installable software."""

__version__ = "0.1.0"
