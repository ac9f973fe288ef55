"""Hostile inputs through the real entry points: each ends with a clear error, or is skipped with its
reason while the rest of the work is kept.

- videos: `avsync prepare` (subprocess) on a folder mixing good clips with bad ones;
- memory: peak RSS of `avsync prepare` on a 3-hour and on a 4K video, against a 3-s clip;
- shards: `AVShardDataModule` reading prepared shards that were cut short or tampered with;
- configs and checkpoints: `avsync fit` (in this process, through `avsync.cli.main`) and `load_backbone`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

from avsync.checkpoints import CheckpointError, load_backbone
from avsync.cli import main as avsync_main
from avsync.data.datamodule import AVShardDataModule
from avsync.data.fbank import log_mel_fbank
from avsync.data.schema import decode_npy, encode_npy

from .conftest import TINY_CONFIG, avsync_command, avsync_env, fit_config, shard_keys
from .hostile_media import tone, write_media

THREE_HOURS = [600.0 * k for k in range(19)]  # a video stream lasting 3 h, 19 frames 10 min apart


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_videos")
    write_media(folder / "good.mp4")
    write_media(folder / "eight_channels.mp4", channels=8, sample_rate=48000)
    write_media(folder / "uhd.mp4", size=(3840, 2160), fps=8, duration=2.5)  # 20 frames: 16 distinct sampled
    write_media(folder / "three_hours.mp4", frame_times=THREE_HOURS, channels=0)
    write_media(folder / "unknown_label.mp4")
    broken = tone(3.0, 16000, 1)
    broken[0, 1000:1010], broken[0, 5000] = np.nan, np.inf
    write_media(
        folder / "nan_audio.mkv", channels=1, sample_rate=16000, audio_codec="pcm_f32le", audio=broken
    )
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("minutes of the meeting, not a video\n" * 40)
    return folder


def prepared_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((directory / "manifest.json").read_text())["shards"]:
        with tarfile.open(directory / shard["name"]) as archive:
            for member in archive.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    return samples


def test_prepare_skips_each_bad_video_with_its_reason_and_keeps_the_rest(videos, tmp_path, reliability):
    classes = tmp_path / "classes.csv"
    classes.write_text("index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,Cat\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("clip_id,labels\ngood,Dog\neight_channels,Cat\nuhd,Dog\nunknown_label,Unicorn\n")
    out = tmp_path / "shards"
    result = subprocess.run(
        avsync_command(
            "prepare", str(videos), str(out), "--labels", str(labels), "--classes", str(classes),
            "--workers", "1", "--no-progress",
        ),
        env=avsync_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 clip(s) in 1 shard(s)" in result.stderr and "5 input(s) skipped" in result.stderr
    reasons = {Path(f["path"]).name: f["reason"] for f in map(json.loads, (out / "failures.jsonl").open())}
    expected = {
        "empty.mp4": "empty file (0 bytes)",
        "notes.mp4": "not a readable media container (not audio/video, or truncated)",
        "nan_audio.mkv": "audio stream decodes to 11 NaN or infinite sample(s)",
        "three_hours.mp4": "too long: 10800.100 s (maximum 60 s; cut long videos into clips or raise "
        "--max-duration)",
        "unknown_label.mp4": "label 'Unicorn' is not in",
    }
    assert sorted(reasons) == sorted(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])

    samples = prepared_samples(out)
    assert sorted(samples) == ["eight_channels", "good", "uhd"]
    eight = json.loads(samples["eight_channels"]["json"])
    assert (eight["channels"], eight["sample_rate"], eight["label_names"]) == (8, 48000, ["Cat"])
    # All eight channels are mixed down (each has its own amplitude), as an independent decode says
    # (packed samples, float64 mean; PyAV crashes converting 8-channel planar frames to arrays).
    with av.open(str(videos / "eight_channels.mp4")) as container:
        resampler = av.AudioResampler(format="flt", rate=16000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    channels = np.concatenate([f.to_ndarray().reshape(-1, 8) for f in frames])
    reference = log_mel_fbank(channels.mean(axis=1, dtype=np.float64)).numpy()
    stored = decode_npy(samples["eight_channels"]["fbank.npy"]).astype(np.float32)
    np.testing.assert_allclose(stored, reference, atol=0.02, rtol=0)  # float16 storage
    first_two = log_mel_fbank(channels[:, :2].mean(axis=1)).numpy()
    assert np.abs(stored - first_two).max() > 0.5  # a mixdown of fewer channels would be far off
    uhd = json.loads(samples["uhd"]["json"])
    assert (uhd["width"], uhd["height"], uhd["frame_height"]) == (3840, 2160, 224)

    for name in expected:
        reason = reasons[name].replace(f"{tmp_path}/", "")  # the table must not change from run to run
        reliability.record("Hostile inputs", _describe(name), "avsync prepare", f"skipped: `{reason}`")
    reliability.record(
        "Hostile inputs",
        "8 audio channels at 48 kHz (AAC 7.1)",
        "avsync prepare",
        "prepared: channels averaged to mono (as an independent PyAV decode + Kaldi fbank), resampled to "
        "16 kHz; metadata records 8 channels, 48000 Hz",
    )
    reliability.record(
        "Hostile inputs",
        "a 4K video (3840x2160)",
        "avsync prepare",
        "prepared: frames shrunk to a 224-pixel short side as they are decoded",
    )
    reliability.record(
        "Hostile inputs",
        "bad inputs among good ones",
        "avsync prepare, one run over all the videos above",
        "the 3 usable clips are in the shards, each skipped input is in failures.jsonl with its reason; "
        "exit status 0",
    )


def _describe(name: str) -> str:
    return {
        "empty.mp4": "a 0-byte video",
        "notes.mp4": "a text file named .mp4",
        "nan_audio.mkv": "NaN and inf in the audio samples (float PCM), which would make the fbank NaN",
        "three_hours.mp4": "a 3-hour video",
        "unknown_label.mp4": "a label missing from the class list",
    }[name]


#: `avsync ARGS`, then the peak resident memory of this process since its exec (VmHWM) on stderr.
PEAK_RSS = (
    "import sys; from avsync.cli import main; code = main(sys.argv[1:]); "
    "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr); "
    "sys.exit(code)"
)


def peak_rss_of_prepare(video: Path, out: Path) -> subprocess.Popen:
    listing = out.with_suffix(".list")
    listing.write_text(f"{video}\n")
    command = [
        sys.executable,
        "-c",
        PEAK_RSS,
        "prepare",
        str(listing),
        str(out),
        "--workers",
        "1",
        "--no-progress",
    ]
    return subprocess.Popen(
        command, env=avsync_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_memory_stays_bounded_on_a_three_hour_and_a_4k_video(videos, tmp_path, reliability):
    runs = {
        name: peak_rss_of_prepare(videos / name, tmp_path / name) for name in ("good.mp4", "three_hours.mp4")
    }
    runs["uhd.mp4"] = peak_rss_of_prepare(videos / "uhd.mp4", tmp_path / "uhd.mp4")
    peak = {}
    for name, process in runs.items():
        stderr = process.communicate(timeout=300)[1]
        assert process.returncode == (1 if name == "three_hours.mp4" else 0), stderr[-2000:]
        peak[name] = int(stderr.rsplit("VmHWM:", 1)[1].split()[0]) / 1024  # MiB
    print(f"peak RSS of avsync prepare (MiB): {peak}")
    assert peak["three_hours.mp4"] <= peak["good.mp4"] + 25
    assert peak["uhd.mp4"] <= peak["good.mp4"] + 250  # keeping its 16 frames at full size would add 380
    reliability.record(
        "Hostile inputs",
        "a 3-hour video: memory",
        "avsync prepare, peak RSS (VmHWM) against a 3-s clip",
        "refused from the container header before anything is decoded: peak RSS within 25 MiB of a "
        "3-s clip's",
    )
    reliability.record(
        "Hostile inputs",
        "a 4K video: memory",
        "avsync prepare, peak RSS (VmHWM) against a 3-s 64x48 clip",
        "prepared one full-size frame at a time: peak RSS within 250 MiB of the small clip's (its 16 "
        "sampled frames held at full size would take 380 MiB)",
    )


def rewrite_shard(shard: Path, change) -> None:
    """Rewrite a tar shard member by member through `change(name, data) -> (name, data)`."""
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(shard, "w") as archive:
        for member, data in members:
            member.name, data = change(member.name, data)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_hostile_shards_are_skipped_with_their_reason_and_the_rest_is_read(
    prepared_shards, tmp_path, caplog, reliability
):
    shards = tmp_path / "shards"
    shutil.copytree(prepared_shards, shards)
    keys = shard_keys(shards)
    # shard 0: one sample's members renamed "../<name>"; shard 1: NaN in one fbank, inf in the other;
    # shard 2: cut in the middle of its second sample.
    outside = sorted(keys["shard-000000.tar"])[0]
    rewrite_shard(shards / "shard-000000.tar", lambda n, d: (f"../{n}" if n.startswith(outside) else n, d))

    def poison(name: str, data: bytes) -> tuple[str, bytes]:
        if not name.endswith(".fbank.npy"):
            return name, data
        fbank = decode_npy(data).copy()
        fbank[3, 3] = np.nan if "poisoned" not in seen else np.inf
        seen.add("poisoned")
        return name, encode_npy(fbank)

    seen: set[str] = set()
    rewrite_shard(shards / "shard-000001.tar", poison)
    cut = shards / "shard-000002.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.75)])
    lost = {*keys["shard-000001.tar"], outside}
    with tarfile.open(prepared_shards / "shard-000002.tar") as archive:
        first_in_cut = json.loads(
            archive.extractfile(next(m for m in archive if m.name.endswith(".json"))).read()
        )["id"]
    intact = set().union(*keys.values()) - lost - (keys["shard-000002.tar"] - {first_in_cut})

    module = AVShardDataModule(
        train_shards=str(shards), val_shards=str(shards), batch_size=1, eval_batch_size=2, num_workers=0,
        image_size=32, audio_length=64,
    )  # fmt: skip
    module.setup("fit")
    with caplog.at_level(logging.WARNING, logger="avsync.data.skips"):
        evaluated = {key for batch in module.val_dataloader() for key in batch["key"]}
        trained = {key for batch in module.train_dataloader() for key in batch["key"]}
    assert evaluated == trained == intact
    messages = [r.getMessage() for r in caplog.records]
    reasons = {
        "outside": f"sample '../{outside}' of {shards / 'shard-000000.tar'}: ValueError: member names point "
        "outside the shard (absolute or '..'): refused",
        "truncated": f"ReadError: unexpected end of data @ <_io.BufferedReader name='{cut}'>",
    }
    for reason in reasons.values():
        assert sum(reason in m for m in messages) == 2, (reason, messages)  # once per pass (val, train)
    nan = "ValueError: spectrogram holds 1 NaN or infinite value(s)"
    assert sum(nan in m for m in messages) == 4  # the NaN and the inf sample, in both passes
    assert not (tmp_path / outside).exists() and not any(tmp_path.glob(f"{outside}*"))  # nothing extracted
    assert module.skipped_samples["val"] == module.skipped_samples["train"] >= 4

    count = len(set().union(*keys.values()))
    kept = f"the other {len(intact)} of {count} clips are read, in evaluation and in training"
    reliability.record(
        "Hostile inputs",
        "a tar shard truncated mid-stream",
        "AVShardDataModule over prepared shards",
        "the rest of that shard is skipped and counted (data/skipped_*), logged as `ReadError: unexpected "
        f"end of data` naming the shard; {kept}",
    )
    reliability.record(
        "Hostile inputs",
        "a tar member named with `../`",
        "AVShardDataModule over prepared shards",
        "the sample is skipped, logged as `member names point outside the shard (absolute or '..'): "
        f"refused`; nothing is extracted (members are read in memory); {kept}",
    )
    reliability.record(
        "Hostile inputs",
        "NaN or inf in a shard's fbank",
        "AVShardDataModule over prepared shards",
        f"the sample is skipped, logged as `spectrogram holds 1 NaN or infinite value(s)`; {kept}",
    )


def write_config(path: Path, change) -> Path:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "case, change, expected",
    [
        (
            "a config with an unknown key",
            lambda c: c["model"]["init_args"].update(learning_rate=0.1),
            "Option 'learning_rate' is not accepted",
        ),
        (
            "a config with a wrong type",
            lambda c: c["data"]["init_args"].update(batch_size="sixty-four"),
            "Expected a <class 'int'>. Got value: sixty-four",
        ),
        (
            "a config with a misspelt trainer option",
            lambda c: c["trainer"].update(max_epoch=3),
            "Subcommand 'fit' does not accept option 'trainer.max_epoch'",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_the_option(case, change, expected, tmp_path, capsys, reliability):
    config = write_config(tmp_path / "bad.yaml", change)
    with pytest.raises(SystemExit) as exit_:
        avsync_main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err
    reliability.record(
        "Hostile inputs", case, "avsync fit --config", f"refused before anything runs (exit 2): `{expected}`"
    )


class Payload:
    """Unpickling this runs `os.mkdir(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_with_a_code_payload_is_refused_without_running_it(
    prepared_shards, tmp_path, capsys, reliability
):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"backbone.x": torch.zeros(1)}, "hyper_parameters": {}, "extra": Payload(marker)}, evil
    )
    with pytest.raises(
        CheckpointError, match="refused to load: the file holds objects that need code execution"
    ):
        load_backbone(evil)
    assert not marker.exists()

    config = fit_config(
        tmp_path / "fit.yaml",
        prepared_shards,
        tmp_path / "runs",
        data={"resampled": True, "epoch_length": 16},
    )
    with pytest.raises(SystemExit) as exit_:
        avsync_main(["fit", "--config", str(config), "--ckpt_path", str(evil)])
    assert exit_.value.code == 2
    assert "evil.ckpt: refused to load" in capsys.readouterr().err
    assert not marker.exists()
    reliability.record(
        "Hostile inputs",
        "a checkpoint with a code payload (pickle `__reduce__`)",
        "load_backbone (used by every tool), avsync fit --ckpt_path",
        "refused, the payload never runs: CheckpointError `refused to load: the file holds objects that need "
        "code execution to unpickle`; fit: the same error in one line (exit 2)",
    )
