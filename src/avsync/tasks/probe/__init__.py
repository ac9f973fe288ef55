"""Linear probing (paper §3.5.2, supplementary Tables 9, 10, 12) on a frozen backbone.

Modules: `module` (`ProbeModule`), `head` (CLS + 2 blocks + linear), `features` (which tokens the probe
sees, the frozen backbone), `cache` (features computed once, on disk), `data` (`CachedFeatureDataModule`,
class-balanced sampling), `objective` (losses, mixup, metrics), `averaging` (weight averaging).
"""

from avsync.tasks.probe.averaging import EpochWeightAveraging
from avsync.tasks.probe.data import CachedFeatureDataModule
from avsync.tasks.probe.module import ProbeModule

__all__ = ["CachedFeatureDataModule", "EpochWeightAveraging", "ProbeModule"]
