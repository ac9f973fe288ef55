"""Non-finite losses in a real single-process Lightning run: a NaN batch is skipped without touching
the weights or Adam's moments and is logged; `max_nonfinite_steps` in a row stop the run with a
message saying why. (The agreement of several ranks is tested in test_multinode.py.)"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from avsync.model import CAVMAESync
from avsync.tasks import PretrainModule
from avsync.training import NonFiniteLossError

SMALL = dict(
    image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=1,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip


class ClipsWithNaN(Dataset):
    """Random clips; those at `poisoned` indices have a NaN in their spectrogram."""

    def __init__(self, clips: int, poisoned: set[int]) -> None:
        self.clips, self.poisoned = clips, poisoned

    def __len__(self) -> int:
        return self.clips

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        audio = torch.randn(32, 32, generator=generator)
        if index in self.poisoned:
            audio[5, 7] = float("nan")
        return {"audio": audio, "video": torch.randn(3, 32, 32, generator=generator)}


class WatchSteps(L.Callback):
    """Per step: did the weights or the optimizer state change?"""

    def __init__(self) -> None:
        self.changed: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = (_flat(pl_module.parameters()), _optimizer_state(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights, moments = self.before
        after = (_flat(pl_module.parameters()), _optimizer_state(trainer))
        self.changed.append((not torch.equal(weights, after[0]), not torch.equal(moments, after[1])))


def _flat(tensors) -> torch.Tensor:
    tensors = [t.detach().flatten().clone() for t in tensors]
    return torch.cat(tensors) if tensors else torch.zeros(0)


def _optimizer_state(trainer: L.Trainer) -> torch.Tensor:
    state = trainer.optimizers[0].state.values()
    return _flat(v.float() for s in state for v in s.values())


def fit(poisoned: set[int], max_nonfinite_steps: int, accumulate: int = 1) -> tuple[L.Trainer, WatchSteps]:
    watch = WatchSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[watch], accumulate_grad_batches=accumulate,
    )  # fmt: skip
    module = PretrainModule(
        CAVMAESync(**SMALL),
        warmup_epochs=0.5,
        log_images_every_n_steps=0,
        max_nonfinite_steps=max_nonfinite_steps,
    )
    trainer.fit(module, DataLoader(ClipsWithNaN(12, poisoned), batch_size=2))
    return trainer, watch


def test_a_nan_batch_is_skipped_and_logged_and_training_goes_on(caplog, reliability):
    with caplog.at_level(logging.WARNING, logger="avsync.training.nonfinite"):
        trainer, watch = fit(poisoned={5}, max_nonfinite_steps=3)  # clip 5: third batch (index 2)
    assert trainer.global_step == 6
    assert watch.changed[2] == (False, False)  # neither weights nor Adam's moments moved
    assert all(watch.changed[i] == (True, True) for i in (0, 1, 3, 4, 5))
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert [r.getMessage() for r in caplog.records] == [
        "step 2: loss nan on this rank; step skipped, weights unchanged (1 in a row, stopping at 3)"
    ]
    reliability.record(
        "Resume",
        "a NaN loss",
        "Lightning fit of PretrainModule, one batch with a NaN in its spectrogram",
        "the step is skipped (weights and Adam moments unchanged), a warning names the step, "
        "train/nonfinite_skipped counts it; training continues",
    )


def test_with_gradient_accumulation_a_nan_micro_batch_skips_its_whole_optimizer_step():
    trainer, watch = fit(poisoned={4}, max_nonfinite_steps=3, accumulate=2)  # batch 2: first of step 2
    assert trainer.global_step == 3
    assert [weights for weights, _ in watch.changed] == [False, True, False, False, False, True]


def test_too_many_nan_steps_in_a_row_stop_the_run_with_the_reason(reliability):
    with pytest.raises(NonFiniteLossError) as stopped:
        fit(poisoned={4, 6, 8}, max_nonfinite_steps=3)  # batches 2, 3, 4
    message = str(stopped.value)
    assert (
        "NaN or infinite on 3 steps in a row (global_step 2 to 4), max_nonfinite_steps=3: stopping" in message
    )
    assert "Those steps did not change the weights" in message
    reliability.record(
        "Resume",
        "NaN losses on max_nonfinite_steps steps in a row",
        "the same run with three NaN batches in a row, max_nonfinite_steps=3",
        f"stops with NonFiniteLossError: {message.split(': stopping')[0]}: stopping ...",
    )
