"""Temporal segmentation of videos: per-frame features, clustering per feature kind, the Fig. 6 picture,
and `avsync segment` end to end on real synthetic mp4s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from avsync.cli import main as avsync_main
from avsync.data.transforms import AudioWindows, CenterFrame, frames_to_tensor
from avsync.model import CAVMAESync
from avsync.synth import load_synth, synthesize
from avsync.tasks import PretrainModule
from avsync.tasks.segmentation import (
    ClipFeatures,
    clip_features,
    plot_segmentation,
    read_annotation,
    read_segment_counts,
    score_segmentation,
    score_synth_segmentation,
    segment_clip,
    synth_segmentation_ari,
)
from tests.conftest import VIDEO_TEST_BACKBONE


def main(argv: list[str]) -> int:
    """`avsync segment ARGV`, as the command runs it."""
    return avsync_main(["segment", *argv])


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> Path:
    """Four 3-s clips of three classes with 2-3 events each, two of them in the test split."""
    out = tmp_path_factory.mktemp("segment") / "synth"
    synthesize(out, clips=4, classes=3, seed=1, duration=3.0, size=64, holdout=0.5, min_event=0.8, workers=1)
    return out


@pytest.fixture(scope="module")
def backbone() -> CAVMAESync:
    torch.manual_seed(0)
    return CAVMAESync(**VIDEO_TEST_BACKBONE).eval()


def oracle_features(truth: list[int], dim: int = 8, seed: int = 0) -> ClipFeatures:
    """Features that know the answer: one direction per class, a little noise, unit norm."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(max(truth) + 1, dim))

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return ClipFeatures(
        name="oracle",
        audio=unit(directions[truth] + 0.05 * rng.normal(size=(len(truth), dim))),
        video=unit(directions[truth] + 0.05 * rng.normal(size=(len(truth), dim))),
        frames=[np.full((24, 32, 3), 40 * (label + 1), np.uint8) for label in truth],
        fbank=rng.normal(size=(300, 128)).astype(np.float32),
        duration=3.0,
    )


def test_clip_features_are_the_unit_global_tokens_of_the_aligned_pairs(synth_set, backbone):
    manifest = load_synth(synth_set)
    video = manifest.video(manifest.clips[0].clip_id)
    features = clip_features(backbone, video)
    assert features.audio.shape == (16, 32) and features.video.shape == (16, 32)
    assert np.allclose(np.linalg.norm(features.audio, axis=1), 1, atol=1e-5)
    assert features.of("audio_visual").shape == (16, 64)
    assert len(features.frames) == 16 and features.duration == pytest.approx(3.0)
    # the same tokens as encoding the clip's frames and aligned windows directly
    frames = frames_to_tensor([CenterFrame(48)(Image.fromarray(frame)) for frame in features.frames])
    windows = AudioWindows(16, 64).windows(torch.from_numpy(features.fbank))
    expected = backbone.encode(windows[None], frames[None])
    assert np.allclose(
        features.audio, F.normalize(expected.global_audio[0], dim=-1).detach().numpy(), atol=1e-5
    )
    assert np.allclose(
        features.video, F.normalize(expected.global_video[0], dim=-1).detach().numpy(), atol=1e-5
    )
    with pytest.raises(ValueError, match="unknown feature kind"):
        features.of("text")


def test_each_feature_kind_is_segmented_and_scored_against_the_truth():
    truth = [2] * 5 + [0] * 6 + [2] * 5
    result = segment_clip(oracle_features(truth), num_segments=None, truth=truth)
    for kind in ("video", "audio_visual", "audio"):
        assert result.segments[kind] == [0] * 5 + [1] * 6 + [0] * 5  # two classes: K = 2, ids by appearance
        assert result.agreement[kind]["ari"] == pytest.approx(1.0)
        assert result.agreement[kind]["boundary_f1"] == 1.0
    five = segment_clip(oracle_features(truth), num_segments=5, truth=truth)
    assert len(set(five.segments["audio"])) == 5 and five.agreement["audio"]["ari"] < 1.0
    assert "agreement" not in segment_clip(oracle_features(truth), 5).to_json()
    with pytest.raises(ValueError, match="ground-truth labels"):
        segment_clip(oracle_features(truth), 3, truth=truth[:-1])


def test_the_figure_has_the_frame_strip_bars_and_spectrogram(tmp_path):
    truth = [0] * 8 + [1] * 8
    features = oracle_features(truth)
    result = segment_clip(features, 2, truth)
    path = plot_segmentation(features, result, tmp_path / "figure.png")
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape[1] == 1200 and pixels.shape[0] > 400
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # frames, four bars and a spectrogram, not a blank canvas


def test_annotations_are_read_from_a_folder_or_a_synthetic_set(synth_set, tmp_path):
    manifest = load_synth(synth_set)
    clip = manifest.clips[0].clip_id
    expected = manifest.annotation(clip)["frames"]["class_indices"]
    assert read_annotation(synth_set, clip) == expected
    assert read_annotation(synth_set / "annotations", clip) == expected
    (tmp_path / "mine.json").write_text(json.dumps({"labels": [1, 1, 2]}))
    assert read_annotation(tmp_path, "mine") == [1, 1, 2]
    assert read_annotation(tmp_path, "absent") is None


def test_synthetic_scoring_covers_the_split(synth_set, backbone):
    manifest = load_synth(synth_set)
    score = score_synth_segmentation(backbone, synth_set, "test")
    assert [clip.name for clip in score.clips] == manifest.splits["test"]
    for clip in score.clips:
        assert clip.truth == manifest.annotation(clip.name)["frames"]["class_indices"]
        assert len(set(clip.segments["audio"])) == len(set(clip.truth))
    ari = synth_segmentation_ari(backbone, synth_set, "test")
    assert ari == pytest.approx(np.mean([clip.agreement["audio_visual"]["ari"] for clip in score.clips]))
    assert -1 <= ari <= 1


def test_annotated_videos_take_the_path_of_synthetic_ones(synth_set, backbone, tmp_path):
    """`score_segmentation` on any videos with a folder of `<stem>.json` labels (the product's format,
    which `avsync synth` writes): the synthetic set's scores are exactly these; a video without labels
    is skipped with its reason."""
    manifest = load_synth(synth_set)
    videos = [(clip, manifest.video(clip)) for clip in manifest.splits["test"]]
    labels = tmp_path / "labels"
    labels.mkdir()
    for clip, _ in videos[:1]:  # the `{"labels": [...]}` form, for the first clip only
        truth = manifest.annotation(clip)["frames"]["class_indices"]
        (labels / f"{clip}.json").write_text(json.dumps({"labels": truth}))
    mine = score_segmentation(backbone, videos, labels)
    synthetic = score_synth_segmentation(backbone, synth_set, "test")
    assert [clip.to_json() for clip in mine.clips] == [synthetic.clips[0].to_json()]
    assert mine.skipped == [(videos[1][0], f"no annotation {videos[1][0]}.json in {labels}")]


def write_checkpoint(backbone: CAVMAESync, path: Path) -> Path:
    module = PretrainModule(backbone)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_cli_writes_figures_and_segments_and_skips_a_broken_video(synth_set, backbone, tmp_path, capsys):
    manifest = load_synth(synth_set)
    videos = [manifest.video(clip.clip_id) for clip in manifest.clips[:2]]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(videos[0].read_bytes()[:2000])  # truncated: no moov atom
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    out = tmp_path / "out"
    code = main([*map(str, [videos[0], broken, videos[1]]), "--ckpt", str(checkpoint), "--segments", "3",
                 "--out", str(out), "--annotations", str(synth_set), "--device", "cpu"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "segments.json").read_text())
    assert set(report["videos"]) == {video.stem for video in videos}
    for video in videos:
        entry = report["videos"][video.stem]
        assert (out / entry["figure"]).is_file()
        for kind in ("video", "audio_visual", "audio"):
            assert len(entry["segments"][kind]) == 16 and len(set(entry["segments"][kind])) == 3
            assert -1 <= entry["agreement"][kind]["ari"] <= 1
        assert entry["truth"] == manifest.annotation(video.stem)["frames"]["class_indices"]
    assert report["mean"]["audio_visual"]["ari"] == pytest.approx(
        np.mean([report["videos"][v.stem]["agreement"]["audio_visual"]["ari"] for v in videos])
    )
    assert [failure["source"] for failure in report["failures"]] == [str(broken)]
    assert "broken.mp4" in capsys.readouterr().err


def test_cli_without_any_readable_video_fails(tmp_path, backbone):
    (tmp_path / "empty.mp4").write_bytes(b"")
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    assert (
        main(
            [
                str(tmp_path / "empty.mp4"),
                "--ckpt",
                str(checkpoint),
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    report = json.loads((tmp_path / "o" / "segments.json").read_text())
    assert "empty file" in report["failures"][0]["reason"]


def test_without_a_count_each_kind_gets_the_silhouettes_choice():
    truth = [0] * 8 + [1] * 8  # two events: the paper's fixed 5 would cut them up
    chosen = segment_clip(oracle_features(truth), truth=truth)
    assert chosen.count_source == "silhouette"
    assert chosen.counts == {"video": 2, "audio_visual": 2, "audio": 2}
    assert chosen.agreement["audio_visual"]["ari"] == pytest.approx(1.0)
    fixed = segment_clip(oracle_features(truth), 5, truth=truth)
    assert fixed.count_source == "given" and fixed.counts["audio"] == 5
    assert fixed.agreement["audio_visual"]["ari"] < 0.8
    assert segment_clip(oracle_features(truth), None, truth=truth).count_source == "truth"
    assert chosen.to_json()["counts"] == chosen.counts


def test_segment_counts_are_read_from_a_csv(tmp_path):
    good = tmp_path / "counts.csv"
    good.write_text("clip,segments\na.mp4,3\nb,2\n")
    assert read_segment_counts(good) == {"a": 3, "b": 2}
    for name, text in {"columns.csv": "video,k\na,3\n", "zero.csv": "clip,segments\na,0\n"}.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            read_segment_counts(tmp_path / name)


def test_cli_takes_counts_from_annotations_or_chooses_and_says_which(synth_set, backbone, tmp_path, capsys):
    manifest = load_synth(synth_set)
    videos = [manifest.video(clip.clip_id) for clip in manifest.clips[:2]]
    checkpoint = write_checkpoint(backbone, tmp_path / "model.ckpt")
    common = ["--ckpt", str(checkpoint), "--device", "cpu"]
    assert main([*map(str, videos), *common, "--out", str(tmp_path / "auto")]) == 0
    auto = json.loads((tmp_path / "auto" / "segments.json").read_text())
    for video in videos:
        entry = auto["videos"][video.stem]
        assert entry["count_source"] == "silhouette" and "agreement" not in entry
        assert len(set(entry["segments"]["audio"])) == entry["counts"]["audio"] >= 2
    assert "(silhouette)" in capsys.readouterr().out

    assert (
        main([*map(str, videos), *common, "--out", str(tmp_path / "truth"), "--annotations", str(synth_set)])
        == 0
    )
    truth = json.loads((tmp_path / "truth" / "segments.json").read_text())
    for video in videos:
        entry = truth["videos"][video.stem]
        true_count = len(set(manifest.annotation(video.stem)["frames"]["class_indices"]))
        assert entry["count_source"] == "truth" and set(entry["counts"].values()) == {true_count}

    table = tmp_path / "counts.csv"
    table.write_text(f"clip,segments\n{videos[0].name},4\n{videos[1].stem},1\n")
    assert (
        main([*map(str, videos), *common, "--out", str(tmp_path / "csv"), "--annotations", str(table)]) == 0
    )
    counted = json.loads((tmp_path / "csv" / "segments.json").read_text())["videos"]
    assert counted[videos[0].stem]["counts"]["audio"] == 4 and counted[videos[1].stem]["counts"]["audio"] == 1
    assert {entry["count_source"] for entry in counted.values()} == {"annotations"}

    table.write_text("clip\nx\n")
    assert main([str(videos[0]), *common, "--out", str(tmp_path / "bad"), "--annotations", str(table)]) == 2
    assert "counts.csv" in capsys.readouterr().err
