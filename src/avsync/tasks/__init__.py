"""One LightningModule per task, all around the same `CAVMAESync` backbone (plus the image-MAE stage
that makes the backbone's starting weights in the miniature recipe)."""

from avsync.tasks.image_mae import ImageMAEModule
from avsync.tasks.pretrain import PretrainModule

__all__ = ["ImageMAEModule", "PretrainModule"]
