"""The objective: InfoNCE as the authors define it, and global-batch negatives under real DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avsync.model import CAVMAESync
from avsync.objectives import InfoNCE, masked_mse

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_one_direction_is_the_column_softmax_of_audio_by_video():
    audio, video = torch.randn(6, 8), torch.randn(6, 8)
    similarity = F.normalize(audio, dim=-1) @ F.normalize(video, dim=-1).T / 0.05
    expected = -torch.diag(torch.log_softmax(similarity, dim=0)).mean()
    loss, accuracy = InfoNCE()(audio, video)
    torch.testing.assert_close(loss, expected)
    assert accuracy == (similarity.argmax(dim=0) == torch.arange(6)).float().mean()


def test_bidirectional_averages_both_directions():
    audio, video = torch.randn(5, 8), torch.randn(5, 8)
    one_way, _ = InfoNCE(0.1)(audio, video)
    other_way, _ = InfoNCE(0.1)(video, audio)
    both, _ = InfoNCE(0.1, bidirectional=True)(audio, video)
    torch.testing.assert_close(both, (one_way + other_way) / 2)
    assert not torch.allclose(one_way, other_way)


def test_perfectly_aligned_pairs_score_full_accuracy_and_low_loss():
    tokens = torch.eye(4, 8) * 3
    loss, accuracy = InfoNCE()(tokens, tokens)
    assert accuracy == 1.0 and loss < 1e-6


def test_masked_mse_counts_only_masked_patches():
    prediction, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert masked_mse(prediction, target, mask, normalize_target=False) == pytest.approx(2.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_one_process_on_the_concatenated_batch(tmp_path):
    """Negatives span the global batch: 2 gloo ranks x 4 samples give the loss and gradients of one
    process on all 8 (to 1e-5)."""
    config = dict(
        image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=1,
        decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
    )  # fmt: skip
    torch.manual_seed(1)
    model_inputs = dict(audio=torch.randn(8, 32, 32), video=torch.randn(8, 3, 32, 32))
    noise = dict(noise_a=torch.rand(8, 4), noise_v=torch.rand(8, 4))
    torch.save({"config": config, **model_inputs, **noise}, tmp_path / "inputs.pt")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO_ROOT / "tests" / "helpers" / "ddp_pretrain_step.py"),
        str(tmp_path / "inputs.pt"), str(tmp_path / "ddp.pt"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    torch.manual_seed(0)
    single = CAVMAESync(**config)
    out = single(**model_inputs, **noise)
    out.loss.backward()
    assert ddp["loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert ddp["contrastive"].item() == pytest.approx(out.contrastive.item(), rel=1e-5)
    for name, parameter in single.named_parameters():
        expected, actual = parameter.grad, ddp["grads"][name]
        error = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
        assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"
    # `equal_batches` (no gather of the batch sizes) computes the same step.
    assert torch.equal(ddp["equal_batches_loss"], ddp["local_loss"])
    for name, grad in ddp["equal_batches_grads"].items():
        assert torch.equal(grad, ddp["grads"][name]), name
    # Sanity of the comparison itself: local-only negatives would give a different contrastive loss.
    half_loss = (
        InfoNCE()(out.global_audio[:4], out.global_video[:4])[0]
        + InfoNCE()(out.global_audio[4:], out.global_video[4:])[0]
    ) / 2
    assert abs(half_loss.item() - out.contrastive.item()) > 1e-3


def test_release_process_group_destroys_the_default_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from avsync.distributed import release_process_group

    release_process_group()  # none yet: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()
