"""Pictures of what the masked autoencoder sees and predicts, for TensorBoard."""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torchvision.utils import make_grid

from avsync.model.embeddings import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize_frame(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized `(3, H, W)` -> RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device).view(3, 1, 1)
    return (video * std + mean).clamp(0, 1)


def spectrogram_image(audio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """`(time, mel)` -> a 3-channel image, low frequencies at the bottom, scaled to [low, high]."""
    image = rearrange(audio, "t f -> f t").flip(0)
    return repeat(((image - low) / max(high - low, 1e-6)).clamp(0, 1), "h w -> c h w", c=3)


def _denormalize_patches(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Undo per-patch target standardization (`norm_pix_loss`) with the input's own patch statistics."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return predicted * (var + 1.0e-6) ** 0.5 + mean


def reconstruction_panels(backbone, audio: torch.Tensor, video: torch.Tensor, out) -> dict[str, torch.Tensor]:
    """`{"frame", "spectrogram"}` -> `(3, H, W)` grids: input | masked input | reconstruction with the
    visible patches pasted back. Uses the first sample of `out` (a `PretrainOutput`)."""
    p = backbone.patch_size
    with torch.no_grad():
        video_patches, audio_patches = (
            patchify_video(video[:1].float(), p),
            patchify_audio(audio[:1].float(), p),
        )
        predicted_video = patchify_video(out.recon_video[:1].float(), p)
        predicted_audio = patchify_audio(out.recon_audio[:1].float(), p)
        if backbone.norm_pix_loss:
            predicted_video = _denormalize_patches(predicted_video, video_patches)
            predicted_audio = _denormalize_patches(predicted_audio, audio_patches)
        mask_video = out.mask_video[:1, :, None].float()
        mask_audio = out.mask_audio[:1, :, None].float()

        def three(patches_of, mask, predicted, to_image):
            masked = patches_of * (1 - mask) + mask * patches_of.mean()
            pasted = patches_of * (1 - mask) + predicted * mask
            return [to_image(x) for x in (patches_of, masked, pasted)]

        frames = three(
            video_patches,
            mask_video,
            predicted_video,
            lambda x: denormalize_frame(unpatchify_video(x, p, backbone.image_size)[0]),
        )
        low, high = audio.min().item(), audio.max().item()
        spectrograms = three(
            audio_patches,
            mask_audio,
            predicted_audio,
            lambda x: spectrogram_image(unpatchify_audio(x, p, backbone.mel_bins)[0], low, high),
        )
    return {
        "frame": make_grid(frames, nrow=3, padding=2, pad_value=1.0),
        "spectrogram": make_grid(spectrograms, nrow=3, padding=2, pad_value=1.0),
    }
