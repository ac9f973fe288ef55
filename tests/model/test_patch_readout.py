"""The patch readouts of sound-prompted segmentation: which weights of the last joint block each one
reads, which is what makes it the global token's path (`global_readout`), ClearCLIP's
(`self_attention`) or the paper's (`patch_tokens`)."""

from __future__ import annotations

import pytest
import torch

from avsync.model import CAVMAESync
from avsync.model.patch_readout import PATCH_READOUTS, video_patch_features

TINY = dict(
    image_size=32,
    audio_length=32,
    embed_dim=32,
    num_heads=2,
    encoder_depth=1,
    joint_depth=2,
    decoder_dim=16,
    decoder_depth=1,
    decoder_heads=2,
    num_registers=2,
)


@pytest.fixture
def model() -> CAVMAESync:
    torch.manual_seed(0)
    return CAVMAESync(**TINY).eval()


@pytest.fixture
def video() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def changes_with(model, video, readout, edit) -> bool:
    before = video_patch_features(model, video, readout)
    with torch.no_grad():
        edit(model.joint.blocks[-1])
    return not torch.allclose(before, video_patch_features(model, video, readout), atol=1e-6)


def perturb_qkv_rows(part: int):
    """Adds noise to the query (0), key (1) or value (2) rows of the last joint block's projection."""

    def edit(block):
        dim = block.attn.qkv.weight.shape[1]
        block.attn.qkv.weight[part * dim : (part + 1) * dim] += torch.randn(dim, dim)

    return edit


def perturb_mlp(block):
    block.mlp.fc2.weight += torch.randn_like(block.mlp.fc2.weight)


def test_patch_tokens_are_the_encoders_normalized_patch_tokens(model, video):
    expected = model.encode(video=video).patches_video
    assert torch.equal(video_patch_features(model, video, "patch_tokens"), expected)
    assert expected.shape == (3, 4, 32)


@pytest.mark.parametrize("readout", PATCH_READOUTS)
def test_shapes_and_unknown_names(model, video, readout):
    assert video_patch_features(model, video, readout).shape == (3, 4, 32)
    with pytest.raises(ValueError, match="unknown patch readout 'cls'"):
        video_patch_features(model, video, "cls")


@pytest.mark.parametrize(
    ("readout", "reads_query", "reads_key", "reads_value", "reads_mlp"),
    [
        # every patch token attends with queries and keys, then the MLP
        ("patch_tokens", True, True, True, True),
        # the global token attending to one patch only: no attention weights to compute
        ("global_readout", False, False, True, True),
        # ClearCLIP: query-query attention, no residual, no MLP
        ("self_attention", True, False, True, False),
    ],
)
def test_which_weights_of_the_last_joint_block_each_readout_reads(
    video, readout, reads_query, reads_key, reads_value, reads_mlp
):
    for part, reads in ((0, reads_query), (1, reads_key), (2, reads_value)):
        torch.manual_seed(0)
        assert changes_with(CAVMAESync(**TINY).eval(), video, readout, perturb_qkv_rows(part)) == reads
    torch.manual_seed(0)
    assert changes_with(CAVMAESync(**TINY).eval(), video, readout, perturb_mlp) == reads_mlp


def test_the_global_readout_of_a_patch_is_the_global_token_attending_to_that_patch_alone(model, video):
    """Make the last joint block's global token attend to one patch only (a huge key bias on it, the
    same for every query), and its output is that patch's readout."""
    chosen = 2
    block = model.joint.blocks[-1]
    dim = model.embed_dim
    with torch.no_grad():
        features = video_patch_features(model, video, "global_readout")
        # keys: a component that is large only for the chosen patch's token (through its input), read
        # by every query through a constant query component
        sequence, _ = model._encode_modality(model.video_tokenizer(video), "video")
        for earlier in model.joint.blocks[:-1]:
            sequence = earlier(sequence, "video")
        normed = block.norm1["video"](sequence)
        direction = normed[:, 1 + chosen]  # (B, D): the chosen patch's normalized input
        queries, keys = block.attn.qkv.weight[:dim], block.attn.qkv.weight[dim : 2 * dim]
        queries.zero_()
        block.attn.qkv.bias[:dim] = 1.0  # every query is the all-ones vector
        keys.zero_()
        block.attn.qkv.bias[dim : 2 * dim] = 0.0
    outputs = []
    for b in range(video.shape[0]):
        with torch.no_grad():
            # key of token t = 1e4 * <normed_t, direction_b> on every channel: the chosen patch dominates
            block.attn.qkv.weight[dim : 2 * dim] = 1e4 * direction[b][None].expand(dim, dim) / dim
            outputs.append(model.encode(video=video[b : b + 1]).global_video[0])
    assert torch.allclose(torch.stack(outputs), features[:, chosen], atol=1e-4)
