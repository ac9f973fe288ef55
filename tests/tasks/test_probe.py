"""Linear probing: ProbeModule, its feature cache and data module, mixup, class-balanced sampling and weight
averaging, in real Lightning Trainer runs on CPU with a small random backbone and in-memory clips."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from avsync.checkpoints import CheckpointError
from avsync.model import CAVMAESync
from avsync.tasks.probe import ProbeModule
from avsync.tasks.probe.averaging import EpochWeightAveraging
from avsync.tasks.probe.cache import FeatureCache
from avsync.tasks.probe.data import CachedFeatureDataModule, class_balanced_sampler, class_balanced_weights
from avsync.tasks.probe.objective import metric_targets, mixup, probe_metrics, soft_targets

SMALL = dict(
    image_size=32, audio_length=32, mel_bins=32, embed_dim=32, num_heads=2, encoder_depth=2,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, num_registers=2,
)  # fmt: skip
FRAMES = 4
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "probe"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- data
class Clips(Dataset):
    """Eval-mode clips whose every frame and window carry their classes' patterns plus noise.

    `task="multiclass"`: one class per clip, int64 labels. `task="multilabel"`: each class present
    with probability 1/2 (at least one), multi-hot labels, inputs are the sums of present patterns.
    `class_weights` skews the class distribution (multiclass)."""

    def __init__(self, clips: int, seed: int, task: str = "multiclass", classes: int = 4, class_weights=None):
        generator = torch.Generator().manual_seed(seed)
        patterns = torch.Generator().manual_seed(1234)  # shared by every split
        self.audio_patterns = torch.randn(classes, 32, 32, generator=patterns)
        self.video_patterns = torch.randn(classes, 3, 32, 32, generator=patterns)
        if task == "multiclass":
            weights = (
                torch.ones(classes)
                if class_weights is None
                else torch.tensor(class_weights, dtype=torch.float)
            )
            self.labels = torch.multinomial(weights, clips, replacement=True, generator=generator)
            self.presence = torch.nn.functional.one_hot(self.labels, classes).float()
        else:
            self.presence = (torch.rand(clips, classes, generator=generator) < 0.5).float()
            self.presence[self.presence.sum(dim=1) == 0, 0] = 1.0
            self.labels = self.presence
        self.audio_noise = torch.randn(clips, FRAMES, 32, 32, generator=generator)
        self.video_noise = torch.randn(clips, FRAMES, 3, 32, 32, generator=generator)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        present = self.presence[index]
        audio = torch.einsum("c,cft->ft", present, self.audio_patterns) + self.audio_noise[index]
        video = torch.einsum("c,cdxy->dxy", present, self.video_patterns) + self.video_noise[index]
        return {
            "audio": audio,
            "video": video,
            "label": self.labels[index],
            "key": f"s{self.seed}-{index:04d}",
        }


class ClipSource(L.LightningDataModule):
    """A clip data module as the probe's source (plain attributes identify its data for the cache)."""

    def __init__(self, task: str = "multiclass", train_clips: int = 96, eval_clips: int = 48, seed: int = 0,
                 class_weights: list[float] | None = None, batch_size: int = 16):  # fmt: skip
        super().__init__()
        self.task, self.train_clips, self.eval_clips, self.seed = task, train_clips, eval_clips, seed
        self.class_weights, self.batch_size = class_weights, batch_size

    def _loader(self, clips: int, seed: int) -> DataLoader:
        return DataLoader(
            Clips(clips, seed, self.task, class_weights=self.class_weights), batch_size=self.batch_size
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_clips, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_clips, self.seed + 1000)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_clips, self.seed + 2000)


class ForwardCounter:
    """Counts the backbone's audio/video encoder passes through forward hooks on its tokenizers."""

    def __init__(self, backbone: CAVMAESync):
        self.calls = 0
        for tokenizer in (backbone.audio_tokenizer, backbone.video_tokenizer):
            tokenizer.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1


def backbone(seed: int = 0) -> CAVMAESync:
    torch.manual_seed(seed)
    return CAVMAESync(**SMALL)


def trainer(tmp_path: Path, **overrides) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**options, **overrides})


def probe(model: CAVMAESync, **overrides) -> ProbeModule:
    options = dict(task="multiclass", num_classes=4, lr=1e-3, warmup_epochs=1)
    return ProbeModule(model, **{**options, **overrides})


def data(tmp_path: Path, source: L.LightningDataModule | None = None, **overrides) -> CachedFeatureDataModule:
    return CachedFeatureDataModule(
        source or ClipSource(), cache_dir=str(tmp_path / "cache"), **{"batch_size": 16, **overrides}
    )


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("modality", ["audio", "video", "audio_visual"])
@pytest.mark.parametrize("token", ["global", "register", "patch"])
@pytest.mark.parametrize("layer", ["encoder", "joint"])
def test_token_modality_and_layer_options_choose_the_features_and_the_head_width(modality, token, layer):
    model = backbone()
    module = probe(model, modality=modality, token=token, layer=layer)
    batch = next(iter(ClipSource().train_dataloader()))
    with torch.no_grad():
        embeddings = model.encode(batch["audio"], batch["video"], layer=layer)
    pick = {
        "global": lambda m: getattr(embeddings, f"global_{m}"),
        "register": lambda m: getattr(embeddings, f"registers_{m}").mean(dim=2),
        "patch": lambda m: getattr(embeddings, f"patches_{m}").mean(dim=2),
    }[token]
    used = {"audio": ["audio"], "video": ["video"], "audio_visual": ["audio", "video"]}[modality]
    expected = torch.cat([pick(m) for m in used], dim=-1)
    features = module.extract_features(batch)
    assert module.head.width == (64 if modality == "audio_visual" else 32)
    assert features.shape == (16, FRAMES, module.head.width)
    torch.testing.assert_close(features, expected)
    assert module(batch).shape == (16, 4)


def test_register_tokens_need_a_backbone_with_registers():
    with pytest.raises(ValueError, match="register tokens"):
        probe(CAVMAESync(**{**SMALL, "num_registers": 0}), token="register")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="exactly one of backbone, backbone_checkpoint"):
        ProbeModule()
    with pytest.raises(ValueError, match="exactly one of backbone, backbone_checkpoint"):
        ProbeModule(backbone(), backbone_checkpoint="x.ckpt")
    with pytest.raises(ValueError, match="modality"):
        probe(backbone(), modality="text")
    with pytest.raises(ValueError, match="layer must be one of"):
        probe(backbone(), layer="decoder")
    with pytest.raises(ValueError, match="mixup"):
        probe(backbone(), mixup=1.5)


# ---------------------------------------------------------------------------------------------- objective
def test_metrics_on_hand_made_examples():
    multilabel = probe_metrics("multilabel", 2, prefix="val/")
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.4]])
    truth = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0: positives ranked 1st and 3rd -> AP (1/1 + 2/3) / 2; class 1: positive ranked 1st -> AP 1
    expected_map = ((1 + 2 / 3) / 2 + 1) / 2
    assert multilabel(scores, truth)["val/mAP"].item() == pytest.approx(expected_map, abs=1e-6)

    multiclass = probe_metrics("multiclass", 6, prefix="test/")
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # class 0 ranked 1st
            [5.0, 9, 1, 2, 3, 4],  # class 0 ranked 2nd
            [1.0, 9, 8, 7, 6, 5],  # class 0 ranked 6th
            [2.0, 9, 8, 7, 6, 1],  # class 0 ranked 5th
        ]
    )
    values = multiclass(logits, torch.zeros(4, dtype=torch.long))
    assert values["test/top1"].item() == pytest.approx(1 / 4)
    assert values["test/top5"].item() == pytest.approx(3 / 4)


def test_targets_in_both_label_formats():
    indices = torch.tensor([2, 0])
    torch.testing.assert_close(soft_targets(indices, 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    torch.testing.assert_close(
        soft_targets(indices, 4, smoothing=0.2)[0], torch.tensor([0.05, 0.05, 0.85, 0.05])
    )
    multi_hot = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    assert metric_targets(multi_hot, "multilabel", 3).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert metric_targets(indices, "multilabel", 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    assert metric_targets(multi_hot[1:], "multiclass", 3).tolist() == [1]
    with pytest.raises(ValueError, match="exactly one positive"):
        metric_targets(multi_hot, "multiclass", 3)
    with pytest.raises(ValueError, match="out of range"):
        soft_targets(torch.tensor([3]), 3)


def test_mixup_blends_each_clip_with_one_partner_and_its_targets_alike():
    torch.manual_seed(0)
    clips = 400
    features, targets = torch.randn(clips, FRAMES, 8), torch.eye(clips)  # the target row names the clip
    mixed, mixed_targets = mixup(features, targets, rate=1.0, alpha=10.0)
    torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(clips))
    weights, partners = [], set()
    for i in range(clips):
        others = [j for j in mixed_targets[i].nonzero().flatten().tolist() if j != i]
        assert others, f"clip {i} was paired with itself (left unmixed at rate 1)"
        (j,) = others
        partners.add(j)
        lam = mixed_targets[i, i]
        torch.testing.assert_close(mixed[i], lam * features[i] + (1 - lam) * features[j])
        weights.append(lam.item())
    weights = torch.tensor(weights)
    assert len(partners) == clips  # every clip is some other clip's partner: one cycle through the batch
    assert (
        abs(weights.mean().item() - 0.5) < 0.03 and 0.05 < weights.min() and weights.max() < 0.95
    )  # Beta(10, 10)

    half, half_targets = mixup(features, targets, rate=0.5)
    untouched = (half_targets.diagonal() == 1).float().mean().item()
    assert 0.4 < untouched < 0.6
    same, same_targets = mixup(features, targets, rate=0.0)
    assert same is features and same_targets is targets


def test_training_sees_mixed_features_and_evaluation_the_cached_ones(tmp_path):
    module = probe(backbone(), mixup=1.0)
    datamodule = data(tmp_path)
    seen: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
    module.head.register_forward_pre_hook(
        lambda head, args: seen["train" if head.training else "eval"].append(args[0].detach().clone())
    )
    trainer(tmp_path, max_epochs=1).fit(module, datamodule)
    cached = {split: datamodule.splits[split].features.float() for split in ("train", "val")}

    def is_cached_row(row: torch.Tensor, split: str) -> bool:
        return bool(((cached[split] - row).abs().amax(dim=(1, 2)) < 1e-6).any())

    train_rows = torch.cat(seen["train"])
    eval_rows = torch.cat(seen["eval"])
    assert sum(is_cached_row(row, "train") for row in train_rows) < 0.1 * len(train_rows)
    assert all(is_cached_row(row, "val") for row in eval_rows)


# ---------------------------------------------------------------------------------------------- sampling
def test_class_balanced_sampling_draws_every_class_equally_often(tmp_path):
    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    torch.manual_seed(0)
    drawn = labels[list(class_balanced_sampler(labels, num_samples=30_000))]
    frequencies = torch.bincount(drawn, minlength=3).float() / len(drawn)
    torch.testing.assert_close(frequencies, torch.full((3,), 1 / 3), atol=0.015, rtol=0)

    multi_hot = torch.tensor([[1.0, 0], [1, 0], [1, 1], [0, 0]])  # class 0 on 3 clips, class 1 on 1
    expected = torch.tensor(
        [1 / 3, 1 / 3, 1 / 3 + 1, 2 / 3], dtype=torch.float64
    )  # unlabelled: the mean weight
    torch.testing.assert_close(class_balanced_weights(multi_hot), expected)

    module = probe(backbone())
    source = ClipSource(train_clips=120, class_weights=[0.7, 0.2, 0.07, 0.03])
    datamodule = data(tmp_path, source, class_balanced=True)
    trainer(tmp_path).fit(module, datamodule)
    stored = datamodule.splits["train"].labels
    assert torch.bincount(stored, minlength=4)[0] > 4 * torch.bincount(stored, minlength=4)[3]  # skewed data
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, WeightedRandomSampler)
    drawn = torch.cat([batch["label"] for _ in range(60) for batch in loader])
    frequencies = torch.bincount(drawn, minlength=4).float() / len(drawn)
    torch.testing.assert_close(frequencies, torch.full((4,), 0.25), atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------------- training
class BackboneStaysFrozen(L.Callback):
    """Checks, at every training step, that the backbone is in eval mode and outside the optimizer."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert not pl_module.backbone.training
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert optimized == {id(p) for p in pl_module.head.parameters()}
        assert not optimized & {id(p) for p in pl_module.backbone.parameters()}
        self.steps += 1


def test_multiclass_probe_learns_while_the_backbone_stays_frozen(tmp_path):
    model = backbone()
    before = copy.deepcopy(model.state_dict())
    module = probe(model, lr=2e-3, mixup=0.5, label_smoothing=0.1)
    datamodule = data(tmp_path)
    watcher = BackboneStaysFrozen()
    run = trainer(tmp_path, max_epochs=12, callbacks=[watcher])
    run.fit(module, datamodule)
    assert watcher.steps == 12 * 6
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name

    accuracy = run.validate(module, datamodule)[0]["val/top1"]
    predictions = run.predict(module, datamodule.val_dataloader())
    scores = torch.cat([p["scores"] for p in predictions])
    truth = datamodule.splits["val"].labels
    assert accuracy == pytest.approx((scores.argmax(dim=1) == truth).float().mean().item())
    assert accuracy >= 0.8  # chance: 0.25

    path = tmp_path / "probe.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["state_dict"] and all(
        key.startswith(("head.", "val_metrics", "test_metrics")) for key in saved["state_dict"]
    )


def test_multilabel_probe_learns_and_reports_the_map_of_its_scores(tmp_path):
    module = probe(backbone(), task="multilabel", lr=2e-3)
    datamodule = data(tmp_path, ClipSource(task="multilabel"))
    run = trainer(tmp_path, max_epochs=12)
    run.fit(module, datamodule)
    reported = run.validate(module, datamodule)[0]["val/mAP"]
    scores = torch.cat([p["scores"] for p in run.predict(module, datamodule.val_dataloader())])
    truth = datamodule.splits["val"].labels
    assert reported == pytest.approx(
        average_precision_score(truth.numpy(), scores.numpy(), average="macro"), abs=1e-5
    )
    chance = truth.mean().item()  # a constant score per class gives AP = the class's share of positives
    assert reported > chance + 0.3


def test_predicted_scores_keep_the_order_of_logits_a_float32_sigmoid_would_tie(tmp_path):
    module = probe(backbone(), task="multilabel")
    datamodule = data(tmp_path, ClipSource(task="multilabel"))
    run = trainer(tmp_path)
    run.fit(module, datamodule)
    trained = torch.cat([p["logits"] for p in run.predict(module, datamodule.val_dataloader())])
    scale = 2.0 / trained.std().item()
    with torch.no_grad():  # logits around 25 +- 6: float32's sigmoid is exactly 1.0 above ~16.6
        module.head.classifier.weight.mul_(scale)
        module.head.classifier.bias.mul_(scale).add_(25.0 - scale * trained.mean().item())
    predictions = run.predict(module, datamodule.val_dataloader())
    logits = torch.cat([p["logits"] for p in predictions])
    scores = torch.cat([p["scores"] for p in predictions])
    truth = datamodule.splits["val"].labels.numpy()
    assert scores.dtype == torch.float64 and logits.max() < 36  # below float64's own saturation
    assert (logits.float().sigmoid() == 1.0).float().mean() > 0.8  # where float32 scores would tie
    for column in range(logits.shape[1]):
        assert average_precision_score(truth[:, column], scores[:, column].numpy()) == pytest.approx(
            average_precision_score(truth[:, column], logits[:, column].numpy()), abs=1e-12
        )


def test_the_recipe_fits_and_tests_on_real_shards_and_reports_the_map_of_its_predictions(tmp_path):
    from avsync.checkpoints import save_backbone
    from avsync.cli import lightning_cli
    from tests.data.conftest import write_shards

    write_shards(tmp_path / "shards", [4, 4], fbank_frames=120, num_classes=3)
    torch.manual_seed(0)
    ckpt = save_backbone(CAVMAESync(**{**SMALL, "mel_bins": 128}), tmp_path / "tiny.safetensors")
    shards = str(tmp_path / "shards")
    common = [
        "--config", str(CONFIGS / "tiny_cpu.yaml"),
        f"--model.init_args.backbone_checkpoint={ckpt}", "--model.init_args.num_classes=3",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=4",
        f"--data.init_args.source.init_args.train_shards={shards}",
        f"--data.init_args.source.init_args.val_shards={shards}",
        f"--data.init_args.source.init_args.test_shards={shards}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    fit = lightning_cli(["fit", *common, "--trainer.max_epochs=3"])
    assert fit.trainer.current_epoch == 3
    last = fit.trainer.checkpoint_callback.last_model_path
    test = lightning_cli(["test", *common, f"--ckpt_path={last}"])
    reported = test.trainer.callback_metrics["test/mAP"].item()

    module = ProbeModule.load_from_checkpoint(last, weights_only=True)
    predictions = trainer(tmp_path).predict(module, test.datamodule.test_dataloader())
    logits = torch.cat([p["logits"] for p in predictions]).numpy()
    truth = test.datamodule.splits["test"].labels.numpy()
    assert truth.shape == (8, 3) and truth.sum(axis=1).tolist() == [1] * 8
    assert reported == pytest.approx(average_precision_score(truth, logits, average="macro"), abs=1e-6)


# ---------------------------------------------------------------------------------------------- cache
def test_features_are_cached_once_and_keyed_by_backbone_data_and_options(tmp_path):
    model = backbone()
    counter = ForwardCounter(model)
    first = data(tmp_path)
    trainer(tmp_path, max_epochs=2).fit(probe(model), first)
    train_batches, val_batches = 6, 3
    assert counter.calls == 2 * (train_batches + val_batches)  # one pass, audio + video, over each split
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["train", "val"]

    counter.calls = 0
    second = data(tmp_path)
    trainer(tmp_path, max_epochs=2).fit(probe(model), second)
    assert counter.calls == 0
    assert torch.equal(second.splits["train"].features, first.splits["train"].features)
    assert second.splits["train"].keys == first.splits["train"].keys

    def directories() -> set[str]:
        return {p.name for p in (tmp_path / "cache").iterdir()}

    known = directories()
    trainer(tmp_path).fit(probe(model, token="patch"), data(tmp_path))  # other options
    assert counter.calls > 0 and len(directories() - known) == 2
    known = directories()
    trainer(tmp_path).fit(probe(model, layer="joint"), data(tmp_path))
    assert len(directories() - known) == 2
    known = directories()

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.audio_encoder[0].mlp.fc2.bias.add_(0.01)  # other weights
    changed_counter = ForwardCounter(changed)
    changed_data = data(tmp_path)
    trainer(tmp_path).fit(probe(changed), changed_data)
    assert changed_counter.calls > 0 and len(directories() - known) == 2
    assert not torch.equal(changed_data.splits["train"].features, first.splits["train"].features)
    known = directories()

    counter.calls = 0
    trainer(tmp_path).fit(probe(model), data(tmp_path, ClipSource(seed=5)))  # other data
    assert counter.calls > 0 and len(directories() - known) == 2
    known = directories()

    counter.calls = 0
    module = probe(model)
    run = trainer(tmp_path)
    tested = data(tmp_path)
    run.test(module, tested)  # the test split is cached on first use
    assert counter.calls == 2 * 3 and {name.split("-")[0] for name in directories() - known} == {"test"}


def test_interrupted_or_empty_builds_leave_no_cache_behind(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    batches = [{"label": torch.tensor([0, 1]), "key": ["a", "b"]}, {"label": torch.tensor([2]), "key": ["c"]}]
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("decoding failed")
        return torch.randn(len(batch["key"]), FRAMES, 8)

    with pytest.raises(RuntimeError, match="decoding failed"):
        cache.build("train", {"x": 1}, batches, failing, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    assert cache.load("train", {"x": 1}) is None

    built = cache.build(
        "train", {"x": 1}, batches, lambda b: torch.ones(len(b["key"]), FRAMES, 8), progress=False
    )
    assert (
        built.keys == ["a", "b", "c"]
        and built.features.dtype == torch.float16
        and built.labels.tolist() == [0, 1, 2]
    )
    assert cache.load("train", {"x": 2}) is None  # other components, other cache
    with pytest.raises(ValueError, match="the val data gave no clips"):
        cache.build("val", {"x": 1}, [], failing, progress=False)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["train"]


def test_clips_without_all_pairs_are_refused_with_a_clear_error(tmp_path):
    class TrainModeSource(ClipSource):
        def train_dataloader(self):
            clips = Clips(8, 0)
            pairs = [
                {**clips[i], "audio": clips[i]["audio"][0], "video": clips[i]["video"][0]} for i in range(8)
            ]
            return DataLoader(pairs, batch_size=4)

    with pytest.raises(ValueError, match="eval-mode clips with all T pairs"):
        trainer(tmp_path).fit(probe(backbone()), data(tmp_path, TrainModeSource()))
    assert not any((tmp_path / "cache").iterdir())


def test_a_source_without_validation_data_fits_but_cannot_validate(tmp_path):
    class TrainOnly(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.clips = 32

        def train_dataloader(self):
            return DataLoader(Clips(self.clips, 0), batch_size=16)

    module, datamodule = probe(backbone()), data(tmp_path, TrainOnly())
    run = trainer(tmp_path, max_epochs=2)
    run.fit(module, datamodule)
    assert run.global_step == 4 and set(datamodule.splits) == {"train"}
    with pytest.raises(ValueError, match="validate needs the val split, which TrainOnly does not provide"):
        run.validate(module, datamodule)


def test_the_probe_also_runs_with_the_backbone_in_the_loop(tmp_path):
    model = backbone()
    module = probe(model)
    datamodule = data(tmp_path)
    run = trainer(tmp_path)
    run.fit(module, datamodule)
    source = ClipSource()
    batch = next(iter(source.val_dataloader()))
    cached = datamodule.splits["val"].features[:16].float()
    live = module.features(batch)
    torch.testing.assert_close(live, cached, atol=2e-3 * live.abs().max().item(), rtol=1e-2)  # float16 cache
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            module(batch), module({"features": datamodule.splits["val"].features[:16]}), atol=2e-2, rtol=2e-2
        )

    counter = ForwardCounter(model)
    trainer(tmp_path, max_epochs=2).fit(probe(model), source)  # clips straight from the source
    assert counter.calls == 2 * 2 * (6 + 3)  # every epoch runs the backbone again


def write_shards(directory: Path, clips: int, num_classes: int = 3) -> list[str]:
    """Real shards of `avsync prepare`'s layout, written with the data package's writer: clip `c` is of
    class `c % num_classes`, its frames and spectrogram brighter with the class."""
    from avsync.data.images import encode_jpeg
    from avsync.data.schema import SCHEMA_VERSION, encode_sample, sample_key
    from avsync.data.shard_writer import ShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, 0, max_bytes=None, max_clips=None)
    ids = []
    for clip in range(clips):
        label = clip % num_classes
        frames = [encode_jpeg(np.full((32, 40, 3), 60 * label + 4 * i, np.uint8)) for i in range(16)]
        fbank = np.full((120, 128), float(label), np.float32) + np.random.default_rng(clip).normal(
            size=(120, 128)
        )
        clip_id = f"clip{clip:03d}"
        metadata = {"id": clip_id, "num_frames": 16, "labels": [label], "fbank_frames": 120}
        writer.write(encode_sample(sample_key(clip_id), frames, fbank, metadata))
        ids.append(clip_id)
    record = writer.finish()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": num_classes,
        "classes": [{"index": i, "mid": f"c{i}", "name": f"class {i}"} for i in range(num_classes)],
        "preprocessing": {"num_frames": 16},
        "shards": [
            {"name": record.name, "clips": record.clips, "bytes": record.bytes, "sha256": record.sha256}
        ],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return ids


def test_shards_are_cached_through_the_shard_data_module_and_rewritten_shards_invalidate_it(tmp_path):
    from avsync.data.datamodule import AVShardDataModule

    ids = write_shards(tmp_path / "train", 12)
    write_shards(tmp_path / "eval", 6)
    model = CAVMAESync(**{**SMALL, "mel_bins": 128})
    counter = ForwardCounter(model)

    def shard_data() -> CachedFeatureDataModule:
        source = AVShardDataModule(
            train_shards=str(tmp_path / "train"), val_shards=str(tmp_path / "eval"), batch_size=4,
            num_workers=0, num_frames=FRAMES, train_mode="eval", random_resized_crop=False,
            horizontal_flip=False, label_format="index",
        )  # fmt: skip
        return data(tmp_path, source, batch_size=4)

    first = shard_data()
    trainer(tmp_path, max_epochs=2).fit(probe(model, num_classes=3), first)
    train = first.splits["train"]
    assert sorted(train.keys) == ids and train.features.shape == (12, FRAMES, 64)
    labels = dict(zip(train.keys, train.labels.tolist(), strict=True))
    assert labels == {clip_id: i % 3 for i, clip_id in enumerate(ids)}
    assert counter.calls == 2 * (3 + 2)

    counter.calls = 0
    trainer(tmp_path).fit(probe(model, num_classes=3), shard_data())
    assert counter.calls == 0

    write_shards(tmp_path / "eval", 9)  # re-prepared evaluation shards
    rebuilt = shard_data()
    trainer(tmp_path).fit(probe(model, num_classes=3), rebuilt)
    assert counter.calls == 2 * 3 and len(rebuilt.splits["val"]) == 9  # only the changed split


def test_under_ddp_each_rank_extracts_its_share_and_loads_the_whole_cache(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(Path(__file__).with_name("probe_ddp_cache.py")), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected_keys = sorted(f"s0-{i:04d}" for i in range(96))
    for report in reports:
        assert report["calls"] == 2 * (3 + 2)  # half of the 6 train and 3 val batches, audio + video
        assert sorted(report["train_keys"]) == expected_keys and report["val_clips"] == 48
    (manifest,) = (tmp_path / "cache").glob("train-*/manifest.json")
    assert json.loads(manifest.read_text())["clips_per_rank"] == [48, 48]


# ---------------------------------------------------------------------------------------------- averaging
class Snapshots(L.Callback):
    """Head weights at every epoch's end and as seen by each validation epoch."""

    def __init__(self):
        self.epoch_ends: list[dict] = []
        self.validated: list[dict] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validated.append(copy.deepcopy(pl_module.head.state_dict()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_ends.append(copy.deepcopy(pl_module.head.state_dict()))


def mean_state(states: list[dict]) -> dict:
    return {name: torch.stack([s[name] for s in states]).mean(dim=0) for name in states[0]}


def test_weight_averaging_evaluates_and_keeps_the_mean_of_the_epoch_weights(tmp_path):
    module = probe(backbone(), lr=2e-3)
    snapshots = Snapshots()
    averaging = EpochWeightAveraging(start_epoch=1)
    trainer(tmp_path, max_epochs=4, callbacks=[averaging, snapshots]).fit(module, data(tmp_path))
    ends = snapshots.epoch_ends
    assert len(ends) == 4 and averaging.averaged_epochs == 3
    for name, value in mean_state(ends[1:]).items():
        torch.testing.assert_close(module.head.state_dict()[name], value)
    assert any(not torch.allclose(module.head.state_dict()[n], ends[-1][n]) for n in ends[-1])

    seen = snapshots.validated
    for name in ends[0]:
        torch.testing.assert_close(seen[0][name], ends[0][name])  # before the first average: current weights
        torch.testing.assert_close(seen[2][name], mean_state(ends[1:3])[name])  # epochs 1-2 averaged


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_probe_checkpoint_reloads_with_its_backbone_and_refuses_another(tmp_path):
    model = backbone()
    weights = tmp_path / "pretrain.ckpt"
    torch.save(
        {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
         "hyper_parameters": {"backbone_config": model.config}},
        weights,
    )  # fmt: skip
    module = ProbeModule(backbone_checkpoint=str(weights), task="multiclass", num_classes=4, lr=1e-3)
    datamodule = data(tmp_path)
    run = trainer(tmp_path)
    run.fit(module, datamodule)
    path = tmp_path / "probe.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any("backbone" in key for key in saved["state_dict"]) and saved["probe_backbone_fingerprint"]

    reloaded = ProbeModule.load_from_checkpoint(path, weights_only=True)
    batch = {"features": datamodule.splits["val"].features[:8]}
    module.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), module(batch))
    with pytest.raises(CheckpointError, match="trained on another backbone"):
        ProbeModule.load_from_checkpoint(
            path, weights_only=True, backbone=backbone(seed=1), backbone_checkpoint=None
        )


def test_a_probe_checkpoint_from_before_the_layer_option_reloads_only_on_the_joint_features(tmp_path):
    """Heads saved before `layer` existed were trained on the joint-layer features (then the only ones):
    the new default (`encoder`, the authors') would feed them other numbers, so it is refused."""
    import lightning

    model = backbone()
    weights = tmp_path / "pretrain.ckpt"
    torch.save(
        {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
         "hyper_parameters": {"backbone_config": model.config}},
        weights,
    )  # fmt: skip
    module = ProbeModule(backbone_checkpoint=str(weights), task="multiclass", num_classes=4, layer="joint")
    old = {key: value for key, value in module.hparams.items() if key != "layer"}
    path = tmp_path / "old_probe.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": old,
         "probe_backbone_fingerprint": module.frozen.fingerprint,
         "pytorch-lightning_version": lightning.__version__},
        path,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="load it with layer='joint'"):
        ProbeModule.load_from_checkpoint(path, weights_only=True)
    reloaded = ProbeModule.load_from_checkpoint(path, weights_only=True, layer="joint")
    assert reloaded.hparams.layer == "joint"


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["as20k_vitb", "vggsound_vitb", "tiny_cpu"])
def test_configs_match_the_constructors(name, capsys):
    from avsync.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert (
        "avsync.tasks.probe.ProbeModule" in printed and "avsync.data.datamodule.AVShardDataModule" in printed
    )
