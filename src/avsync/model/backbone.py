"""CAV-MAE Sync: two modality encoders, a shared joint layer, global tokens, registers and an MAE decoder.

Data flow per modality (SPEC §2): patches -> (masking) -> `[global, patches, registers]` -> modality
encoder -> drop registers -> joint layer. The joint layer runs three passes (see `joint.py`); the
fused pass feeds the decoder, the per-modality passes give the global tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from avsync.config_checks import ConfigError, check_count, check_number
from avsync.model.decoder import Decoder
from avsync.model.embeddings import (
    ModalityTokenizer,
    patchify_audio,
    patchify_video,
    spectrogram_as_image,
    unpatchify_audio,
    unpatchify_video,
)
from avsync.model.global_token import GlobalTokens
from avsync.model.joint import JointLayer
from avsync.model.masking import AudioMaskMode, Masking, mask_from_noise, structure_audio_noise
from avsync.model.registers import Registers
from avsync.model.transformer import init_like_authors, stack
from avsync.objectives import InfoNCE, masked_mse

Modality = Literal["audio", "video"]
#: Where `encode` reads its features: after the joint layer and its modality LayerNorm (retrieval,
#: localization, the contrastive objective), or as the modality encoders leave them (the authors'
#: classifier, `CAVMAEFT`, which the paper's linear probing uses).
FeatureLayer = Literal["joint", "encoder"]
FEATURE_LAYERS: tuple[FeatureLayer, ...] = ("joint", "encoder")


@dataclass
class Embeddings:
    """Unmasked features of `encode`. Leading dims follow the input: `(B,)` or `(B, T)`.

    `global_*` `(..., D)`: the global tokens after the joint layer and the modality LayerNorm (what
    retrieval uses), or with `encode(layer="encoder")` as they leave the modality encoder, without a
    LayerNorm (what the authors' classifier reads); `patches_*` `(..., N, D)`: patch tokens of the same
    pass (localization); `registers_*` `(..., R, D)`: register tokens as they leave the modality encoder.
    A modality that was not given is `None`.
    """

    global_audio: torch.Tensor | None
    global_video: torch.Tensor | None
    patches_audio: torch.Tensor | None
    patches_video: torch.Tensor | None
    registers_audio: torch.Tensor | None
    registers_video: torch.Tensor | None


@dataclass
class PretrainOutput:
    """Everything a pretraining step reports. `loss` = λc·contrastive + λr·(reconstruction_audio +
    reconstruction_video); `contrastive` is the unweighted InfoNCE. Masks are `(B, N)`, 1 = removed;
    reconstructions are in the input layout, `(B, time, mel)` and `(B, 3, H, W)` (in normalized-patch
    units when `norm_pix_loss`)."""

    loss: torch.Tensor
    reconstruction_audio: torch.Tensor
    reconstruction_video: torch.Tensor
    contrastive: torch.Tensor
    contrastive_accuracy: torch.Tensor
    recon_audio: torch.Tensor
    recon_video: torch.Tensor
    mask_audio: torch.Tensor
    mask_video: torch.Tensor
    global_audio: torch.Tensor
    global_video: torch.Tensor

    @property
    def reconstruction(self) -> torch.Tensor:
        return self.reconstruction_audio + self.reconstruction_video


class CAVMAESync(nn.Module):
    """The CAV-MAE Sync backbone. Defaults are the paper's ViT-B model (see `presets.py`).

    Args:
        image_size: square input frame side, pixels.
        patch_size: patch side for both modalities.
        mel_bins: log-Mel bins of the audio input.
        audio_length: spectrogram frames per audio window (416 = 4.16 s at 10 ms).
        embed_dim, num_heads, mlp_ratio: encoder width.
        encoder_depth: blocks in each modality encoder.
        joint_depth: blocks in the joint layer (1 in the paper and the release). avsync chains them in
            all three passes (block i reads block i-1's output). The authors' code chains them only in
            the joint pass that feeds the decoder: its audio and video passes (`forward_encoder`, and
            `forward_feat` in the CAV-MAE Sync forks we read) run every block on the encoder output and
            keep the last block's result, so above 1 their global tokens come from the last block
            alone (original CAV-MAE's `forward_feat` chains). At depth 1 the two are the same.
        decoder_dim, decoder_depth, decoder_heads: MAE decoder size.
        num_registers: register tokens per modality (0 disables them).
        global_token: learned global tokens; False = CAV-MAE (contrast mean-pooled patches).
        contrastive_head_depth: extra per-modality blocks before the output norm (0 in the release).
        mask_ratio_audio, mask_ratio_video: share of patches removed in pretraining.
        audio_mask_mode: unstructured (default) or the time / freq / time_freq ablations.
        norm_pix_loss: standardize each target patch.
        contrastive_weight, reconstruction_weight: λc and λr.
        temperature: InfoNCE temperature (fixed, not learned).
        bidirectional_contrast: average both InfoNCE directions.
        learned_positions: positional tables as parameters (starting from the fixed sin-cos ones), as
            the authors' `tr_pos=True` (the default of their classifier `CAVMAEFT`); off in pretraining.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        mel_bins: int = 128,
        audio_length: int = 416,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        encoder_depth: int = 11,
        joint_depth: int = 1,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        num_registers: int = 8,
        global_token: bool = True,
        contrastive_head_depth: int = 0,
        mask_ratio_audio: float = 0.75,
        mask_ratio_video: float = 0.75,
        audio_mask_mode: AudioMaskMode = "unstructured",
        norm_pix_loss: bool = False,
        contrastive_weight: float = 0.1,
        reconstruction_weight: float = 1.0,
        temperature: float = 0.05,
        bidirectional_contrast: bool = False,
        learned_positions: bool = False,
    ):
        super().__init__()
        _check_settings(locals())  # ConfigError naming the key, before any layer is built
        self.config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        if not learned_positions:  # recorded only when set, so that other models' fingerprints stay
            del self.config["learned_positions"]
        self.image_size, self.patch_size = image_size, patch_size
        self.mel_bins, self.audio_length = mel_bins, audio_length
        self.embed_dim = embed_dim
        self.mask_ratio = {"audio": mask_ratio_audio, "video": mask_ratio_video}
        self.audio_mask_mode = audio_mask_mode
        self.norm_pix_loss = norm_pix_loss
        self.contrastive_weight, self.reconstruction_weight = contrastive_weight, reconstruction_weight

        self.audio_tokenizer = ModalityTokenizer(
            mel_bins, audio_length, 1, patch_size, embed_dim, learned_positions
        )
        self.video_tokenizer = ModalityTokenizer(
            image_size, image_size, 3, patch_size, embed_dim, learned_positions
        )
        self.global_tokens = GlobalTokens(embed_dim, enabled=global_token)
        self.registers = Registers(embed_dim, num_registers)
        self.audio_encoder = stack(encoder_depth, embed_dim, num_heads, mlp_ratio)
        self.video_encoder = stack(encoder_depth, embed_dim, num_heads, mlp_ratio)
        self.joint = JointLayer(embed_dim, num_heads, joint_depth, mlp_ratio, contrastive_head_depth)
        self.decoder = Decoder(
            embed_dim,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            audio_grid=self.audio_tokenizer.grid,
            video_grid=self.video_tokenizer.grid,
            patch_size=patch_size,
            mlp_ratio=mlp_ratio,
            learned_positions=learned_positions,
        )
        self.contrastive = InfoNCE(temperature, bidirectional_contrast)
        self._init_weights()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides) -> CAVMAESync:
        from avsync.model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_authors_checkpoint(cls, path, **_) -> CAVMAESync:
        """Moved: reading checkpoint files is `avsync.checkpoints`' job, and the model imports none of it
        (docs/architecture.md). Says where the call went instead of failing with an AttributeError."""
        raise AttributeError(
            "CAVMAESync.from_authors_checkpoint moved: use avsync.checkpoints.load_authors_checkpoint"
            f"({str(path)!r}) or avsync.load({str(path)!r})"
        )

    def _init_weights(self) -> None:
        """The authors' initialization (`CAVMAE.initialize_weights` and `_init_weights`): xavier-uniform
        linears (and patch convolutions seen as linears), zero biases, unit LayerNorms, N(0, 0.02)
        modality embeddings and mask token. The global tokens are drawn N(0, 0.02) and the registers
        N(0, 1) where they are made (`global_token.py`, `registers.py`); the patch convolutions' biases
        keep PyTorch's default, as theirs do. `tests/model/test_init_and_loading.py` checks each."""
        self.apply(init_like_authors)
        for tokenizer in (self.audio_tokenizer, self.video_tokenizer):
            weight = tokenizer.patch_embed.proj.weight
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.normal_(tokenizer.modality, std=0.02)
        for parameter in (self.decoder.modality_audio, self.decoder.modality_video, self.decoder.mask_token):
            nn.init.normal_(parameter, std=0.02)

    # ------------------------------------------------------------------ shared pieces
    @property
    def num_patches(self) -> dict[Modality, int]:
        return {"audio": self.audio_tokenizer.num_patches, "video": self.video_tokenizer.num_patches}

    def _check_inputs(self, audio: torch.Tensor | None, video: torch.Tensor | None) -> None:
        if audio is not None and tuple(audio.shape[-2:]) != (self.audio_length, self.mel_bins):
            raise ValueError(
                f"audio must be (..., {self.audio_length}, {self.mel_bins}) spectrogram windows "
                f"(time, mel); got shape {tuple(audio.shape)}"
            )
        expected_video = (3, self.image_size, self.image_size)
        if video is not None and tuple(video.shape[-3:]) != expected_video:
            raise ValueError(
                f"video must be (..., 3, {self.image_size}, {self.image_size}) frames; "
                f"got {tuple(video.shape)}"
            )

    def tokenize(self, audio: torch.Tensor | None, video: torch.Tensor | None):
        """Patch tokens with positions and modality embeddings, `(B, N, D)` per modality."""
        return (
            None if audio is None else self.audio_tokenizer(spectrogram_as_image(audio)),
            None if video is None else self.video_tokenizer(video),
        )

    def _encode_modality(
        self, patches: torch.Tensor, modality: Modality
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[global, patches, registers]` through the modality encoder; returns the sequence without
        registers and the registers."""
        tokens = self.registers.append(self.global_tokens.prepend(patches, modality), modality)
        encoder = self.audio_encoder if modality == "audio" else self.video_encoder
        return self.registers.drop(encoder(tokens))

    # ------------------------------------------------------------------ inference
    def encode(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        layer: FeatureLayer = "joint",
    ) -> Embeddings:
        """Unmasked features. `audio` `(B, L, mel)` or `(B, T, L, mel)`; `video` `(B, 3, H, W)` or
        `(B, T, 3, H, W)`. Either may be None; neither the decoder nor the fused joint pass runs.
        `layer="encoder"` skips the joint layer too: the tokens as the modality encoders leave them."""
        if audio is None and video is None:
            raise ValueError("encode needs audio, video or both")
        if layer not in FEATURE_LAYERS:
            raise ValueError(f"layer must be one of {list(FEATURE_LAYERS)}, got {layer!r}")
        self._check_inputs(audio, video)
        lead = audio.shape[:-2] if audio is not None else video.shape[:-3]
        if audio is not None and video is not None and video.shape[:-3] != lead:
            raise ValueError(
                f"audio and video batch/time dims differ: {tuple(lead)} vs {tuple(video.shape[:-3])}"
            )
        if len(lead) not in (1, 2):
            raise ValueError(f"encode takes (B, ...) or (B, T, ...) inputs; got leading dims {tuple(lead)}")
        flat_audio = None if audio is None else audio.reshape(-1, *audio.shape[-2:])
        flat_video = None if video is None else video.reshape(-1, *video.shape[-3:])
        tokens = dict(zip(("audio", "video"), self.tokenize(flat_audio, flat_video), strict=True))
        out: dict[str, torch.Tensor | None] = {}
        for modality, patches in tokens.items():
            if patches is None:
                out |= {
                    f"global_{modality}": None,
                    f"patches_{modality}": None,
                    f"registers_{modality}": None,
                }
                continue
            sequence, registers = self._encode_modality(patches, modality)
            if layer == "joint":
                sequence = self.joint.modality(sequence, modality)
            summary, patch_features = self.global_tokens.split(sequence)
            out[f"global_{modality}"] = summary.reshape(*lead, -1)
            out[f"patches_{modality}"] = patch_features.reshape(*lead, *patch_features.shape[1:])
            out[f"registers_{modality}"] = registers.reshape(*lead, *registers.shape[1:])
        return Embeddings(**out)

    # ------------------------------------------------------------------ pretraining
    def draw_noise(self, batch: int, device: torch.device, generator: torch.Generator | None = None):
        """Uniform masking noise for a batch, `(noise_audio, noise_video)`."""
        return tuple(
            torch.rand(batch, self.num_patches[m], device=device, generator=generator)
            for m in ("audio", "video")
        )

    def _mask(self, noise: torch.Tensor, modality: Modality) -> Masking:
        expected = (self.num_patches[modality],)
        if tuple(noise.shape[1:]) != expected:
            raise ValueError(f"{modality} masking noise must be (B, {expected[0]}); got {tuple(noise.shape)}")
        if modality == "audio":
            noise = structure_audio_noise(
                noise, self.audio_mask_mode, *self.audio_tokenizer.grid, ratio=self.mask_ratio["audio"]
            )
        return mask_from_noise(noise, self.mask_ratio[modality])

    def pretrain_loss(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        noise_a: torch.Tensor | None = None,
        noise_v: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """One masked forward pass and the full objective on `(B, L, mel)` audio and `(B, 3, H, W)` video.

        `noise_a` `(B, N_audio)` and `noise_v` `(B, N_video)` decide the masking (lowest noise kept);
        drawn uniformly when omitted.
        """
        self._check_inputs(audio, video)
        if audio.ndim != 3 or video.ndim != 4 or audio.shape[0] != video.shape[0]:
            raise ValueError(
                f"pretrain_loss takes one pair per sample: audio (B, L, mel) and video (B, 3, H, W); "
                f"got {tuple(audio.shape)} and {tuple(video.shape)}"
            )
        if noise_a is None or noise_v is None:
            drawn_a, drawn_v = self.draw_noise(audio.shape[0], audio.device)
            noise_a = drawn_a if noise_a is None else noise_a
            noise_v = drawn_v if noise_v is None else noise_v
        audio_mask, video_mask = self._mask(noise_a, "audio"), self._mask(noise_v, "video")
        audio_tokens, video_tokens = self.tokenize(audio, video)

        audio_sequence, _ = self._encode_modality(audio_mask.select(audio_tokens), "audio")
        video_sequence, _ = self._encode_modality(video_mask.select(video_tokens), "video")

        fused = self.joint.fuse(
            self.global_tokens.patches(audio_sequence), self.global_tokens.patches(video_sequence)
        )
        global_audio, _ = self.global_tokens.split(self.joint.modality(audio_sequence, "audio"))
        global_video, _ = self.global_tokens.split(self.joint.modality(video_sequence, "video"))

        predicted_audio, predicted_video = self.decoder(fused, audio_mask, video_mask)
        loss_audio = masked_mse(
            predicted_audio, patchify_audio(audio, self.patch_size), audio_mask.mask, self.norm_pix_loss
        )
        loss_video = masked_mse(
            predicted_video, patchify_video(video, self.patch_size), video_mask.mask, self.norm_pix_loss
        )
        contrastive, accuracy = self.contrastive(global_audio, global_video)
        loss = self.contrastive_weight * contrastive + self.reconstruction_weight * (loss_audio + loss_video)
        return PretrainOutput(
            loss=loss,
            reconstruction_audio=loss_audio,
            reconstruction_video=loss_video,
            contrastive=contrastive,
            contrastive_accuracy=accuracy,
            recon_audio=unpatchify_audio(predicted_audio, self.patch_size, self.mel_bins),
            recon_video=unpatchify_video(predicted_video, self.patch_size, self.image_size),
            mask_audio=audio_mask.mask,
            mask_video=video_mask.mask,
            global_audio=global_audio,
            global_video=global_video,
        )

    def forward(self, audio: torch.Tensor, video: torch.Tensor, **noise) -> PretrainOutput:
        return self.pretrain_loss(audio, video, **noise)


def _check_settings(settings: dict) -> None:
    """Refuse a backbone no run can use (`ConfigError`, naming the key) before any layer is built: these
    used to fail as tracebacks of the layers (a zero division, timm's shape errors) or, for a mask ratio of
    1, only at the first training step."""
    owner = "CAVMAESync"
    for name in ("image_size", "patch_size", "mel_bins", "audio_length", "embed_dim", "num_heads"):
        check_count(owner, name, settings[name], 1)
    for name in ("decoder_dim", "decoder_heads"):
        check_count(owner, name, settings[name], 1)
    for name in ("encoder_depth", "joint_depth", "decoder_depth", "num_registers", "contrastive_head_depth"):
        check_count(owner, name, settings[name], 0)
    check_number(owner, "mlp_ratio", settings["mlp_ratio"], 0, low_open=True)
    check_number(owner, "temperature", settings["temperature"], 0, low_open=True)
    for name in ("mask_ratio_audio", "mask_ratio_video"):  # 1.0 would leave no patch to encode
        check_number(owner, name, settings[name], 0, 1, high_open=True)
    for name in ("contrastive_weight", "reconstruction_weight"):
        check_number(owner, name, settings[name], 0)
    mode, modes = settings["audio_mask_mode"], get_args(AudioMaskMode)
    if mode not in modes:
        raise ConfigError(f"{owner}: audio_mask_mode {mode!r} is not a masking mode; use one of {modes}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
        if settings[width] % settings[heads] or settings[width] % 4:
            raise ConfigError(
                f"{owner}: {width}={settings[width]} must divide into {heads}={settings[heads]} heads and be "
                "a multiple of 4 (2-D sin-cos positions)"
            )
    for name in ("image_size", "mel_bins", "audio_length"):
        if settings[name] % settings["patch_size"]:
            raise ConfigError(
                f"{owner}: {name}={settings[name]} is not a whole number of "
                f"patch_size={settings['patch_size']} patches"
            )
