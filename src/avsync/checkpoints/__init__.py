"""Every checkpoint format avsync reads or writes, in one place, one layer above `avsync.model`.

- `formats.py`: one opening per file: a weights-only pickle (`.pt`, `.pth`, `.ckpt`) or a safetensors
  file's tensors and metadata, never executing code;
- `validate.py`: the checks on what a file gave (config, shapes, NaN, tensors backed by data, a run's
  Lightning checkpoint) before anything is built from it;
- `authors.py`: the authors' CAV-MAE Sync / CAV-MAE layouts (and their classifier) as avsync keys;
- `mae.py`: initialization from an ImageNet MAE ViT (`init_from`);
- `export.py`: avsync's safetensors export (weights + config), written and recognized;
- `load.py`: `load_backbone` for any of them, `resolve_backbone` for task modules.

`avsync.model` imports nothing from here; tasks, the training plugins, the API and the tools do.
"""

from avsync.checkpoints.authors import (
    AuthorsClassifier,
    authors_key,
    convert_authors_state_dict,
    infer_authors_config,
    load_authors_checkpoint,
    load_authors_classifier,
)
from avsync.checkpoints.export import (
    CONFIG_METADATA_KEY,
    FORMAT_VERSION,
    is_backbone_export,
    is_export_description,
    save_backbone,
)
from avsync.checkpoints.formats import CheckpointError, read, read_weights, state_dict_of
from avsync.checkpoints.load import load_backbone, read_lightning_checkpoint, resolve_backbone
from avsync.checkpoints.mae import MAE_FULL_URL, MAE_INIT_HINT, InitReport, init_from_mae
from avsync.checkpoints.validate import build_backbone, check_finite

__all__ = [
    "CONFIG_METADATA_KEY",
    "FORMAT_VERSION",
    "MAE_FULL_URL",
    "MAE_INIT_HINT",
    "AuthorsClassifier",
    "CheckpointError",
    "InitReport",
    "authors_key",
    "build_backbone",
    "check_finite",
    "convert_authors_state_dict",
    "infer_authors_config",
    "init_from_mae",
    "is_backbone_export",
    "is_export_description",
    "load_authors_checkpoint",
    "load_authors_classifier",
    "load_backbone",
    "read",
    "read_lightning_checkpoint",
    "read_weights",
    "resolve_backbone",
    "save_backbone",
    "state_dict_of",
]
