"""One LightningModule per task, all around the same `CAVMAESync` backbone."""

from avsync.tasks.pretrain import PretrainModule

__all__ = ["PretrainModule"]
