"""The CPU fast paths compute what PyTorch's default kernels compute: oneDNN linears (forward and backward)
and the explicit attention picked for reduced precision."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from avsync.model import CAVMAESync
from avsync.model.attention import Attention, attend, explicit_attention_is_faster
from avsync.onednn import OneDNNLinear, linear, linear_kernel, use_onednn_linears

needs_onednn = pytest.mark.skipif(linear_kernel() is None, reason="this PyTorch build has no oneDNN")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight, b = (
        torch.randn(40, 48, generator=generator),
        torch.randn(40, generator=generator) if bias else None,
    )
    grad = torch.randn(*shape[:-1], 40, generator=generator)
    results = []
    for function in (linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, weight)] + (
            [b.clone().requires_grad_()] if bias else []
        )
        out = function(leaves[0], leaves[1], leaves[2] if bias else None)
        out.backward(grad)
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for ours, reference in zip(*results, strict=True):
        assert ours.shape == reference.shape
        assert relative_error(ours, reference) < 1e-6


@needs_onednn
def test_onednn_linear_takes_non_contiguous_inputs():
    x = torch.randn(8, 48, 30).transpose(1, 2)  # (8, 30, 48), not contiguous
    layer = OneDNNLinear(48, 16)
    assert relative_error(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6


@needs_onednn
def test_linears_run_on_onednn_only_in_float32_outside_autocast():
    """FlopCounterMode has no formula for oneDNN's op: a linear it counts ran on PyTorch's kernel."""
    layer = OneDNNLinear(32, 32)

    def counted(x: torch.Tensor, autocast: bool = False) -> int:
        with (
            FlopCounterMode(display=False) as counter,
            torch.autocast("cpu", torch.bfloat16, enabled=autocast),
        ):
            layer.to(x.dtype)(x)
        return counter.get_total_flops()

    assert counted(torch.randn(4, 32)) == 0  # oneDNN
    assert counted(torch.randn(4, 32), autocast=True) > 0  # autocast's bf16 product
    assert counted(torch.randn(4, 32, dtype=torch.float64)) > 0  # float64: PyTorch's kernel
    layer.double()
    assert torch.autograd.gradcheck(
        lambda x: layer(x), torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    )


def test_the_backbone_trains_through_onednn_linears_as_through_pytorchs():
    torch.manual_seed(0)
    model = CAVMAESync.from_preset("tiny")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert type(use_onednn_linears(nn.Sequential(nn.Linear(2, 2)))[0]) is OneDNNLinear
    audio, video = torch.randn(2, 192, 128), torch.randn(2, 3, 96, 96)
    noise = model.draw_noise(2, torch.device("cpu"), torch.Generator().manual_seed(1))
    outcomes = []
    for onednn in (True, False):
        switch = (
            contextlib.nullcontext()
            if onednn
            else mock.patch("avsync.onednn._onednn_applies", return_value=False)
        )
        with switch:
            model.zero_grad()
            out = model.pretrain_loss(audio, video, *noise)
            out.loss.backward()
        outcomes.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (reference_loss, reference_grads) = outcomes
    assert relative_error(loss, reference_loss) < 1e-5
    for (name, _), grad, reference in zip(model.named_parameters(), grads, reference_grads, strict=True):
        assert relative_error(grad, reference) < 1e-4, name


def test_attention_keeps_timms_parameters_and_sdpa_in_float32():
    torch.manual_seed(0)
    reference, ours = TimmAttention(64, num_heads=4, qkv_bias=True), Attention(64, num_heads=4, qkv_bias=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 17, 64)
    assert torch.equal(ours(x), reference(x))  # float32: the same SDPA call
    assert not explicit_attention_is_faster(x)


def test_explicit_attention_in_bf16_matches_float32_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 32, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    low = [t.bfloat16() for t in (q, k, v)]
    assert explicit_attention_is_faster(low[0])
    got = attend(*low)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.03  # bf16 rounding of inputs, scores and weights
    with torch.autocast("cpu", torch.bfloat16):
        layer = Attention(64, num_heads=4, qkv_bias=True)
        out = layer(torch.randn(2, 9, 64))
    assert out.dtype == torch.bfloat16


def test_the_default_fused_adam_steps_like_the_multi_tensor_one():
    from avsync.tasks.pretrain import adam_optimizer

    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    stepped = []
    for fused in (None, False):
        parameters = [nn.Parameter(w.clone()) for w in weights]
        optimizer = adam_optimizer(parameters, lr=1e-2, fused=fused)
        assert optimizer.defaults["fused"] is (True if fused is None else None)
        for _ in range(3):
            for p, g in zip(parameters, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        stepped.append([p.detach() for p in parameters])
    for ours, reference in zip(*stepped, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_timms_attention_still_has_the_internals_avsyncs_forward_reads():
    """Fails by name when a timm release drops or renames what `Attention.forward` uses."""
    from avsync.model.attention import TIMM_INTERNALS

    layer = TimmAttention(64, num_heads=4, qkv_bias=True)
    missing = [name for name in TIMM_INTERNALS if not hasattr(layer, name)]
    assert not missing, f"timm's Attention no longer has {missing}: update avsync.model.attention"
    assert getattr(layer, "gate", None) is None, "timm's Attention gained a default gate: update avsync"
    assert Attention.supports(layer)
    assert not Attention.supports(TimmAttention(64, num_heads=4, attn_drop=0.1))


def kernel_classes(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.Linear | TimmAttention)}


def test_cpu_kernels_only_while_the_model_is_on_cpu():
    model = CAVMAESync.from_preset("tiny")
    assert kernel_classes(model) == {OneDNNLinear, Attention}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.to("meta")  # a stand-in for a GPU: any device other than the CPU
    assert kernel_classes(model) == {nn.Linear, TimmAttention}
    model.to_empty(device="cpu").load_state_dict(state)
    assert kernel_classes(model) == {OneDNNLinear, Attention}
    with torch.device("meta"):  # built directly on another device: the plain classes from the start
        assert kernel_classes(CAVMAESync.from_preset("tiny")) == {nn.Linear, TimmAttention}
