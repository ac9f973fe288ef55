"""CPU kernels outside the model (`avsync.kernels`): the model is plain PyTorch and timm; each kernel is
chosen by a measurement made once per host and shape class and cached; every kernel computes what the
plain model computes."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import avsync.model
from avsync import kernels
from avsync.kernels import (
    OneDNNLinear,
    chosen_kernels,
    kernel_cache,
    linear_kernel,
    matmul_nt,
    onednn_linear,
    set_kernels,
    use_kernels,
)
from avsync.model import CAVMAESync

needs_onednn = pytest.mark.skipif(linear_kernel() is None, reason="this PyTorch build has no oneDNN")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test measures into its own cache directory, in `auto` mode."""
    monkeypatch.setenv("AVSYNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AVSYNC_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_cache", None)
    return tmp_path / "cache"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# ------------------------------------------------------------------------------- the plain model
def test_the_model_imports_nothing_of_the_kernels_and_is_plain_pytorch_and_timm():
    for path in Path(avsync.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                assert not name.startswith(("avsync.kernels", "avsync.onednn", "avsync.training")), (
                    f"{path.name} imports {name}"
                )
        assert "mkldnn" not in path.read_text(), path.name
    assert "_apply" not in CAVMAESync.__dict__
    model = CAVMAESync.from_preset("tiny")
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(type(m) is Attention and m.fused_attn for m in attentions)
    assert not kernels.chooses_kernels(model)


def pretrain_outcome(model: CAVMAESync, precision: str):
    torch.manual_seed(0)
    audio, video = torch.randn(2, 192, 128), torch.randn(2, 3, 96, 96)
    noise = model.draw_noise(2, torch.device("cpu"), torch.Generator().manual_seed(1))
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = model.pretrain_loss(audio, video, *noise)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("precision", "linear", "attention"),
    [("fp32", "onednn", "sdpa"), ("fp32", "library", "explicit"), ("bf16", "library", "explicit")],
)  # (oneDNN linears apply only outside autocast)
def test_every_kernel_trains_the_model_as_the_plain_model_does(precision, linear, attention):
    if linear == "onednn" and linear_kernel() is None:
        pytest.skip("this PyTorch build has no oneDNN")
    torch.manual_seed(0)
    model = CAVMAESync.from_preset("tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads = pretrain_outcome(model, precision)
    set_kernels(model, linear=linear, attention=attention)
    assert chosen_kernels(model)[f"attention: {attention}"] > 0
    assert chosen_kernels(model)[f"linear: {linear}"] > 0
    assert model.state_dict().keys() == state.keys()  # the same state dict
    ours, our_grads = pretrain_outcome(model, precision)
    # fp32: only the summation order differs; bf16: bf16 rounding of products and attention weights
    loss_tolerance, grad_tolerance = (1e-5, 1e-4) if precision == "fp32" else (2e-2, 0.1)
    assert relative_error(ours, loss) < loss_tolerance
    for name, grad in grads.items():
        assert relative_error(our_grads[name], grad) < grad_tolerance, name


# ------------------------------------------------------------------------------------ oneDNN linear
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
    for function in (onednn_linear, F.linear):
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
def test_onednn_linears_apply_only_in_float32_outside_autocast():
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


# -------------------------------------------------------------------- measured once, then cached
def big_layer(out_features: int = 1024) -> nn.Sequential:
    """Large enough to be measured (above `MIN_FLOPS`), small enough to measure in milliseconds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, out_features))


def run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(256, 256, requires_grad=True)
    out = model(x)
    out.sum().backward()
    return x.detach(), out.detach()


def cached_entries(cache_dir: Path) -> dict:
    return json.loads((cache_dir / "kernels.json").read_text())["entries"]


def new_process() -> None:
    """What a later run starts with: no choices in memory, only the file."""
    kernels._cache = None


@needs_onednn
def test_a_choice_is_measured_once_cached_and_read_back(cache_dir, caplog):
    model = use_kernels(big_layer())
    with caplog.at_level(logging.INFO, "avsync.kernels"):
        run(model)
        x, out = run(model)
    assert relative_error(out, F.linear(x, model[0].weight, model[0].bias)) < 1e-6
    [(key, entry)] = cached_entries(cache_dir).items()
    assert "|linear|float32 train rows<=256 256->1024" in key and kernels.host_key() in key
    assert set(entry["ms"]) == {"library", "onednn"} and all(ms > 0 for ms in entry["ms"].values())
    assert entry["choice"] in ("library", "onednn")
    assert type(model[0]) is (OneDNNLinear if entry["choice"] == "onednn" else nn.Linear)
    assert kernel_cache().measuring_s > 0
    measured = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert len(measured) == 1 and entry["choice"] in measured[0]  # measured and logged once

    # a later run reads the file instead of measuring: plant the other choice and see it applied
    other = "library" if entry["choice"] == "onednn" else "onednn"
    planted = {"version": kernels.CACHE_VERSION, "entries": {key: {"choice": other, "ms": {}}}}
    (cache_dir / "kernels.json").write_text(json.dumps(planted))
    new_process()
    model = use_kernels(big_layer())
    run(model)
    assert type(model[0]) is (OneDNNLinear if other == "onednn" else nn.Linear)
    assert not kernel_cache().measured and kernel_cache().measuring_s == 0

    # another shape class is measured, and added beside the first
    run(use_kernels(big_layer(out_features=768)))
    assert len(kernel_cache().measured) == 1
    assert len(cached_entries(cache_dir)) == 2

    # AVSYNC_KERNELS=measure measures again what the cache holds
    new_process()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVSYNC_KERNELS", "measure")
        run(use_kernels(big_layer()))
    assert cached_entries(cache_dir)[key]["ms"]  # the planted entry was replaced by a measurement


@needs_onednn
@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        b"\xff\xfe\x00",
        json.dumps([1, 2]),
        json.dumps({"version": 1, "entries": {"x|linear|y": {"choice": "__import__('os').system('true')"}}}),
    ],
)
def test_an_unreadable_or_foreign_cache_is_ignored_and_rewritten(cache_dir, content, caplog):
    cache_dir.mkdir()
    path = cache_dir / "kernels.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, "avsync.kernels"):
        run(use_kernels(big_layer()))
    assert len(kernel_cache().measured) == 1
    entries = cached_entries(cache_dir)  # rewritten as a valid cache
    assert all(entry["choice"] in ("library", "onednn") for entry in entries.values())
    assert any("kernels.json" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_small_products_and_other_devices_keep_pytorchs_kernels_unmeasured(cache_dir):
    model = use_kernels(nn.Sequential(nn.Linear(16, 16), Attention(16, num_heads=2)))
    set_kernels(model, linear="onednn" if linear_kernel() else "library", attention="explicit")
    use_kernels(model)
    model(torch.randn(2, 5, 16))  # too small to be worth a measurement
    assert chosen_kernels(model) == {"linear: library": 3, "attention: sdpa": 1}
    assert not (cache_dir / "kernels.json").exists()
    set_kernels(model, linear="onednn" if linear_kernel() else "library", attention="explicit")
    use_kernels(model.to("meta"))  # a stand-in for a GPU
    model(torch.randn(64, 512, 16, device="meta"))
    assert chosen_kernels(model) == {"linear: library": 3, "attention: sdpa": 1}
    assert not (cache_dir / "kernels.json").exists()


def test_attention_is_measured_and_both_choices_agree(cache_dir):
    torch.manual_seed(0)
    layer = use_kernels(Attention(256, num_heads=4, qkv_bias=True))
    x = torch.randn(4, 256, 256)
    with torch.no_grad():  # inference: measured without backward
        out = layer(x)
    [(key, entry)] = [(k, e) for k, e in cached_entries(cache_dir).items() if "|attention|" in k]
    assert "|attention|float32 infer tokens<=256 batch*heads<=16 heads=4 width=64" in key
    assert set(entry["ms"]) == {"sdpa", "explicit"}
    assert layer.fused_attn is (entry["choice"] == "sdpa")
    with torch.no_grad():
        other = set_kernels(layer, attention="sdpa" if entry["choice"] == "explicit" else "explicit")(x)
    assert relative_error(out, other) < 1e-5


def test_library_mode_restores_pytorchs_kernels_and_a_bad_mode_is_one_line(monkeypatch, cache_dir):
    model = set_kernels(nn.Sequential(nn.Linear(4, 4), Attention(4, num_heads=1)), "onednn", "explicit")
    use_kernels(model)
    monkeypatch.setenv("AVSYNC_KERNELS", "library")
    use_kernels(model)
    assert chosen_kernels(model) == {"linear: library": 3, "attention: sdpa": 1}
    assert not kernels.chooses_kernels(model)
    run(use_kernels(big_layer()))
    assert not (cache_dir / "kernels.json").exists()  # nothing measured
    monkeypatch.setenv("AVSYNC_KERNELS", "fastest")
    with pytest.raises(ValueError, match="AVSYNC_KERNELS='fastest': use one of auto, library, measure"):
        use_kernels(model)


def test_matmul_nt_is_chosen_by_measurement_and_exact(cache_dir):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 512, generator=generator), torch.randn(700, 512, generator=generator)
    assert relative_error(matmul_nt(a, b), a.double() @ b.double().T) < 1e-6
    if linear_kernel() is not None:
        [key] = cached_entries(cache_dir)
        assert "|matmul_nt|float32 rows<=512 cols<=1024 width=512" in key


def test_every_lightning_run_and_the_api_choose_their_kernels():
    from avsync.api.model import AVSyncModel
    from avsync.cli import trainer_defaults
    from avsync.tasks.evaluation_trainer import evaluation_trainer
    from avsync.tasks.features import predict_trainer
    from avsync.training.kernels import KernelChoice

    assert any(isinstance(c, KernelChoice) for c in trainer_defaults()["callbacks"])  # avsync fit/test
    for trainer in (evaluation_trainer(accelerator="cpu"), predict_trainer([], accelerator="cpu")):
        assert any(isinstance(c, KernelChoice) for c in trainer.callbacks)
    assert kernels.chooses_kernels(AVSyncModel(CAVMAESync.from_preset("tiny"), "cpu", "fp32").backbone)
    with pytest.raises(ValueError, match=r"KernelChoice\(mode='fast'\): use one of auto, library, measure"):
        KernelChoice("fast")


@needs_onednn
def test_a_lightning_run_measures_once_and_says_which_kernels(cache_dir, caplog):
    import lightning as L
    from torch.utils.data import DataLoader

    from avsync.training.kernels import KernelChoice

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = big_layer()[0]

        def training_step(self, batch, batch_idx):
            return self.layer(torch.randn(256, 256)).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, callbacks=[KernelChoice()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, "lightning.pytorch.utilities.rank_zero"):  # evaluation runs quiet it
        trainer.fit(module, DataLoader(range(3), batch_size=1))
    [entry] = cached_entries(cache_dir).values()
    assert len(kernel_cache().measured) == 1  # three steps, one measurement
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Kernels:")]
    assert len(reports) == 1 and f"linear: {entry['choice']} x1" in reports[0] and "measured in" in reports[0]
