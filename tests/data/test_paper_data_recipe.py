"""The data side of the paper's recipes (issue 20, items 4, 5, 6, 10), read from the shipped YAML.

- Images: the paper's recipes resize and centre-crop (supplementary §6.1); the tiny one keeps its crops.
- Random time shift (Table 9): CAV-MAE's roll of the model input (`src/dataloader.py`, under `noise`),
  checked point by point against that code written out here; the pretraining recipe turns it on.
- Alignment: every paper recipe cuts the authors' windows (fixed 1024-frame spectrogram) for 10-s and
  6-s clips; the tiny recipes keep avsync's `clip` default.
- Epochs and batches: the epoch comes from the manifests whatever the number of nodes, a fit says its
  global batch, steps per epoch and learning rate at start-up, and warns when the batch is not the recipe's.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import lightning as L
import lightning_utilities.core.rank_zero as rank_zero
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image

from avsync.data.datamodule import AVShardDataModule
from avsync.data.schema import SCHEMA_VERSION
from avsync.data.transforms import AUDIO_MEAN, AUDIO_STD, CenterFrame, random_time_shift
from avsync.model import CAVMAESync
from avsync.recipes import find_recipe
from avsync.tasks import PretrainModule

from .conftest import authors_fbank, write_shards

PAPER_RECIPES = (
    "pretrain/audioset2m_vitb",
    "probe/as20k_vitb",
    "probe/vggsound_vitb",
    "retrieval/vggsound_vitb",
    "retrieval/audioset_vitb",
)
TINY_RECIPES = ("pretrain/tiny_cpu", "probe/tiny_cpu", "retrieval/tiny_cpu")


def recipe_data(name: str, **overrides) -> AVShardDataModule:
    """The recipe's clip data module, parsed and built by jsonargparse from the shipped YAML as LightningCLI
    builds `data` (subclass mode); a probe's is the `source` of its feature cache. `overrides` replace
    init_args (shard paths: the recipe's folders are not here, so None unless given); the model's input
    sizes, which `avsync fit` links from the backbone, are the ViT-B's (224, 416) or the tiny's (96, 192)."""
    config = yaml.safe_load(find_recipe(name).read_text())["data"]
    clips = config["init_args"]["source"] if "source" in config["init_args"] else config
    shards = {f"{split}_shards": None for split in ("train", "val", "test", "predict")}
    clips["init_args"].update({**shards, **overrides})  # the recipe's shard folders are not here
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    module = parser.instantiate(parser.parse_object({"data": clips})).data
    assert type(module) is AVShardDataModule
    module.image_size, module.audio_length = (96, 192) if "tiny" in name else (224, 416)
    return module


# ------------------------------------------------------------------------------ CAV-MAE's time shift
def cavmae_time_shift(fbank: torch.Tensor, target_length: int, randint) -> torch.Tensor:
    """CAV-MAE `AudiosetDataset.__getitem__` under `noise=True`, its roll (the flag's uniform noise is
    not Table 9's time shift), on the normalized model input `fbank` of `target_length` rows, with the
    draw `randint` (numpy's `np.random.randint`):
    `torch.roll(fbank, np.random.randint(-target_length, target_length), 0)`."""
    return torch.roll(fbank, randint(-target_length, target_length), 0)


def test_time_shift_is_cavmaes_roll_of_the_model_input_point_by_point():
    length, mel, count = 8, 3, 8000
    window = torch.arange(length * mel, dtype=torch.float32).view(length, mel)  # every value distinct
    shifted = random_time_shift(window.expand(count, length, mel))
    rotations = []
    for out in shifted:
        # 1. Each output is the reference's output for one of its draws: a roll along time (dim 0), circular
        #    (nothing lost, nothing padded), every mel bin of a row moving together.
        rotation = -(int(out[0, 0]) // mel) % length  # row 0 holds input row (0 - k) mod L
        rotations.append(rotation)

        def draw(low: int, high: int, rotation=rotation) -> int:  # the reference, given this draw
            assert (low, high) == (-length, length) and low <= rotation < high
            return rotation

        assert torch.equal(out, cavmae_time_shift(window, length, draw))
    # 2. The draws are distributed as the reference's: numpy's randint(-L, L) turns the window by each of
    #    the L rotations with probability 2 / 2L = 1/L; so must the transform (independently per window).
    reference = np.bincount(
        np.random.RandomState(0).randint(-length, length, count) % length, minlength=length
    )
    ours = np.bincount(rotations, minlength=length)
    for counts in (reference, ours):
        assert np.abs(counts / count - 1 / length).max() < 0.02
    assert len(set(rotations[:16])) > 3  # not one draw shared by a batch of windows


def test_the_data_module_shifts_training_windows_only_when_asked(tmp_path):
    """Real shards (row t of every spectrogram holds t): with `time_shift` every training window is its
    aligned window rolled circularly (padding included, as the reference pads then rolls), by shifts
    that vary; evaluation windows never move, and without the option training windows do not either."""
    write_shards(tmp_path / "shards", [4], fbank_frames=598)  # a 6-s clip: authors' windows hold padding
    window = 416

    def module(time_shift: bool) -> AVShardDataModule:
        return AVShardDataModule(
            train_shards=str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), batch_size=4,
            num_workers=0, image_size=32, audio_length=window, alignment="authors", shuffle_buffer=1,
            time_shift=time_shift,
        )  # fmt: skip

    shifted, plain = module(True), module(False)
    shifted.setup("fit")
    plain.setup("fit")
    padded = torch.tensor([float(t) if t < 598 else 0.0 for t in range(1024)])  # the authors' 1024 rows
    expected = (padded - AUDIO_MEAN) / AUDIO_STD
    seen = set()
    for _ in range(4):
        batch = next(iter(shifted.train_dataloader()))
        for b, frame in enumerate(batch["frame_index"].tolist()):
            start = max(0, min(64 * frame - window // 2, 1024 - window))
            aligned = expected[start : start + window]
            values = batch["audio"][b, :, 0]
            rolls = [k for k in range(window) if torch.allclose(values, torch.roll(aligned, k), atol=1e-4)]
            assert rolls, f"frame {frame}: not a circular shift of its aligned window"
            seen.add(rolls[0])
    assert len(seen) > 4  # the shift varies (0 for all would mean no shift at all)
    for _ in range(2):
        batch = next(iter(plain.train_dataloader()))
        for b, frame in enumerate(batch["frame_index"].tolist()):
            start = max(0, min(64 * frame - window // 2, 1024 - window))
            torch.testing.assert_close(batch["audio"][b, :, 0], expected[start : start + window])
    evaluation = next(iter(shifted.val_dataloader()))
    for frame in range(16):
        start = max(0, min(64 * frame - window // 2, 1024 - window))
        torch.testing.assert_close(evaluation["audio"][0, frame, :, 0], expected[start : start + window])


# ------------------------------------------------------------------------------ the recipes' choices
def test_the_paper_recipes_resize_and_centre_crop_and_pretraining_shifts_in_time():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    centre = np.asarray(CenterFrame(224)(image))
    for name in PAPER_RECIPES:
        module = recipe_data(name)
        # retrieval only evaluates (a centre crop whatever the training options); the others train
        splits = ("test",) if name.startswith("retrieval") else ("train", "test")
        for split in splits:
            transform = module.decoder(split).image_transform
            for _ in range(4):  # deterministic: no crop is drawn, no flip
                assert np.array_equal(np.asarray(transform(image)), centre), (name, split)
    pretrain = recipe_data("pretrain/audioset2m_vitb").decoder("train")
    assert pretrain.audio_augmentation is not None and pretrain.audio_augmentation.time_shift
    for name in ("probe/as20k_vitb", "probe/vggsound_vitb"):  # cached features: stated off, not ignored
        assert recipe_data(name).time_shift is False
    tiny = recipe_data("pretrain/tiny_cpu")  # its own stated choice: random crops and flips, no shift
    assert tiny.random_resized_crop and tiny.horizontal_flip and not tiny.time_shift


def test_a_full_pass_says_that_the_time_shift_does_not_reach_it(tmp_path):
    write_shards(tmp_path / "shards", [2])
    module = AVShardDataModule(
        train_shards=str(tmp_path / "shards"), batch_size=2, num_workers=0, image_size=32, audio_length=64,
        time_shift=True,
    )  # fmt: skip
    module.setup()
    with pytest.warns(UserWarning, match="time_shift=True does not apply to a full pass"):
        module.full_pass_dataloader("train")


# ------------------------------------------------------------------------------ alignment
def authors_windows(fbank: torch.Tensor, window: int, num_frames: int = 16) -> torch.Tensor:
    """The authors' `dataloader_sync.py`, written out: `_wav2fbank` zero-pads or cuts the raw spectrogram
    to 1024 rows; `map_frame_to_spectrogram` puts window i at `int(round(i * 1024 / T))`, shifted inside
    `[0, 1024)`; then `(fbank - mean) / std`."""
    rows = fbank.shape[0]
    fixed = torch.cat([fbank, torch.zeros(1024 - rows, fbank.shape[1])]) if rows < 1024 else fbank[:1024]
    out = []
    for i in range(num_frames):
        position = int(round(i * 1024 / num_frames))
        start = max(0, position - window // 2)
        end = start + window
        if end > 1024:
            end = 1024
            start = max(0, end - window)
        out.append((fixed[start:end] - AUDIO_MEAN) / AUDIO_STD)
    return torch.stack(out)


@pytest.fixture(scope="module")
def clip_spectrograms() -> dict[int, torch.Tensor]:
    """Kaldi spectrograms (the authors' recipe) of a 10-s and a 6-s 16-kHz clip: 998 and 598 rows."""
    generator = torch.Generator().manual_seed(0)
    return {
        seconds: authors_fbank(0.1 * torch.randn(1, 16000 * seconds, generator=generator))
        for seconds in (10, 6)
    }


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_each_paper_recipe_cuts_the_authors_windows_for_10_s_and_6_s_clips(name, clip_spectrograms):
    module = recipe_data(name)
    assert module.alignment == "authors"
    for seconds, fbank in clip_spectrograms.items():
        assert fbank.shape[0] == {10: 998, 6: 598}[seconds]
        expected = authors_windows(fbank, 416)
        for split in ("train", "test"):  # the training decoder's single windows and the evaluation stack
            windows = module.decoder(split).audio_windows
            torch.testing.assert_close(windows.windows(fbank), expected, atol=1e-5, rtol=0)
            for i in (0, 7, 15):
                torch.testing.assert_close(windows.window(fbank, i), expected[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY_RECIPES)
def test_the_tiny_recipes_keep_avsyncs_clip_alignment(name, clip_spectrograms):
    module = recipe_data(name)
    assert module.alignment == "clip"
    fbank = clip_spectrograms[6]
    windows = module.decoder("test").audio_windows.windows(fbank)
    length = module.audio_length
    assert not torch.allclose(windows, authors_windows(fbank, length))
    for i in (0, 8, 15):  # centred on the frame over the clip's own 598 rows, the mean outside it
        start = round(i * 598 / 16) - length // 2
        inside = [t for t in range(start, start + length) if 0 <= t < 598]
        row = inside[0] - start
        torch.testing.assert_close(
            windows[i, row : row + len(inside)], (fbank[inside[0] : inside[-1] + 1] - AUDIO_MEAN) / AUDIO_STD
        )


def test_the_recipes_parse_through_avsyncs_lightning_cli(capsys):
    """The whole shipped files, through `avsync fit --print_config` (parsed, nothing built or trained)."""
    from avsync.cli import main

    for command, name, time_shift in (
        ("fit", "pretrain/audioset2m_vitb", "true"),
        ("test", "retrieval/vggsound_vitb", "false"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--config", name, "--print_config"])
        assert exit_info.value.code == 0
        data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
        assert data["alignment"] == "authors" and str(data["time_shift"]).lower() == time_shift


# ------------------------------------------------------------------------------ epochs, batches, rate
def write_manifest(directory, counts: list[int]) -> None:
    """A manifest as `avsync prepare` writes it, listing `counts` clips per shard (the epoch arithmetic
    reads only the manifest; no shard is opened)."""
    directory.mkdir(parents=True)
    shards = [
        {"name": f"shard-{i:06d}.tar", "clips": n, "bytes": 1, "sha256": "0"} for i, n in enumerate(counts)
    ]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": 527,
        "classes": [{"index": i, "mid": f"c{i}", "name": f"class {i}"} for i in range(527)],
        "preprocessing": {"num_frames": 16},
        "shards": shards,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_the_pretraining_epoch_is_one_pass_over_the_manifests_on_any_number_of_nodes(tmp_path):
    clips = 1_772_023  # the AudioSet-2M count issue 20 gives for CAV-MAE's list
    write_manifest(tmp_path / "as2m", [clips // 1000] * 999 + [clips - 999 * (clips // 1000)])
    module = recipe_data("pretrain/audioset2m_vitb", train_shards=str(tmp_path / "as2m"), val_shards=None)
    module.setup("fit")
    assert module.epoch_length is None and module.recipe_global_batch == 512
    one_node = module.training_plan(world_size=8)
    assert (one_node.global_batch, one_node.source, one_node.manifest_clips) == (512, "manifest", clips)
    # 221,503 clips per rank, in whole batches of 64 on each of 8 workers: 433 x 8 batches per rank
    assert one_node.steps_per_epoch == 3464 and one_node.epoch_clips == 3464 * 512
    four_nodes = module.training_plan(world_size=32)  # `--trainer.num_nodes 4`, batch unchanged
    assert four_nodes.global_batch == 2048 and four_nodes.steps_per_epoch == 872
    module.batch_size = 16  # what the warning advises: 512 / 32 ranks
    kept = module.training_plan(world_size=32)
    assert (kept.global_batch, kept.steps_per_epoch, kept.epoch_clips) == (512, 3464, 3464 * 512)
    for plan in (one_node, four_nodes, kept):  # one pass, give or take a batch per worker and rank
        assert clips <= plan.epoch_clips < clips + plan.world_size * module.num_workers * plan.batch_size
    module.batch_size, module.epoch_length = 64, 240_000  # the old fixed count: grows with the nodes
    assert module.training_plan(world_size=32).epoch_clips > 4 * clips
    text = one_node.describe(2e-4)
    assert text == (
        "training: global batch 512 (64 per rank x 8 rank(s)), 1,773,568 clips per epoch (set by manifest; "
        "manifests: 1,772,023 clips), 3,464 optimizer steps per epoch, learning rate 0.0002"
    )


@pytest.mark.parametrize(("recipe_batch", "accumulate"), [(512, 2), (2, 1)])
def test_a_fit_says_its_plan_at_start_up_and_warns_when_the_batch_is_not_the_recipes(
    tmp_path, recipe_batch, accumulate
):
    write_shards(tmp_path / "shards", [4, 4])
    module = PretrainModule(
        backbone=CAVMAESync.from_preset("tiny"), lr=3e-4, log_images_every_n_steps=0, warmup_epochs=0
    )
    data = AVShardDataModule(
        train_shards=str(tmp_path / "shards"), batch_size=2, num_workers=0, resampled=True,
        recipe_global_batch=recipe_batch,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    rank_zero.log.addHandler(handler)
    level = rank_zero.log.level
    rank_zero.log.setLevel(logging.INFO)  # an earlier tool run in this process may have quietened it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=data)
    finally:
        rank_zero.log.removeHandler(handler)
        rank_zero.log.setLevel(level)
    # 8 clips listed, one rank, batches of 2: 4 batches per epoch, optimizer steps after every `accumulate`
    terms = "2 per rank x 1 rank(s)" + (" x 2 accumulated" if accumulate == 2 else "")
    assert [line for line in lines if line.startswith("training: ")] == [
        f"training: global batch {2 * accumulate} ({terms}), 8 clips per epoch (set by manifest; manifests: "
        f"8 clips), {4 // accumulate} optimizer steps per epoch, learning rate 0.0003"
    ]
    warned = [str(w.message) for w in caught if "is not the" in str(w.message)]
    if recipe_batch == 512:
        (message,) = warned
        assert message.startswith("global batch 4 (2 per rank x 1 rank(s) x 2 accumulated) is not the 512")
        advice = (
            "set data.init_args.batch_size to 512 (512 / 1 ranks) and trainer.accumulate_grad_batches to 1"
        )
        assert advice in message
        assert "learning rate 0.0003" in message and "not scaled" in message
    else:
        assert warned == []
    assert math.isclose(module.hparams.lr, 3e-4)  # kept as configured, never scaled
    assert math.isclose(trainer.optimizers[0].param_groups[0]["initial_lr"], 3e-4)
