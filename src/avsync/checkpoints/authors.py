"""The authors' CAV-MAE Sync / CAV-MAE checkpoints (and their classifier) in avsync's key names.

Each layout is a table of key rules; anything a rule does not cover is an error that lists the keys,
never silently dropped. Positional embeddings are fixed sin-cos: they are recomputed by the model, and
a file whose tables differ is refused. Nothing is built before `validate.build_backbone` has checked
that the file backs the model its shapes declare.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from avsync.checkpoints.formats import CheckpointError, read_weights, state_dict_of, strip_prefix
from avsync.checkpoints.validate import DEPTHS, build_backbone
from avsync.model import CAVMAESync

#: ViT block parts as timm names them (the authors' layout and MAE's).
LEAF = r"(weight|bias)"
BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

#: authors' key pattern -> avsync key template
AUTHORS_RULES: list[tuple[str, str]] = [
    (rf"patch_embed_a\.proj\.{LEAF}", r"audio_tokenizer.patch_embed.proj.\1"),
    (rf"patch_embed_v\.proj\.{LEAF}", r"video_tokenizer.patch_embed.proj.\1"),
    (r"modality_a", "audio_tokenizer.modality"),
    (r"modality_v", "video_tokenizer.modality"),
    (r"cls_token_a", "global_tokens.audio"),
    (r"cls_token_v", "global_tokens.video"),
    (rf"blocks_a\.(\d+)\.{BLOCK}\.{LEAF}", r"audio_encoder.\1.\2.\3"),
    (rf"blocks_v\.(\d+)\.{BLOCK}\.{LEAF}", r"video_encoder.\1.\2.\3"),
    (rf"blocks_u\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{LEAF}", r"joint.blocks.\1.\2.\3"),
    (rf"blocks_u\.(\d+)\.(norm[12])\.{LEAF}", r"joint.blocks.\1.\2.joint.\3"),
    (rf"blocks_u\.(\d+)\.(norm[12])_a\.{LEAF}", r"joint.blocks.\1.\2.audio.\3"),
    (rf"blocks_u\.(\d+)\.(norm[12])_v\.{LEAF}", r"joint.blocks.\1.\2.video.\3"),
    (rf"norm\.{LEAF}", r"joint.norm.\1"),
    (rf"norm_a\.{LEAF}", r"joint.norm_audio.\1"),
    (rf"norm_v\.{LEAF}", r"joint.norm_video.\1"),
    (rf"constrative_head_audio\.(\d+)\.{BLOCK}\.{LEAF}", r"joint.contrastive_heads.audio.\1.\2.\3"),
    (rf"constrative_head_visual\.(\d+)\.{BLOCK}\.{LEAF}", r"joint.contrastive_heads.video.\1.\2.\3"),
    (rf"decoder_embed\.{LEAF}", r"decoder.embed.\1"),
    (r"mask_token", "decoder.mask_token"),
    (r"decoder_modality_a", "decoder.modality_audio"),
    (r"decoder_modality_v", "decoder.modality_video"),
    (rf"decoder_blocks\.(\d+)\.{BLOCK}\.{LEAF}", r"decoder.blocks.\1.\2.\3"),
    (rf"decoder_norm\.{LEAF}", r"decoder.norm.\1"),
    (rf"decoder_pred_a\.{LEAF}", r"decoder.predict_audio.\1"),
    (rf"decoder_pred_v\.{LEAF}", r"decoder.predict_video.\1"),
]

#: Every authors' block carries all three LayerNorm sets, but only the joint block reads `_a`/`_v`.
AUTHORS_UNUSED = re.compile(
    rf"(blocks_a|blocks_v|decoder_blocks|constrative_head_audio|constrative_head_visual)\.\d+\.norm[12]_[av]\.{LEAF}"
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
    if sum(int(config.get(name, 0)) for name in DEPTHS) > len(state):
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
    _check_names(state, config, source)
    model = build_backbone(config, state, source, exact=False)  # refuses before allocating
    model.load_state_dict(convert_authors_state_dict(state, model, source))
    return model


# ------------------------------------------------------------------------- the authors' classifier

#: The authors' classifier head (`CAVMAEFT` with `aggregate="self_attention_cls"`) -> `ProbeHead` keys.
AUTHORS_CLASSIFIER_RULES: list[tuple[str, str]] = [
    (r"cls_cls_token", "cls"),
    (rf"classifier_layers\.(\d+)\.{BLOCK}\.{LEAF}", r"blocks.\1.\2.\3"),
    (rf"classifier_norm\.{LEAF}", r"norm.\1"),
    (rf"classifier_head\.{LEAF}", r"classifier.\1"),
]
AUTHORS_CLASSIFIER_UNUSED = re.compile(rf"classifier_layers\.\d+\.norm[12]_[av]\.{LEAF}")
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
