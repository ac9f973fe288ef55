"""The pretraining objective: masked reconstruction plus contrastive alignment of the global tokens."""

from avsync.objectives.contrastive import InfoNCE
from avsync.objectives.reconstruction import masked_mse

__all__ = ["InfoNCE", "masked_mse"]
