"""Sound-prompted segmentation: heat-map geometry, prompt decoding, LocalizationModule in real Lightning
test runs, `avsync localize` end to end on a small synthetic set and a CSV manifest, and the same run
through `avsync test --config configs/localization/synth_tiny.yaml`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from avsync.cli import main as avsync_main
from avsync.data.alignment import window_center
from avsync.data.clip import extract_video_clip
from avsync.data.transforms import CenterFrame, frames_to_tensor
from avsync.evaluation.localization import localization_metrics, normalize_maps, upsample_maps
from avsync.model import CAVMAESync
from avsync.synth import load_synth, synthesize
from avsync.synth.generate import PRODUCT_FILES
from avsync.tasks import PretrainModule
from avsync.tasks.evaluation_trainer import evaluation_trainer
from avsync.tasks.localization import (
    LocalizationModule,
    Overlay,
    control_figure,
    evaluate_localization,
    similarity_maps,
    sound_prompted_maps,
)
from avsync.tasks.localization_data import (
    LocalizationDataModule,
    MismatchedSounds,
    PromptDataset,
    collate_prompts,
    crop_mask,
    read_manifest,
    synth_prompt_set,
)
from avsync.tasks.visualize import denormalize_frame
from tests.conftest import REPO_ROOT, VIDEO_TEST_BACKBONE


def main(argv: list[str]) -> int:
    """`avsync localize ARGV`, as the command runs it."""
    return avsync_main(["localize", *argv])


CPU = {"accelerator": "cpu"}


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> Path:
    """Four 3-s clips of three classes, 64x64 pixels, two of them in the test split."""
    out = tmp_path_factory.mktemp("localize") / "synth"
    synthesize(out, clips=4, classes=3, seed=0, duration=3.0, size=64, holdout=0.5, min_event=0.8, workers=1)
    return out


@pytest.fixture(scope="module")
def backbone() -> CAVMAESync:
    torch.manual_seed(0)
    return CAVMAESync(**VIDEO_TEST_BACKBONE).eval()


def write_checkpoint(backbone: CAVMAESync, path: Path) -> Path:
    """A Lightning-format checkpoint of a `PretrainModule` (what `avsync fit` writes, minus trainer state)."""
    module = PretrainModule(backbone)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


# ---------------------------------------------------------------------------------------------- heat maps
def test_similarity_map_is_the_patch_cosine_on_the_row_major_grid():
    audio = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    patches = -audio.repeat(6, 1)[None]  # (1, 6, 4): every patch opposite to the sound ...
    patches[0, 2] = 2 * audio[0]  # ... except row 0, column 2, which points the same way
    maps = similarity_maps(audio, patches, (2, 3))
    expected = torch.tensor([[-1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]])  # cosines on the 2 x 3 grid
    assert maps.shape == (1, 2, 3) and torch.allclose(maps[0], expected)
    # upsampled (at scoring time) the top-right patch's pixels are the hot ones: not transposed
    rows, cols = torch.nonzero(upsample_maps(maps, (32, 48))[0] > 0.5, as_tuple=True)
    assert rows.max() < 16 and cols.min() >= 32


def test_unknown_patch_readouts_and_normalizations_are_refused(backbone):
    with pytest.raises(ValueError, match="unknown patch readout 'gradcam'; use one of patch_tokens"):
        LocalizationModule(backbone, patch_readout="gradcam")
    with pytest.raises(ValueError, match="unknown normalization 'global'"):
        LocalizationModule(backbone, normalization="global")
    with pytest.raises(ValueError, match="give exactly one of backbone"):
        LocalizationModule()


def test_backbone_patch_tokens_are_row_major(backbone):
    """The map's layout assumes token `r * w + c` covers patch row r, column c; check the tokenizer."""
    video = torch.zeros(1, 3, 48, 48)
    changed = video.clone()
    changed[..., 0:16, 32:48] = 1.0  # only the pixels of row 0, column 2
    _, before = backbone.tokenize(None, video)
    _, after = backbone.tokenize(None, changed)
    moved = (after - before).abs().sum(-1)[0] > 0
    assert moved.nonzero().flatten().tolist() == [2]


def test_heat_maps_are_cosines_of_the_audio_token_with_each_patch(backbone):
    generator = torch.Generator().manual_seed(1)
    audio, video = (
        torch.randn(2, 64, 128, generator=generator),
        torch.randn(2, 3, 48, 48, generator=generator),
    )
    maps = sound_prompted_maps(backbone, audio, video)
    assert maps.shape == (2, 3, 3)  # the patch grid of 48-pixel frames
    with torch.no_grad():
        embeddings = backbone.encode(audio, video)
    for b in range(2):
        for n in range(9):
            expected = F.cosine_similarity(embeddings.global_audio[b], embeddings.patches_video[b, n], dim=0)
            assert maps[b, n // 3, n % 3] == pytest.approx(float(expected), abs=1e-5)


# ---------------------------------------------------------------------------------------------- prompts
def test_masks_are_resized_nearest_neighbour_then_centre_cropped():
    """DenseAV's label transform, `Resize(S, NEAREST)` + `CenterCrop(S)`, on small masks.

    6 wide x 4 high to S = 2: the short side 4 -> 2, the long side int(2 * 6 / 4) = 3; nearest-neighbour
    output pixel x reads source pixel floor((x + 0.5) * 6 / 3): columns 1, 3, 5, and rows 1, 3. The crop
    starts at int(round((3 - 2) / 2)) = round(0.5) = 0: columns 1 and 3 remain.
    """
    mask = np.zeros((4, 6), dtype=bool)
    mask[1, 1] = True  # one object pixel: kept whole by nearest; a bicubic downsample halved it away
    mask[3, 3] = True
    mask[0, 0] = mask[2, 2] = mask[1, 5] = True  # pixels nearest-neighbour skips, or the crop cuts
    assert crop_mask(mask, 2).tolist() == [[True, False], [False, True]]
    # 7 wide x 2 high to S = 2: no resize; the crop starts at int(round(2.5)) = 2 (half to even), not 3
    mask = np.zeros((2, 7), dtype=bool)
    mask[:, 2] = True
    assert crop_mask(mask, 2).tolist() == [[True, False], [True, False]]
    # upsampling: 2 x 2 to 4 x 4 repeats each pixel in a 2 x 2 block
    mask = np.array([[True, False], [False, False]])
    assert crop_mask(mask, 4).tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2


def test_masks_follow_the_image_geometry():
    """An 80x40 mask: the short side goes 40 -> 32 (x0.8) and the centre crop keeps x 20..60 of 80."""
    mask = np.zeros((40, 80), dtype=bool)
    mask[10:30, 8:28] = True  # -> rows 8..24, columns 0..6.4 (the crop cuts x < 20)
    mask[5:15, 50:70] = True  # -> rows 4..12, columns 24..32 (the crop cuts x >= 60)
    cropped = crop_mask(mask, 32)
    assert cropped.shape == (32, 32)
    assert cropped[8:24, 0:6].all() and cropped[4:12, 25:32].all()
    assert not cropped[:, 8:23].any() and not cropped[13:, 8:].any() and not cropped[:3].any()
    assert abs(int(cropped.sum()) - (16 * 6.4 + 8 * 8)) <= 16  # boundary rows/columns may round either way
    # and the image itself lands on the same pixels
    picture = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2))
    image = denormalize_frame(frames_to_tensor([CenterFrame(32)(picture)])[0]).mean(0)
    assert ((image > 0.5) == cropped).float().mean() > 0.98


def test_synth_prompts_are_every_frame_with_its_class_and_mask(synth_set, backbone):
    prompts = synth_prompt_set(synth_set, "test")
    manifest = load_synth(synth_set)
    assert [s.key for s in prompts.sources] == manifest.splits["test"]
    assert prompts.class_names == ["synth_0", "synth_1", "synth_2"]
    dataset = PromptDataset(prompts.sources, backbone.image_size, backbone.audio_length)
    item = dataset[0]
    clip = manifest.splits["test"][0]
    annotation = manifest.annotation(clip)
    assert item["video"].shape == (16, 3, 48, 48) and item["audio"].shape == (16, 64, 128)
    assert item["class_index"].tolist() == annotation["frames"]["class_indices"]
    assert item["key"][3] == f"{clip}/f03"
    mask = np.asarray(Image.open(synth_set / annotation["frames"]["masks"][3])) > 0
    expected = torch.from_numpy(np.array(Image.fromarray(mask).resize((48, 48), Image.Resampling.NEAREST)))
    assert torch.equal(item["mask"][3], expected)  # a square frame: the nearest resize alone, no crop
    # the windows are the clip's aligned, normalized windows (frame 0's starts before the clip: padded with 0)
    fbank = torch.from_numpy(extract_video_clip(manifest.video(clip)).fbank).float()
    start = window_center(8, 16, fbank.shape[0]) - 32
    assert torch.allclose(item["audio"][8], (fbank[start : start + 64] + 5.081) / 4.4849, atol=1e-5)
    assert torch.all(item["audio"][0][:32] == 0)


def test_an_older_set_without_manifests_is_named_and_avsync_synth_adds_them(synth_set, tmp_path):
    """A set written before `avsync synth` wrote localization manifests: a one-line error says what to
    run; running it with the same parameters adds the files without rendering again (the videos keep
    their modification times, so shards prepared from them stay valid), byte for byte a fresh set's."""
    old = tmp_path / "synth"
    shutil.copytree(synth_set, old)  # copy2: modification times kept
    written = {name: (old / name).read_bytes() for name in PRODUCT_FILES}
    for name in written:
        (old / name).unlink()
    video = load_synth(old).video(load_synth(old).splits["test"][0])
    stamp = video.stat().st_mtime_ns
    with pytest.raises(
        FileNotFoundError, match=r"localization_test.csv: not found; .* run avsync synth"
    ) as err:
        synth_prompt_set(old, "test")
    assert "\n" not in str(err.value) and str(old) in str(err.value)
    again = synthesize(old, clips=4, classes=3, seed=0, duration=3.0, size=64, holdout=0.5, min_event=0.8,
                       workers=1)  # fmt: skip
    assert again.cached and video.stat().st_mtime_ns == stamp
    assert {name: (old / name).read_bytes() for name in written} == written

    def relative(root: Path) -> list:
        return [
            (
                p.key,
                p.video.relative_to(root),
                p.frames,
                [m.relative_to(root) for m in p.masks],
                p.class_indices,
            )
            for p in synth_prompt_set(root, "test").sources
        ]

    assert relative(old) == relative(synth_set)
    with pytest.raises(FileNotFoundError, match="holds no synthetic set"):
        synth_prompt_set(tmp_path, "test")


def test_frame_rows_prompt_chosen_spec_frames_of_a_video_decoded_once(synth_set, tmp_path):
    """`video` + `frame` rows (docs/localization.md): the rows of a video become one source, in the order
    of its first row, whose prompts are exactly the full clip's prompts at those SPEC frames; bad rows
    are refused with their line, a frame past the clip's 16 when decoded; two videos with one stem get
    distinct keys."""
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "synth").symlink_to(synth_set)
    first, second = load_synth(synth_set).splits["test"]
    (folder / "other").mkdir()
    (folder / "other" / f"{first}.mp4").symlink_to(synth_set / "videos" / f"{second}.mp4")
    masks = {clip: f"synth/masks/{clip}/f{{:02d}}.png" for clip in (first, second)}

    def row(clip: str, frame: str, video: str | None = None, **extra) -> dict:
        mask = masks[clip].format(int(frame) if frame.isdigit() and int(frame) < 16 else 0)
        video = video or f"synth/videos/{clip}.mp4"
        return {"video": video, "frame": frame, "mask": mask, "class": "synth_1", **extra}

    rows = [
        row(first, "12"),
        row(second, "40"),
        row(first, "x"),  # line 4: not a number
        row(first, "3"),
        row(second, "1", frame_time="0.5"),  # line 6: both forms
        row(second, "5", video=f"other/{first}.mp4"),
    ]
    path = folder / "frames.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "frame", "frame_time", "mask", "class"])
        writer.writeheader()
        writer.writerows(rows)
    prompts = read_manifest(path, ["synth_0", "synth_1", "synth_2"])
    assert {r.source: r.reason for r in prompts.rejected} == {
        "frames.csv line 4": "frame 'x' is not a frame number (0, 1, ...)",
        "frames.csv line 6": "give frame (a SPEC frame number) or frame_time (seconds), not both",
    }
    keys = [source.key for source in prompts.sources]
    assert keys[:2] == [first, second] and keys[2].startswith(f"{first}-") and len(keys) == 3
    assert [source.frames for source in prompts.sources] == [(12, 3), (40,), (5,)]
    dataset = PromptDataset(prompts.sources, 48, 64)
    full = {p.key: PromptDataset([p], 48, 64)[0] for p in synth_prompt_set(synth_set, "test").sources}
    item = dataset[0]
    for name in ("audio", "video", "mask"):
        assert torch.equal(item[name], full[first][name][[12, 3]])
    assert item["key"] == [f"{first}/f12", f"{first}/f03"] and item["class_index"].tolist() == [1, 1]
    assert dataset[1]["rejection"].reason == "frame 40 is past the clip's 16 SPEC frames"
    assert torch.equal(dataset[2]["video"], full[second]["video"][[5]])  # the other path's own video
    assert dataset[2]["key"] == [f"{keys[2]}/f05"]


def write_manifest_set(synth_set: Path, folder: Path) -> tuple[Path, int]:
    """A CSV manifest over synthetic frames: image rows (frame JPEG + the clip's mp4 as the sound), video
    rows (`video,frame_time`), and one broken row of each kind. Returns the path and the good rows."""
    folder.mkdir()
    (folder / "synth").symlink_to(synth_set)  # paths in a manifest stay inside its folder
    manifest = load_synth(synth_set)
    rows, good = [], 0
    for clip in manifest.splits["test"]:
        annotation = manifest.annotation(clip)
        decoded = extract_video_clip(manifest.video(clip))
        video = f"synth/{manifest.video(clip).relative_to(synth_set)}"
        for i in (2, 12):
            image = folder / f"{clip}_{i}.jpg"
            image.write_bytes(decoded.frames[i])
            mask = f"synth/{annotation['frames']['masks'][i]}"
            name = f"synth_{annotation['frames']['class_indices'][i]}"
            rows.append({"image": image.name, "audio": video, "mask": mask, "class": name})
            rows.append({"video": video, "frame_time": annotation["frames"]["times"][i], "mask": mask,
                         "class": name})  # fmt: skip
            good += 2
    (folder / "notes.wav").write_text("this is not a sound")
    Image.new("L", (10, 10)).save(folder / "small_mask.png")
    first = rows[0]
    rows += [
        {**first, "image": "missing.jpg"},
        {**first, "audio": "notes.wav"},
        {**first, "mask": "small_mask.png"},
        {**first, "class": "trumpet"},
    ]
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "audio", "video", "frame_time", "mask", "class"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.txt").write_text("synth_0\nsynth_1\nsynth_2\n")
    return path, good


def test_manifest_rows_are_read_and_bad_ones_refused(synth_set, tmp_path):
    path, good = write_manifest_set(synth_set, tmp_path / "manifest")
    prompts = read_manifest(path, ["synth_0", "synth_1", "synth_2"])
    assert len(prompts.sources) == good + 2  # the bad sound and the small mask show only when decoded
    reasons = {r.source: r.reason for r in prompts.rejected}
    assert len(reasons) == 2
    assert any("missing.jpg does not exist" in reason for reason in reasons.values())
    assert any("unknown class 'trumpet'" in reason for reason in reasons.values())
    dataset = PromptDataset(prompts.sources, 48, 64)
    failures = [dataset[i]["rejection"] for i in range(len(dataset)) if "rejection" in dataset[i]]
    assert len(failures) == 2
    assert any("notes.wav" in f.reason and "not a readable media container" in f.reason for f in failures)
    assert any("small_mask.png is 10x10" in f.reason for f in failures)
    (tmp_path / "bad.csv").write_text("picture,sound\na.jpg,b.wav\n")
    with pytest.raises(ValueError, match="needs the columns"):
        read_manifest(tmp_path / "bad.csv")


def test_collate_keeps_rejections_beside_the_prompts(synth_set):
    prompts = synth_prompt_set(synth_set, None)
    items = [PromptDataset(prompts.sources[:1], 48, 64)[0], {"rejection": ("x.mp4", "no audio stream")}]
    batch = collate_prompts(items)
    assert batch["video"].shape[0] == 16 and batch["skipped"] == [("x.mp4", "no audio stream")]
    assert collate_prompts(items[1:])["audio"] is None


# ---------------------------------------------------------------------------------------------- module
def test_module_scores_the_synthetic_frames_in_a_lightning_test_run(synth_set, backbone):
    prompts = synth_prompt_set(synth_set, "test")
    module = evaluate_localization(backbone, prompts, batch_size=1, overlays=5, trainer_options=CPU)
    assert module.prompts_scored == 32 and module.skipped == []
    # the accumulated result is the one-shot metric of the same maps
    dataset = PromptDataset(prompts.sources, 48, 64)
    batch = collate_prompts([dataset[i] for i in range(len(dataset))])
    maps = sound_prompted_maps(backbone, batch["audio"], batch["video"])
    expected = localization_metrics(maps, batch["mask"], batch["class_index"], prompts.class_names)
    # the overlays show the maps as scored: normalized with the whole set's min and max, then upsampled
    scored = upsample_maps(normalize_maps(maps), (48, 48))
    assert len(module.overlays) == 5
    for i, overlay in enumerate(module.overlays):
        assert torch.allclose(overlay.heat_map, scored[i], atol=1e-6)
    assert module.result.mean_ap == pytest.approx(expected.mean_ap, abs=1e-6)
    assert module.result.mean_iou == pytest.approx(expected.mean_iou, abs=1e-6)
    counts = np.bincount(batch["class_index"].numpy(), minlength=3)
    assert {name: score.images for name, score in module.result.per_class.items()} == {
        f"synth_{k}": int(n) for k, n in enumerate(counts) if n
    }


@pytest.mark.parametrize("patch_readout", ["global_readout", "self_attention"])
def test_prompt_surgery_scores_each_map_minus_the_mean_map_over_every_prompt(
    synth_set, backbone, patch_readout
):
    """CLIP Surgery through the module: every map, minus the mean over all prompts of the set of the
    maps of the same image (computed here by brute force, prompt by prompt)."""
    prompts = synth_prompt_set(synth_set, "test")
    module = evaluate_localization(
        backbone,
        prompts,
        batch_size=1,
        overlays=32,
        trainer_options=CPU,
        patch_readout=patch_readout,
        prompt_surgery=True,
    )
    dataset = PromptDataset(prompts.sources, 48, 64)
    batch = collate_prompts([dataset[i] for i in range(len(dataset))])
    every_prompt = torch.stack(
        [
            sound_prompted_maps(
                backbone, batch["audio"][k : k + 1].expand_as(batch["audio"]), batch["video"], patch_readout
            )
            for k in range(len(batch["audio"]))
        ]
    )  # (prompt k, image n, h, w)
    own = every_prompt[torch.arange(len(batch["audio"])), torch.arange(len(batch["audio"]))]
    surgery = own - every_prompt.mean(dim=0)
    expected = localization_metrics(surgery, batch["mask"], batch["class_index"], prompts.class_names)
    plain = localization_metrics(own, batch["mask"], batch["class_index"], prompts.class_names)
    # the maps as scored (every prompt kept as an overlay) are the brute-force ones; the best-IoU
    # search is discrete (a float32 rounding can move a pixel across a threshold), so it is compared
    # through the maps, and AP, which moves continuously, directly
    scored = upsample_maps(normalize_maps(surgery), (48, 48))
    assert len(module.overlays) == len(surgery)
    for i, overlay in enumerate(module.overlays):
        assert torch.allclose(overlay.heat_map, scored[i], atol=1e-5)
    assert module.result.mean_ap == pytest.approx(expected.mean_ap, abs=1e-5)
    assert module.result.mean_ap != pytest.approx(plain.mean_ap, abs=1e-4)


def test_perfect_features_score_higher_than_random_ones(synth_set, backbone):
    """The same maps through the metric: masks themselves (an oracle) beat the untrained model's maps."""
    prompts = synth_prompt_set(synth_set, "test")
    dataset = PromptDataset(prompts.sources, 48, 64)
    batch = collate_prompts([dataset[i] for i in range(len(dataset))])
    maps = sound_prompted_maps(backbone, batch["audio"], batch["video"])
    oracle = localization_metrics(
        batch["mask"].float() + 0.1 * upsample_maps(maps, (48, 48)), batch["mask"], batch["class_index"]
    )
    model = localization_metrics(maps, batch["mask"], batch["class_index"])
    assert oracle.mean_ap > 0.95 and oracle.mean_ap > model.mean_ap + 0.3


def test_the_mismatched_sound_control_keeps_each_image_and_lends_it_the_next_sources_sounds(
    synth_set, backbone
):
    prompts = synth_prompt_set(synth_set, None)
    dataset = PromptDataset(prompts.sources, 48, 64)
    control = MismatchedSounds(dataset)
    n = len(dataset)
    assert len(control) == n == 4
    for i in range(n):
        own, lender, swapped = dataset[i], dataset[(i + 1) % n], control[i]
        for name in ("video", "mask", "class_index"):
            assert torch.equal(swapped[name], own[name])
        assert swapped["key"] == own["key"] and torch.equal(swapped["audio"], lender["audio"])
        assert not torch.equal(swapped["audio"], own["audio"])
    # read in order, each source is decoded once (the first once more, as the last one's lender)
    decoded = []

    class Counting(PromptDataset):
        def __getitem__(self, index):
            decoded.append(index)
            return super().__getitem__(index)

    counted = MismatchedSounds(Counting(prompts.sources, 48, 64))
    for i in range(n):
        counted[i]
    assert decoded == [0, 1, 2, 3, 0]
    # the module scores the swapped prompts (two test clips: each with the other's sounds)
    test_prompts = synth_prompt_set(synth_set, "test")
    module = evaluate_localization(backbone, test_prompts, batch_size=2, trainer_options=CPU,
                                   mismatched_sounds=True)  # fmt: skip
    assert module.prompts_scored == 32 and module.skipped == []
    test_set = PromptDataset(test_prompts.sources, 48, 64)
    for sounds, expected_equal in ((MismatchedSounds(test_set), True), (test_set, False)):
        batch = collate_prompts([sounds[i] for i in range(len(sounds))])
        maps = sound_prompted_maps(backbone, batch["audio"], batch["video"])
        expected = localization_metrics(maps, batch["mask"], batch["class_index"], test_prompts.class_names)
        assert (abs(module.result.mean_ap - expected.mean_ap) < 1e-6) == expected_equal
    with pytest.raises(ValueError, match="at least two sources"):
        MismatchedSounds(PromptDataset(prompts.sources[:1], 48, 64))


# ---------------------------------------------------------------------------------------------- command line
def test_cli_on_a_synthetic_set_writes_metrics_and_overlays(synth_set, backbone, tmp_path, capsys):
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    out = tmp_path / "out"
    code = main(["--ckpt", str(checkpoint), "--synth", str(synth_set), "--split", "test", "--out", str(out),
                 "--overlays", "3", "--workers", "0", "--accelerator", "cpu"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 32 and metrics["images"] == 32 and metrics["skipped"] == []
    assert 0 <= metrics["mAP"] <= 1 and 0 <= metrics["mIoU"] <= 1
    assert set(metrics["per_class"]) <= {"synth_0", "synth_1", "synth_2"}
    pictures = sorted((out / "overlays").glob("*.png"))
    assert len(pictures) == 3
    with Image.open(pictures[0]) as picture:
        assert picture.size == (4 * (3 * 48 + 4), 4 * 48)  # three panels and two gaps, enlarged 4x
    assert "mAP" in capsys.readouterr().out


def test_cli_on_a_manifest_skips_and_reports_bad_rows(synth_set, backbone, tmp_path, capsys):
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    path, good = write_manifest_set(synth_set, tmp_path / "manifest")
    out = tmp_path / "out"
    classes = path.parent / "classes.txt"
    code = main(["--ckpt", str(checkpoint), "--manifest", str(path), "--classes", str(classes),
                 "--out", str(out), "--workers", "0", "--accelerator", "cpu"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == good
    assert len(metrics["skipped"]) == 4
    stderr = capsys.readouterr().err
    for problem in ("does not exist", "unknown class", "not a readable media container", "is 10x10"):
        assert problem in stderr
        assert any(problem in entry["reason"] for entry in metrics["skipped"])


def test_cli_control_needs_two_sources(synth_set, backbone, tmp_path, capsys):
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    path, _ = write_manifest_set(synth_set, tmp_path / "manifest")
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[:2]) + "\n")  # the header and one row
    code = main(["--ckpt", str(checkpoint), "--manifest", str(path), "--out", str(tmp_path / "out"),
                 "--mismatched-sounds", "--workers", "0", "--accelerator", "cpu"])  # fmt: skip
    assert code == 2 and "needs at least two sources" in capsys.readouterr().err


def test_cli_refuses_a_bad_checkpoint(tmp_path, synth_set, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
    code = main(
        ["--ckpt", str(tmp_path / "model.ckpt"), "--synth", str(synth_set), "--out", str(tmp_path / "o")]
    )
    stderr = capsys.readouterr().err
    assert code == 2 and f"avsync localize: error: {tmp_path / 'model.ckpt'}" in stderr


def test_avsync_test_with_the_synth_tiny_config_writes_what_avsync_localize_writes(
    synth_set, backbone, tmp_path
):
    """One run, two ways to start it: the shipped config through LightningCLI (a real `avsync test`
    process) and the short form `avsync localize` give the same metrics.json, number for number."""
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    short, configured = tmp_path / "localize", tmp_path / "config"
    code = main(["--ckpt", str(checkpoint), "--synth", str(synth_set), "--split", "test", "--out", str(short),
                 "--overlays", "2", "--workers", "0", "--accelerator", "cpu"])  # fmt: skip
    assert code == 0
    command = [
        sys.executable, "-m", "avsync.cli", "test",
        "--config", str(REPO_ROOT / "configs" / "localization" / "synth_tiny.yaml"),
        f"--model.init_args.backbone_checkpoint={checkpoint}", f"--model.init_args.output_dir={configured}",
        "--model.init_args.overlays=2", f"--data.init_args.synth={synth_set}",
        "--data.init_args.num_workers=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((short / "metrics.json").read_text())
    written = json.loads((configured / "metrics.json").read_text())
    assert written["prompts"] == 32 and written["input"] == {"synth": str(synth_set), "split": "test"}
    assert written == expected
    assert [p.name for p in sorted((configured / "overlays").glob("*.png"))] == [
        p.name for p in sorted((short / "overlays").glob("*.png"))
    ]


def test_the_data_module_serves_the_prompts_at_the_backbone_s_geometry(synth_set, backbone):
    data = LocalizationDataModule(synth=str(synth_set), split="all", batch_size=2)
    module = LocalizationModule(backbone)  # class names: the data module's
    trainer = evaluation_trainer(accelerator="cpu")
    trainer.test(module, datamodule=data, verbose=False)
    assert (data.image_size, data.audio_length) == (48, 64)
    assert module.class_names == ["synth_0", "synth_1", "synth_2"] and module.prompts_scored == 64
    with pytest.raises(ValueError, match="a manifest or a synthetic set"):
        LocalizationDataModule().prompts  # noqa: B018
    with pytest.raises(ValueError, match="not both"):
        LocalizationDataModule(manifest="a.csv", synth="b")


def test_overlay_picture_shows_image_map_and_mask(synth_set, backbone):
    prompts = synth_prompt_set(synth_set, "test")
    module = evaluate_localization(backbone, prompts, overlays=1, trainer_options=CPU)
    overlay = module.overlays[0]
    picture = np.asarray(overlay.image(min_height=48))
    frame, mask_panel = picture[:, :48], picture[:, -48:]
    assert np.array_equal(mask_panel[..., 0] > 127, overlay.mask.numpy())
    assert np.abs(frame.astype(int) - (overlay.frame.permute(1, 2, 0).numpy() * 255).round()).max() <= 1


def test_control_figure_has_one_row_per_class_with_its_own_and_another_sound_s_map():
    def overlay(key, name, value, has_object=True):
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask[1:3, 1:3] = has_object
        return Overlay(key, name, torch.full((3, 4, 4), 0.5), torch.full((4, 4), value), mask)

    matched = [
        overlay("a", "dog", 1.0),
        overlay("b", "dog", 1.0),
        overlay("c", "car", 1.0, False),
        overlay("d", "cat", 1.0),
    ]
    mismatched = [overlay(o.key, o.class_name, 0.0, o.mask.any()) for o in matched]
    picture = np.asarray(control_figure(matched, mismatched, classes=4, min_height=4))
    # dog and cat (car shows no object): 2 rows of 4 pixels, one 2-pixel gap; 4 panels, 3 gaps
    assert picture.shape == (2 * 4 + 2, 4 * 4 + 3 * 2, 3)
    own, other = picture[0, 2 * 6], picture[0, 3 * 6]
    assert tuple(own) != tuple(other)  # jet(1.0) over the frame in column 3, jet(0.0) in column 4
    assert tuple(picture[1, 6 + 1]) == (255, 255, 255)  # the mask column: object pixel in white
    with pytest.raises(ValueError, match="same prompts"):
        control_figure(matched, mismatched[::-1])
