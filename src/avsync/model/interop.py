"""Weights from elsewhere: the authors' CAV-MAE Sync / CAV-MAE checkpoints and ImageNet MAE ViTs.

Each format is described by a table of key rules; anything a rule does not cover is an error that
lists the keys, never silently dropped. Positional embeddings are fixed sin-cos in every format:
they are recomputed here and a file whose tables differ is refused.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avsync.checkpoint_io import CheckpointError, check_finite, read_weights, state_dict_of
from avsync.model.backbone import CAVMAESync

log = logging.getLogger(__name__)

_LEAF = r"(weight|bias)"
_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

#: authors' key pattern -> avsync key template
AUTHORS_RULES: list[tuple[str, str]] = [
    (rf"patch_embed_a\.proj\.{_LEAF}", r"audio_tokenizer.patch_embed.proj.\1"),
    (rf"patch_embed_v\.proj\.{_LEAF}", r"video_tokenizer.patch_embed.proj.\1"),
    (r"modality_a", "audio_tokenizer.modality"),
    (r"modality_v", "video_tokenizer.modality"),
    (r"cls_token_a", "global_tokens.audio"),
    (r"cls_token_v", "global_tokens.video"),
    (rf"blocks_a\.(\d+)\.{_BLOCK}\.{_LEAF}", r"audio_encoder.\1.\2.\3"),
    (rf"blocks_v\.(\d+)\.{_BLOCK}\.{_LEAF}", r"video_encoder.\1.\2.\3"),
    (rf"blocks_u\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{_LEAF}", r"joint.blocks.\1.\2.\3"),
    (rf"blocks_u\.(\d+)\.(norm[12])\.{_LEAF}", r"joint.blocks.\1.\2.joint.\3"),
    (rf"blocks_u\.(\d+)\.(norm[12])_a\.{_LEAF}", r"joint.blocks.\1.\2.audio.\3"),
    (rf"blocks_u\.(\d+)\.(norm[12])_v\.{_LEAF}", r"joint.blocks.\1.\2.video.\3"),
    (rf"norm\.{_LEAF}", r"joint.norm.\1"),
    (rf"norm_a\.{_LEAF}", r"joint.norm_audio.\1"),
    (rf"norm_v\.{_LEAF}", r"joint.norm_video.\1"),
    (rf"constrative_head_audio\.(\d+)\.{_BLOCK}\.{_LEAF}", r"joint.contrastive_heads.audio.\1.\2.\3"),
    (rf"constrative_head_visual\.(\d+)\.{_BLOCK}\.{_LEAF}", r"joint.contrastive_heads.video.\1.\2.\3"),
    (rf"decoder_embed\.{_LEAF}", r"decoder.embed.\1"),
    (r"mask_token", "decoder.mask_token"),
    (r"decoder_modality_a", "decoder.modality_audio"),
    (r"decoder_modality_v", "decoder.modality_video"),
    (rf"decoder_blocks\.(\d+)\.{_BLOCK}\.{_LEAF}", r"decoder.blocks.\1.\2.\3"),
    (rf"decoder_norm\.{_LEAF}", r"decoder.norm.\1"),
    (rf"decoder_pred_a\.{_LEAF}", r"decoder.predict_audio.\1"),
    (rf"decoder_pred_v\.{_LEAF}", r"decoder.predict_video.\1"),
]

#: Every authors' block carries all three LayerNorm sets, but only the joint block reads `_a`/`_v`.
AUTHORS_UNUSED = re.compile(
    rf"(blocks_a|blocks_v|decoder_blocks|constrative_head_audio|constrative_head_visual)\.\d+\.norm[12]_[av]\.{_LEAF}"
)

#: Fixed sin-cos tables in the authors' file -> the avsync buffer they must equal.
AUTHORS_FIXED = {
    "pos_embed_a": "audio_tokenizer.pos_embed",
    "pos_embed_v": "video_tokenizer.pos_embed",
    "decoder_pos_embed_a": "decoder.pos_audio",
    "decoder_pos_embed_v": "decoder.pos_video",
}

#: The authors' constructor arguments and the avsync argument each one sets.
AUTHORS_ARGUMENTS = {
    "audio_length": "audio_length",
    "img_size": "image_size",
    "patch_size": "patch_size",
    "embed_dim": "embed_dim",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "decoder_embed_dim": "decoder_dim",
    "decoder_num_heads": "decoder_heads",
    "decoder_depth": "decoder_depth",
    "num_register_tokens": "num_registers",
    "cls_token": "global_token",
    "norm_pix_loss": "norm_pix_loss",
    "tr_pos": "learned_positions",
}
#: Authors' arguments that do not change the backbone (data or training settings).
AUTHORS_IGNORED_ARGUMENTS = {"total_frame", "in_chans"}
#: Authors' switches whose True changes what their code computes in a way avsync does not implement:
#: accepted when False (the released model's setting), refused with the reason when True.
AUTHORS_UNSUPPORTED_SWITCHES = {
    "keep_register_tokens": "the authors' code then runs the register tokens through the joint layer and "
    "drops them after it; avsync drops them before it, as the released model does",
    "global_local_losses": "the authors' training then averages the InfoNCE of the global tokens with that "
    "of the mean-pooled patch tokens; avsync contrasts the global tokens only",
}


def _translate(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(template)
    return None


_GROUP = re.compile(r"\([^()]*\)")


def _inverted(pattern: str, template: str) -> tuple[str, str]:
    """An `AUTHORS_RULES` entry turned around: (avsync key pattern, authors' key template)."""
    groups = _GROUP.findall(pattern)
    parts = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
    avsync = "".join(re.escape(part) if i % 2 == 0 else groups[int(part) - 1] for i, part in enumerate(parts))
    numbers = iter(range(1, len(groups) + 1))
    authors = _GROUP.sub(lambda _: f"\\{next(numbers)}", pattern).replace("\\.", ".")
    return avsync, authors


#: avsync key pattern -> the authors' key template (for naming missing weights as the file names them)
AVSYNC_TO_AUTHORS = [_inverted(pattern, template) for pattern, template in AUTHORS_RULES]


def authors_key(key: str) -> str:
    """The authors' name of an avsync state-dict key (the key itself when there is no counterpart)."""
    if key in ("registers.audio", "registers.video"):
        return "register_tokens"
    fixed = {avsync: authors for authors, avsync in AUTHORS_FIXED.items()}
    return fixed.get(key) or _translate(key, AVSYNC_TO_AUTHORS) or key


def format_name(state: dict[str, torch.Tensor]) -> str:
    """Which of the authors' models a state dict holds: CAV-MAE Sync has global or register tokens."""
    return "CAV-MAE Sync" if "cls_token_a" in state or "register_tokens" in state else "CAV-MAE"


def _describe_missing(missing: list[str], expected: list[str]) -> list[str]:
    """Missing avsync keys as the authors' file names them, `(avsync ...)` beside; a block whose every
    tensor is missing is one `blocks_a.10.*` entry."""
    by_block: dict[str, list[str]] = {}
    for key in missing:
        name = authors_key(key)
        match = re.match(r"(.+?\.\d+)\.", name)
        by_block.setdefault(match.group(1) if match else name, []).append(key)
    entries = []
    for block, keys in sorted(by_block.items()):
        whole = [k for k in expected if authors_key(k).startswith(block + ".")]
        if len(keys) > 1 and len(keys) == len(whole):
            prefix = os.path.commonprefix(keys)
            entries.append(f"{block}.* (avsync {prefix[: prefix.rfind('.') + 1]}*)")
        else:
            entries += [f"{authors_key(k)} (avsync {k})" for k in sorted(keys)]
    return entries


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_authors_config(state: dict[str, torch.Tensor]) -> dict:
    """avsync constructor arguments readable off the authors' tensor shapes (not the head counts)."""
    try:
        embed_dim = state["patch_embed_v.proj.weight"].shape[0]
        patch = state["patch_embed_v.proj.weight"].shape[-1]
        video_patches = state["pos_embed_v"].shape[1]
        audio_patches = state["pos_embed_a"].shape[1]
        mel_bins = 128  # the authors' audio grid is always 8 frequency patches of 16 bins
        config = dict(
            embed_dim=embed_dim,
            patch_size=patch,
            image_size=round(video_patches**0.5) * patch,
            mel_bins=mel_bins,
            audio_length=audio_patches * patch * patch // mel_bins,
            mlp_ratio=state["blocks_a.0.mlp.fc1.weight"].shape[0] / embed_dim,
            # the deeper encoder sets the depth, so that a block missing from one is reported missing
            encoder_depth=max(1, _count(state, "blocks_a"), _count(state, "blocks_v")),
            joint_depth=max(1, _count(state, "blocks_u")),
            decoder_dim=state["decoder_embed.weight"].shape[0],
            decoder_depth=_count(state, "decoder_blocks"),
            num_registers=state["register_tokens"].shape[0] // 2 if "register_tokens" in state else 0,
            global_token="cls_token_a" in state,
            contrastive_head_depth=_count(state, "constrative_head_audio"),
        )
    except KeyError as error:
        raise CheckpointError(f"not a CAV-MAE / CAV-MAE Sync state dict: missing {error}") from error
    config["num_heads"] = max(1, embed_dim // 64)
    config["decoder_heads"] = max(1, config["decoder_dim"] // 32)
    return config


def _authors_config(state: dict[str, torch.Tensor], authors_kwargs: dict) -> dict:
    config = infer_authors_config(state)
    unknown = (
        set(authors_kwargs)
        - set(AUTHORS_ARGUMENTS)
        - AUTHORS_IGNORED_ARGUMENTS
        - set(AUTHORS_UNSUPPORTED_SWITCHES)
        - {"modality_specific_depth", "contrastive_heads"}
    )
    if unknown:
        raise CheckpointError(f"unknown authors' constructor arguments: {sorted(unknown)}")
    for switch, reason in AUTHORS_UNSUPPORTED_SWITCHES.items():
        if authors_kwargs.get(switch):
            raise CheckpointError(f"{switch}=True is not supported by avsync: {reason}")
    given = {AUTHORS_ARGUMENTS[k]: v for k, v in authors_kwargs.items() if k in AUTHORS_ARGUMENTS}
    if "modality_specific_depth" in authors_kwargs:
        given["encoder_depth"] = authors_kwargs["modality_specific_depth"]
        given["joint_depth"] = 12 - authors_kwargs["modality_specific_depth"]
    if "contrastive_heads" in authors_kwargs:
        given["contrastive_head_depth"] = 2 if authors_kwargs["contrastive_heads"] else 0
    conflicts = {
        k: (v, config[k])
        for k, v in given.items()
        if k in config and k not in ("num_heads", "decoder_heads", "norm_pix_loss") and config[k] != v
    }
    if conflicts:
        detail = ", ".join(f"{k}: given {a}, weights say {b}" for k, (a, b) in sorted(conflicts.items()))
        raise CheckpointError(f"authors' arguments disagree with the checkpoint's shapes: {detail}")
    return {**config, **given}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def convert_authors_state_dict(
    state: dict[str, torch.Tensor], model: CAVMAESync, source: str = "checkpoint", *, values: bool = True
) -> dict[str, torch.Tensor]:
    """The authors' keys renamed to avsync's; every problem is collected and raised together.

    `values=False` checks names and shapes only (a `model` on the `meta` device has no values to
    compare the fixed positional tables with)."""
    expected = model.state_dict()
    buffers = dict(model.named_buffers())
    converted: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape, wrong_fixed = [], [], []
    for key, tensor in state.items():
        if AUTHORS_UNUSED.fullmatch(key):
            continue
        if key in AUTHORS_FIXED and AUTHORS_FIXED[key] in expected:  # learned positions: weights
            target = AUTHORS_FIXED[key]
            if tensor.shape != expected[target].shape:
                wrong_shape.append(f"{key}: {tuple(tensor.shape)} vs {tuple(expected[target].shape)}")
            else:
                converted[target] = tensor
            continue
        if key in AUTHORS_FIXED:
            reference = buffers[AUTHORS_FIXED[key]]
            if tensor.shape != reference.shape or (
                values and not torch.allclose(tensor.float(), reference, atol=1e-5)
            ):
                wrong_fixed.append(key)
            continue
        if key == "register_tokens":
            count = model.registers.count
            if tensor.shape != (2 * count, model.embed_dim):
                wrong_shape.append(f"{key}: {tuple(tensor.shape)} vs {(2 * count, model.embed_dim)}")
                continue
            converted["registers.audio"], converted["registers.video"] = tensor[:count], tensor[count:]
            continue
        target = _translate(key, AUTHORS_RULES)
        if target is None or target not in expected:
            unexpected.append(key)
        elif tensor.shape != expected[target].shape:
            wrong_shape.append(f"{key}: {tuple(tensor.shape)} vs {tuple(expected[target].shape)}")
        else:
            converted[target] = tensor
    if model.registers.count == 0 and "register_tokens" not in state:  # original CAV-MAE: no registers
        converted["registers.audio"], converted["registers.video"] = (
            model.registers.audio,
            model.registers.video,
        )
    missing = sorted(set(expected) - set(converted))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(_describe_missing(missing, list(expected)))}")
    if unexpected:
        problems.append(f"unexpected keys {sorted(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {wrong_shape}")
    if wrong_fixed:
        problems.append(
            f"positional tables that are not the fixed sin-cos ones: {wrong_fixed} (learned positions: "
            "pass tr_pos=True)"
        )
    if problems:
        raise CheckpointError(f"{source}: cannot load as {format_name(state)}: " + "; ".join(problems))
    return converted


def _check_names(state: dict[str, torch.Tensor], config: dict, source: str) -> None:
    """Missing, unexpected and misshapen keys, named before any size check: a file without
    `blocks_a.10` is reported as missing `blocks_a.10.*`, not as too small. Built on the `meta` device
    (nothing allocated), and only for configs with no more blocks than the file has tensors."""
    depths = ("encoder_depth", "joint_depth", "decoder_depth", "contrastive_head_depth")
    if sum(int(config.get(name, 0)) for name in depths) > len(state):
        return  # an implausible config: build_backbone refuses it
    try:
        with torch.device("meta"):
            skeleton = CAVMAESync(**config)
    except Exception:  # noqa: BLE001 - build_backbone reports what is wrong with the config
        return
    convert_authors_state_dict(state, skeleton, source, values=False)


def load_authors_checkpoint(path_or_state_dict, *, source: str | None = None, **authors_kwargs) -> CAVMAESync:
    """A `CAVMAESync` holding the authors' released weights (with or without the `module.` prefix).

    `authors_kwargs` are the authors' constructor arguments (e.g. `num_heads`, which the weights cannot
    reveal); sizes readable off the tensors are checked against them. `source` names the data in errors.
    """
    source = source or "state dict"
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        path_or_state_dict = read_weights(path_or_state_dict)
    state = strip_prefix(state_dict_of(path_or_state_dict, source))
    try:
        config = _authors_config(state, authors_kwargs)
    except (IndexError, ZeroDivisionError) as error:  # tensors of the wrong rank or empty
        raise CheckpointError(f"{source}: not a CAV-MAE / CAV-MAE Sync state dict ({error})") from None
    from avsync.loading import build_backbone  # not at the top: avsync.loading imports this module

    _check_names(state, config, source)
    model = build_backbone(config, state, source, exact=False)  # refuses before allocating
    model.load_state_dict(convert_authors_state_dict(state, model, source))
    return model


# ------------------------------------------------------------------------- the authors' classifier

#: The authors' classifier head (`CAVMAEFT` with `aggregate="self_attention_cls"`) -> `ProbeHead` keys.
AUTHORS_CLASSIFIER_RULES: list[tuple[str, str]] = [
    (r"cls_cls_token", "cls"),
    (rf"classifier_layers\.(\d+)\.{_BLOCK}\.{_LEAF}", r"blocks.\1.\2.\3"),
    (rf"classifier_norm\.{_LEAF}", r"norm.\1"),
    (rf"classifier_head\.{_LEAF}", r"classifier.\1"),
]
AUTHORS_CLASSIFIER_UNUSED = re.compile(rf"classifier_layers\.\d+\.norm[12]_[av]\.{_LEAF}")
#: `CAVMAEFT` arguments that shape its classifier (or its use of the backbone), not the backbone.
AUTHORS_CLASSIFIER_ARGUMENTS = {"label_dim", "aggregate", "mode", "joint_layers", "contrastive_head"}
_HEAD_ENDS, _LEAVES = (("norm", "norm"), ("head", "classifier")), ("weight", "bias")
#: The decoder width given to a backbone loaded from a classifier file (which holds no decoder).
_ABSENT_DECODER_DIM = 32


@dataclass
class AuthorsClassifier:
    """The authors' `CAVMAEFT` file in avsync's terms: the backbone and a `ProbeHead`'s weights.

    The probe must read the tokens their classifier reads, `layer="encoder"` (`a[:, 0]`, `v[:, 0]` as
    the modality encoders leave them). The file holds no decoder: `backbone` has an inert one (no
    blocks, zero weights), so that it is a complete and deterministic `CAVMAESync`.
    """

    backbone: CAVMAESync
    head_config: dict  # `ProbeHead` constructor arguments
    head_state: dict[str, torch.Tensor]  # `ProbeHead` state dict


def _absent_decoder(state: dict[str, torch.Tensor], learned_positions: bool) -> dict[str, torch.Tensor]:
    """Zero decoder tensors, under the authors' names, for a file without a decoder (positional tables
    too when they are weights; fixed ones are rebuilt)."""
    embed_dim, channels, patch, _ = state["patch_embed_v.proj.weight"].shape
    width = _ABSENT_DECODER_DIM
    positions = {
        f"decoder_{name}": torch.zeros(1, state[name].shape[1], width)
        for name in ("pos_embed_a", "pos_embed_v")
        if learned_positions and name in state
    }
    return positions | {
        "decoder_embed.weight": torch.zeros(width, embed_dim),
        "decoder_embed.bias": torch.zeros(width),
        "mask_token": torch.zeros(1, 1, width),
        "decoder_modality_a": torch.zeros(1, 1, width),
        "decoder_modality_v": torch.zeros(1, 1, width),
        "decoder_norm.weight": torch.ones(width),
        "decoder_norm.bias": torch.zeros(width),
        "decoder_pred_a.weight": torch.zeros(patch * patch, width),
        "decoder_pred_a.bias": torch.zeros(patch * patch),
        "decoder_pred_v.weight": torch.zeros(patch * patch * channels, width),
        "decoder_pred_v.bias": torch.zeros(patch * patch * channels),
    }


def load_authors_classifier(
    path_or_state_dict, *, source: str | None = None, **authors_kwargs
) -> AuthorsClassifier:
    """The authors' classifier (`CAVMAEFT`, `aggregate="self_attention_cls"`, `mode="multimodal"`: a CLS
    token, blocks and a linear layer over the per-frame `[g_a, g_v]`) as a backbone and a probe head.

    `authors_kwargs` are `CAVMAEFT`'s constructor arguments (`num_heads` sets the head's attention
    heads too, as in theirs). Their other heads and modes read other tokens and are refused.
    """
    source = source or "state dict"
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        path_or_state_dict = read_weights(path_or_state_dict)
    state = strip_prefix(state_dict_of(path_or_state_dict, source))
    aggregate, mode = authors_kwargs.get("aggregate", "self_attention_cls"), authors_kwargs.get("mode")
    if aggregate != "self_attention_cls" or "cls_cls_token" not in state:
        held = "holds" if "cls_cls_token" in state else "lacks"
        raise CheckpointError(
            f"{source}: not the authors' self_attention_cls classifier (aggregate={aggregate!r}, the file "
            f"{held} cls_cls_token); only that head is supported"
        )
    if mode not in (None, "multimodal"):
        raise CheckpointError(
            f"{source}: mode={mode!r} is not supported: the authors' classifier then reads the mean of "
            "the joint layer's output, not the global tokens; only mode='multimodal' is"
        )
    if authors_kwargs.get("joint_layers", 1) > 1:
        authors_kwargs.pop("modality_specific_depth", None)  # the weights tell both depths
    head_keys = {k for k in state if k == "cls_cls_token" or k.startswith("classifier_")}
    head_state, unexpected = {}, []
    for key in sorted(head_keys):
        if AUTHORS_CLASSIFIER_UNUSED.fullmatch(key):
            continue
        target = _translate(key, AUTHORS_CLASSIFIER_RULES)
        if target is None:
            unexpected.append(key)
        else:
            head_state[target] = state[key]
    required = {
        "cls_cls_token": "cls",
        **{f"classifier_{part}.{leaf}": f"{name}.{leaf}" for part, name in _HEAD_ENDS for leaf in _LEAVES},
    }
    missing = sorted(authors for authors, ours in required.items() if ours not in head_state)
    if unexpected or missing:
        raise CheckpointError(
            f"{source}: cannot load the classifier: unexpected keys {unexpected}, missing {missing}"
        )
    backbone_kwargs = {k: v for k, v in authors_kwargs.items() if k not in AUTHORS_CLASSIFIER_ARGUMENTS}
    backbone_kwargs.setdefault("tr_pos", True)  # CAVMAEFT's default: its positional tables are weights
    backbone_state = {k: v for k, v in state.items() if k not in head_keys}
    if "decoder_embed.weight" not in backbone_state and "patch_embed_v.proj.weight" in backbone_state:
        backbone_state |= _absent_decoder(backbone_state, bool(backbone_kwargs["tr_pos"]))
    backbone = load_authors_checkpoint(backbone_state, source=source, **backbone_kwargs)
    width = head_state["cls"].shape[-1] if "cls" in head_state else 0
    if width != 2 * backbone.embed_dim:
        raise CheckpointError(
            f"{source}: the classifier is {width} wide; the multimodal head reads [g_a, g_v], "
            f"{2 * backbone.embed_dim} wide"
        )
    head_config = dict(
        width=width,
        num_classes=head_state["classifier.weight"].shape[0],
        depth=_count(state, "classifier_layers"),
        num_heads=backbone.config["num_heads"],
        mlp_ratio=backbone.config["mlp_ratio"],
    )
    label_dim = authors_kwargs.get("label_dim")
    if label_dim is not None and label_dim != head_config["num_classes"]:
        raise CheckpointError(
            f"{source}: label_dim={label_dim} but the classifier has {head_config['num_classes']} outputs"
        )
    return AuthorsClassifier(backbone, head_config, head_state)


# ---------------------------------------------------------------------------------------- ImageNet MAE

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
    if match := re.fullmatch(rf"blocks\.(\d+)\.{_BLOCK}\.{_LEAF}", key):
        index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
        if index < encoder_depth:
            return [f"audio_encoder.{index}.{part}.{leaf}", f"video_encoder.{index}.{part}.{leaf}"]
        joint_index = index - encoder_depth
        if joint_index >= len(model.joint.blocks):
            return []
        if part.startswith("norm"):
            return [f"joint.blocks.{joint_index}.{part}.{s}.{leaf}" for s in ("joint", "audio", "video")]
        return [f"joint.blocks.{joint_index}.{part}.{leaf}"]
    if match := re.fullmatch(rf"(?:norm|fc_norm)\.{_LEAF}", key):
        return [f"joint.{n}.{match.group(1)}" for n in ("norm", "norm_audio", "norm_video")]
    if match := re.fullmatch(rf"patch_embed\.proj\.{_LEAF}", key):
        return [
            f"video_tokenizer.patch_embed.proj.{match.group(1)}",
            f"audio_tokenizer.patch_embed.proj.{match.group(1)}",
        ]
    if match := re.fullmatch(rf"decoder_blocks\.(\d+)\.{_BLOCK}\.{_LEAF}", key):
        return [f"decoder.blocks.{match.group(1)}.{match.group(2)}.{match.group(3)}"]
    renames = {"decoder_embed": "decoder.embed", "decoder_norm": "decoder.norm"}
    if match := re.fullmatch(rf"(decoder_embed|decoder_norm)\.{_LEAF}", key):
        return [f"{renames[match.group(1)]}.{match.group(2)}"]
    if match := re.fullmatch(rf"decoder_pred\.{_LEAF}", key):  # both heads (`_mae_value` cuts the audio one)
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
