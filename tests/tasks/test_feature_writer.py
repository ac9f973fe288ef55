"""The shared prediction path for features (`avsync.tasks.features`): FeatureExtractor + FeatureWriter in
real `Trainer.predict` runs, through the probe's feature cache, in one process and in 2 gloo processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from avsync.tasks.features import FeatureExtractor, FeatureWriter, LoaderSource, predict, predict_trainer
from avsync.tasks.probe.cache import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent


def batches(keys: list[list[str]], classes: int = 3) -> list[dict]:
    """Batch dicts whose clip `k` has features filled with its number and a multi-hot float label."""
    out = []
    for group in keys:
        numbers = torch.tensor([float(key[1:]) for key in group])
        labels = torch.nn.functional.one_hot(numbers.long() % classes, classes).float()
        out.append({"key": group, "x": numbers[:, None, None].expand(-1, 2, 4).clone(), "label": labels})
    return out


def test_the_cache_holds_each_clip_once_in_bounded_parts_with_labels_as_given(tmp_path):
    cache = FeatureCache(tmp_path, clips_per_part=3)
    keys = [["c0", "c1"], ["c2", "c1"], ["c3", "c3"], ["c4", "c5"], ["c0"]]  # c1, c3, c0 come back
    built = cache.build("train", {"x": 1}, batches(keys), lambda b: b["x"], progress=False)
    assert built.keys == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert built.features.dtype == torch.float16 and built.labels.dtype == torch.float32
    assert torch.equal(built.features[:, 0, 0], torch.arange(6, dtype=torch.float16))
    assert built.labels.argmax(dim=1).tolist() == [0, 1, 2, 0, 1, 2]
    parts = sorted(built.directory.glob("part-*.safetensors"))
    rows = []
    for part in parts:
        with safe_open(str(part), framework="pt") as handle:
            rows.append(len(json.loads(handle.metadata()["keys"])))
    assert rows == [3, 3]  # repeats are dropped before they count towards a part
    assert json.loads((built.directory / "manifest.json").read_text())["clips_per_rank"] == [6]


def test_clips_to_skip_never_reach_the_model_and_bad_batches_are_refused(tmp_path):
    seen: list[str] = []

    def extract(batch: dict) -> dict:
        seen.extend(batch["key"])
        return {"x": batch["x"]}

    class Collect(FeatureWriter):
        def __init__(self):
            super().__init__(clips_per_part=100, float16=("x",))
            self.saved: dict[str, torch.Tensor] = {}

        def save_part(self, index, arrays, keys):
            self.saved.update(zip(keys, arrays["x"], strict=True))

    writer = Collect()
    module = FeatureExtractor(extract, skip_keys={"c1", "c2", "c3"}, name="the test data")
    trainer = predict_trainer([writer], accelerator="cpu", devices=1)
    predict(trainer, module, LoaderSource(batches([["c0", "c1"], ["c2", "c3"], ["c4"]])))
    assert seen == ["c0", "c4"] and module.skipped == 3  # the second batch never ran
    assert sorted(writer.saved) == ["c0", "c4"] and writer.saved["c4"].dtype == torch.float16
    assert torch.equal(writer.saved["c4"], torch.full((2, 4), 4.0, dtype=torch.float16))

    keyless = [{"x": torch.zeros(1, 2, 4), "label": torch.zeros(1, 3)}]
    with pytest.raises(ValueError, match=r"the train data: batches lack \['key'\]"):
        FeatureCache(tmp_path).build("train", {"x": 2}, keyless, lambda b: b["x"], progress=False)
    assert not any(tmp_path.iterdir())  # no staging directory left behind


def test_two_gloo_processes_cache_the_features_of_one(tmp_path):
    """An odd number of clips: ranks extract 19 and 18 clips; the merged cache equals one process's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(HERE / "probe_ddp_cache.py"), str(tmp_path / "ddp"), "37",
    ]  # fmt: skip
    result = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "ddp" / "train.pt", weights_only=True)
    (manifest,) = (tmp_path / "ddp" / "cache").glob("train-*/manifest.json")
    assert json.loads(manifest.read_text())["clips_per_rank"] == [19, 18]

    spec = importlib.util.spec_from_file_location("probe_tests", HERE / "test_probe.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    datamodule = tests.data(tmp_path / "one", tests.ClipSource(train_clips=37))
    tests.trainer(tmp_path).fit(tests.probe(tests.backbone()), datamodule)
    one = datamodule.splits["train"]
    assert sorted(two["keys"]) == sorted(one.keys) and len(one.keys) == 37
    order = [two["keys"].index(key) for key in one.keys]
    torch.testing.assert_close(two["features"][order], one.features, atol=1e-3, rtol=1e-3)
    assert torch.equal(two["labels"][order], one.labels)
