"""Using a trained model: `load` a checkpoint of any format, embed tensors or video files, `export`
a checkpoint as safetensors. Guide and output layouts: docs/embedding.md.

    model = avsync.api.load("pretrain.ckpt")                 # GPU + bf16 when there is one
    clip = model.embed_video("clip.mp4")                      # clip.audio, clip.video: (16, D)
    run = model.embed_videos(paths, batch_size=16)            # run.audio, run.video: (N, 16, D)
"""

from __future__ import annotations

from avsync.api.model import AVSyncModel, Embedding, EmbeddingRun, VideoEmbedding, export, load
from avsync.api.outputs import write_embeddings
from avsync.api.videos import Failure, VideoInputs

__all__ = [
    "AVSyncModel",
    "Embedding",
    "EmbeddingRun",
    "Failure",
    "VideoEmbedding",
    "VideoInputs",
    "export",
    "load",
    "write_embeddings",
]
