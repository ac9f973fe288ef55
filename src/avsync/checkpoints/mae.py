"""Initializing a `CAVMAESync` from an ImageNet MAE ViT (MAE or timm key names), as CAV-MAE's
`adapt_vmae_weights.py` does: the `init_from` of `PretrainModule` and `ImageMAEModule`'s output."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avsync.checkpoints.authors import BLOCK, LEAF
from avsync.checkpoints.formats import CheckpointError, read_weights, state_dict_of, strip_prefix
from avsync.checkpoints.validate import check_finite
from avsync.model import CAVMAESync

log = logging.getLogger(__name__)

#: The released MAE weights the paper's recipe starts from: ViT-B/16 on ImageNet-1K *with its decoder*,
#: trained to reconstruct normalized pixels (facebookresearch/mae issue #8). CAV-MAE's
#: `src/adapt_vmae_weights.py` adapts this file (`mae_pretrain_vit_base_full.pth`) into the
#: `ori_mae_11.pth` that CAV-MAE and CAV-MAE Sync pretrain from (supplementary §6.2). The README's
#: `mae_pretrain_vit_base.pth` is the encoder alone.
MAE_FULL_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base_full.pth"

#: Where to get the file and how to point to it (the end of every error about a missing init file).
MAE_INIT_HINT = (
    f"download {MAE_FULL_URL} (ImageNet MAE ViT-B with its decoder, the file CAV-MAE's "
    "adapt_vmae_weights.py adapts) and pass --model.init_args.init_from=PATH (or set init_from: PATH in the "
    "config); init_from: none starts from random weights on purpose"
)

#: avsync tensors that adapt_vmae_weights.py fills from no MAE weight (they keep their initialization):
#: modality embeddings, registers, the optional contrastive heads.
NOT_FROM_MAE = re.compile(
    r"(audio|video)_tokenizer\.modality|decoder\.modality_(audio|video)|registers\.(audio|video)"
    r"|joint\.contrastive_heads\..*"
)

#: MAE's fixed sin-cos tables (a zero class-token slot, then the patch grid) -> the avsync buffer their
#: patch rows must equal (adapt_vmae_weights.py copies them into `pos_embed_v`, `decoder_pos_embed_v`).
MAE_POSITIONS = {"pos_embed": "video_tokenizer.pos_embed", "decoder_pos_embed": "decoder.pos_video"}


@dataclass
class InitReport:
    """What an initialization copied (`loaded`: avsync keys) and what it left alone, with why."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"initialized {len(self.loaded)} tensors; skipped {len(self.skipped)}: " + ", ".join(
            f"{k} ({why})" for k, why in sorted(self.skipped.items())
        )


def _mae_targets(key: str, model: CAVMAESync) -> list[str]:
    """The avsync keys one ImageNet MAE (or timm ViT) tensor initializes."""
    encoder_depth = len(model.audio_encoder)
    if match := re.fullmatch(rf"blocks\.(\d+)\.{BLOCK}\.{LEAF}", key):
        index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
        if index < encoder_depth:
            return [f"audio_encoder.{index}.{part}.{leaf}", f"video_encoder.{index}.{part}.{leaf}"]
        joint_index = index - encoder_depth
        if joint_index >= len(model.joint.blocks):
            return []
        if part.startswith("norm"):
            return [f"joint.blocks.{joint_index}.{part}.{s}.{leaf}" for s in ("joint", "audio", "video")]
        return [f"joint.blocks.{joint_index}.{part}.{leaf}"]
    if match := re.fullmatch(rf"(?:norm|fc_norm)\.{LEAF}", key):
        return [f"joint.{n}.{match.group(1)}" for n in ("norm", "norm_audio", "norm_video")]
    if match := re.fullmatch(rf"patch_embed\.proj\.{LEAF}", key):
        return [
            f"video_tokenizer.patch_embed.proj.{match.group(1)}",
            f"audio_tokenizer.patch_embed.proj.{match.group(1)}",
        ]
    if match := re.fullmatch(rf"decoder_blocks\.(\d+)\.{BLOCK}\.{LEAF}", key):
        return [f"decoder.blocks.{match.group(1)}.{match.group(2)}.{match.group(3)}"]
    renames = {"decoder_embed": "decoder.embed", "decoder_norm": "decoder.norm"}
    if match := re.fullmatch(rf"(decoder_embed|decoder_norm)\.{LEAF}", key):
        return [f"{renames[match.group(1)]}.{match.group(2)}"]
    if match := re.fullmatch(rf"decoder_pred\.{LEAF}", key):  # both heads (`_mae_value` cuts the audio one)
        return [f"decoder.predict_video.{match.group(1)}", f"decoder.predict_audio.{match.group(1)}"]
    if key == "mask_token":
        return ["decoder.mask_token"]
    if key == "cls_token":  # adapt_vmae_weights.py: cls_token_a and cls_token_v
        return ["global_tokens.audio", "global_tokens.video"]
    return []


def _mae_value(target: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The part of an MAE tensor that `target` takes, cut as adapt_vmae_weights.py cuts it: the audio
    patch filter is the sum of the RGB filters; the audio reconstruction head takes the first `p*p` rows
    of the RGB head (MAE's rows run pixel-major, channel-minor, so these are not one colour's rows: the
    authors' choice, kept)."""
    if target == "audio_tokenizer.patch_embed.proj.weight" and tensor.ndim == 4:
        return tensor.sum(dim=1, keepdim=True)
    if target.startswith("decoder.predict_audio.") and tensor.shape[0] == 3 * shape[0]:
        return tensor[: shape[0]]
    return tensor


def _position_check(key: str, tensor: torch.Tensor, model: CAVMAESync) -> str | None:
    """None when the patch rows of MAE's fixed table `key` equal avsync's (recomputed) table, else why not."""
    reference = dict(model.named_buffers())[MAE_POSITIONS[key]]
    rows = tensor[:, -reference.shape[1] :] if tensor.ndim == 3 else tensor
    if rows.shape != reference.shape:
        return f"{key} {tuple(tensor.shape)} does not fit the {tuple(reference.shape)} patch grid"
    if not torch.allclose(rows.float(), reference, atol=1e-5):
        return f"{key} is not the fixed sin-cos table (learned positions?)"
    return None


def _summarize(keys: list[str]) -> str:
    """avsync keys, a block whose tensors are all listed as one `prefix.*`."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        match = re.match(r"(.+?\.\d+)\.", key)
        groups.setdefault(match.group(1) if match else key, []).append(key)
    return ", ".join(f"{prefix}.*" if len(members) > 1 else members[0] for prefix, members in groups.items())


def init_from_mae(model: CAVMAESync, path_or_state_dict, *, complete: bool = False) -> InitReport:
    """Initialize from an ImageNet MAE ViT (MAE or timm key names) as CAV-MAE's adapt_vmae_weights.py
    does: blocks 0..d-1 into both modality encoders, block d into the joint layer (its LayerNorms into
    all three sets), the final norm into the three output norms, the class token into both global
    tokens, the MAE decoder (when present) into the decoder, its pixel head into the video head and its
    first `p*p` rows into the audio head. The audio patch convolution takes the sum of the RGB filters.
    MAE's fixed position tables must be avsync's (they are recomputed, not copied). Shapes must match;
    the report lists the rest.

    `complete` (the paper's recipe): every tensor adapt_vmae_weights.py fills must come from the file,
    so that an encoder-only file (`mae_pretrain_vit_base.pth`) cannot leave the decoder random unnoticed.
    """
    source = "state dict"
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        path_or_state_dict = read_weights(path_or_state_dict)
    state = strip_prefix(state_dict_of(path_or_state_dict, source))
    check_finite(state, source)
    own = model.state_dict()
    report = InitReport()
    updates: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    wrong_positions: list[str] = []
    for key, tensor in state.items():
        if key in MAE_POSITIONS:
            problem = _position_check(key, tensor, model)
            report.skipped[key] = problem or "the fixed sin-cos table, equal to avsync's (recomputed)"
            wrong_positions += [problem] if problem else []
            continue
        targets = [t for t in _mae_targets(key, model) if t in own]
        if not targets:
            report.skipped[key] = "no counterpart in this model"
            continue
        for target in targets:
            value = _mae_value(target, tensor, own[target].shape)
            if value.shape != own[target].shape:
                mismatched.append(f"{key} {tuple(value.shape)} -> {target} {tuple(own[target].shape)}")
            else:
                updates[target] = value
                report.loaded.append(target)
    if mismatched:
        raise CheckpointError(f"{source}: shapes do not match this model: " + "; ".join(mismatched))
    if not updates:
        raise CheckpointError(f"{source}: nothing in it matches a ViT/MAE layout")
    unfilled = [k for k in own if k not in updates and not NOT_FROM_MAE.fullmatch(k)]
    if complete and (unfilled or wrong_positions):
        problems = [f"nothing for {_summarize(unfilled)}"] if unfilled else []
        if not any(k.startswith("decoder_") for k in state):
            problems.append("it has no decoder (the encoder-only mae_pretrain_vit_base.pth?)")
        raise CheckpointError(
            f"{source}: not the full MAE checkpoint this recipe starts from: "
            + "; ".join(problems + wrong_positions)
            + f"; {MAE_INIT_HINT}"
        )
    model.load_state_dict(updates, strict=False)
    for key in sorted(set(own) - set(updates)):
        report.skipped.setdefault(key, "not in the MAE checkpoint; keeps its initialization")
    log.info("MAE init from %s: %s", source, report.summary())
    return report
