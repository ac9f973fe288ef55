"""`avsync.training.console`: the progress lines a log holds, from a real Lightning fit."""

from __future__ import annotations

import io
import re

import lightning as L
import torch

from avsync.training.console import LogLineProgress, progress_callback


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_index):
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_fit_writes_plain_progress_lines_with_rate_and_eta(tmp_path):
    stream = io.StringIO()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=2)
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[LogLineProgress(interval=1e-9, stream=stream)], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Tiny(), data)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "[train] 12 steps in 2 epochs"
    pattern = r"\[train\] step (\d+)/12 \(\d+%\), epoch [12]/2, [\d.]+ it/s, elapsed \d\d:\d\d, ETA \d\d:\d\d"
    steps = [int(re.fullmatch(pattern, line).group(1)) for line in lines[1:-1]]
    assert steps == list(range(1, 13))  # a line after every step at this interval
    assert re.fullmatch(pattern + r" \(done\)", lines[-1]) and "step 12/12 (100%)" in lines[-1]


def test_the_display_is_lightnings_bar_in_a_terminal_and_lines_elsewhere():
    assert progress_callback(True) == {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"}
    assert progress_callback(False, 5.0) == {
        "class_path": "avsync.training.console.LogLineProgress",
        "init_args": {"interval": 5.0},
    }
