"""What the probe sees of a clip: per time step one token per modality, from a frozen backbone.

Options (paper Tables 10 and 12): `modality` audio, video or both (`[g_a, g_v]` concatenated per
step, width `2D`); `token` the global token, the mean of the register tokens or the mean of the patch
tokens; `layer` where the tokens are read: `encoder`, as the modality encoders leave them (the
authors' classifier `CAVMAEFT`, which reads `a[:, 0]` and `v[:, 0]` before the joint layer and without
a LayerNorm), or `joint`, after the joint layer and its modality LayerNorm (what retrieval reads).
Registers never enter the joint layer, so `token="register"` reads the same either way. Either way a
clip becomes a sequence `(T, W)`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch

from avsync.model import CAVMAESync
from avsync.model.backbone import FEATURE_LAYERS, Embeddings, FeatureLayer

ProbeModality = Literal["audio", "video", "audio_visual"]
ProbeToken = Literal["global", "register", "patch"]
MODALITIES: dict[str, tuple[str, ...]] = {
    "audio": ("audio",),
    "video": ("video",),
    "audio_visual": ("audio", "video"),
}
TOKENS = ("global", "register", "patch")


def check_options(modality: str, token: str, layer: str = "encoder") -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    if token not in TOKENS:
        raise ValueError(f"token must be one of {list(TOKENS)}, got {token!r}")
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"layer must be one of {list(FEATURE_LAYERS)}, got {layer!r}")


def select_tokens(embeddings: Embeddings, modality: ProbeModality, token: ProbeToken) -> torch.Tensor:
    """`(..., W)` per time step: the chosen token of each modality, concatenated audio first."""
    parts = []
    for name in MODALITIES[modality]:
        if token == "global":
            part = getattr(embeddings, f"global_{name}")
        else:
            group = getattr(embeddings, f"registers_{name}" if token == "register" else f"patches_{name}")
            part = group.mean(dim=-2)
        parts.append(part)
    return torch.cat(parts, dim=-1)


def fingerprint(model: CAVMAESync) -> str:
    """SHA-256 of the constructor config and every weight (names, dtypes, shapes, bytes): the identity
    of the features a backbone produces, used to key caches and to match probe checkpoints."""
    digest = hashlib.sha256(json.dumps(model.config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenBackbone:
    """A `CAVMAESync` used read-only: eval mode, no gradients, and deliberately *not* an `nn.Module`
    attribute of the probe, so it is never optimized, averaged, moved with the head, or written into
    probe checkpoints. Copies (e.g. Lightning's weight averaging deep-copies the LightningModule) share
    it instead of duplicating the weights."""

    def __init__(self, model: CAVMAESync):
        self.model = model.eval().requires_grad_(False)
        self._fingerprint: str | None = None

    def __deepcopy__(self, memo: dict) -> FrozenBackbone:
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def width(self, modality: ProbeModality) -> int:
        return self.model.embed_dim * len(MODALITIES[modality])

    @torch.no_grad()
    def tokens(
        self,
        audio: torch.Tensor | None,
        video: torch.Tensor | None,
        modality: ProbeModality,
        token: ProbeToken,
        layer: FeatureLayer = "encoder",
    ) -> torch.Tensor:
        """Eval-mode clips (`audio (B, T, L, mel)`, `video (B, T, 3, H, W)`) -> `(B, T, W)` float.

        Only the modalities the option needs are encoded. The model follows the inputs' device."""
        needed = MODALITIES[modality]
        audio = audio if "audio" in needed else None
        video = video if "video" in needed else None
        for name, value in (("audio", audio), ("video", video)):
            if name in needed and (value is None or value.ndim != (4 if name == "audio" else 5)):
                shape = None if value is None else tuple(value.shape)
                raise ValueError(
                    f"probing needs eval-mode clips with all T pairs: {name} of shape "
                    f"{'(B, T, L, mel)' if name == 'audio' else '(B, T, 3, H, W)'}, got {shape}"
                )
        device = (audio if audio is not None else video).device
        model = self.model.to(device).eval()
        return select_tokens(model.encode(audio, video, layer=layer), modality, token).float()
