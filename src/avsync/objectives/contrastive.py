"""InfoNCE between audio and video global tokens, with negatives from the whole global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avsync.distributed import gather_with_grad


class InfoNCE(nn.Module):
    """`S = norm(g_a) @ norm(g_v).T / temperature`.

    One direction (the authors' default): for each video, a softmax over the batch's audio, i.e.
    `-mean(diag(log_softmax(S, dim=0)))`. Bidirectional averages that with the audio->video term.

    On N ranks each rank scores its own pairs against the gathered global batch; DDP's gradient
    averaging then gives exactly the gradient of the single-device loss over the global batch.
    """

    def __init__(self, temperature: float = 0.05, bidirectional: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.bidirectional = bidirectional
        #: Every rank's batch has this rank's size (set by `PretrainModule(equal_batches=True)` for
        #: training steps): the global batch is gathered without gathering its sizes first.
        self.equal_batches = False

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss, accuracy)` for local `(b, D)` global tokens; accuracy is the share of local videos
        (and audios, when bidirectional) whose best match in the global batch is their own pair."""
        with torch.autocast(audio.device.type, enabled=False):  # similarities / 0.05 need fp32
            return self._loss(F.normalize(audio.float(), dim=-1), F.normalize(video.float(), dim=-1))

    def _loss(self, audio: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        all_audio, offset = gather_with_grad(audio, self.equal_batches)
        targets = torch.arange(audio.shape[0], device=audio.device) + offset
        video_to_audio = video @ all_audio.T / self.temperature
        loss = F.cross_entropy(video_to_audio, targets)
        accuracy = (video_to_audio.argmax(dim=1) == targets).float().mean()
        if self.bidirectional:
            all_video, _ = gather_with_grad(video, self.equal_batches)
            audio_to_video = audio @ all_video.T / self.temperature
            loss = (loss + F.cross_entropy(audio_to_video, targets)) / 2
            accuracy = (accuracy + (audio_to_video.argmax(dim=1) == targets).float().mean()) / 2
        return loss, accuracy
