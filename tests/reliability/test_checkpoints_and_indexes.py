"""Checkpoints, indexes and the paths they record: a damaged or foreign file is a one-line error naming
it (exit 2), never a traceback, a silently substituted model or NaN results.

- `index.json` that cannot serve a search (`avsync index search`), and the embed outputs `index build`
  reads;
- the model behind a gallery, recorded by absolute path and weights digest: a query model with another
  digest is refused, from whatever folder the search runs;
- export metadata nested thousands deep (`avsync.load`, every tool, `avsync test`);
- weights holding NaN in every format and loader, and NaN tokens at `avsync index build`;
- a bad `backbone_checkpoint` in `avsync test --config configs/{retrieval,localization,probe}/...`.

Runs are real: the `avsync` entry point in this process (`avsync.cli.main`), `avsync embed` outputs of
the real clips in ../shared/data/videos, FAISS indexes, Lightning checkpoints and Lightning runs.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import avsync
from avsync.checkpoints import CheckpointError, load_backbone, save_backbone
from avsync.cli import main as avsync_main
from avsync.model import CAVMAESync
from avsync.tasks.probe.features import fingerprint
from tests.api.conftest import AUTHORS_KWARGS, REFERENCE, SMALL, shrink_authors_state
from tests.api.test_embed_shards import write_shards
from tests.conftest import shared_path

from .conftest import REPO_ROOT, SMALL_BACKBONE, fit_config
from .test_checkpoint_safety import Payload, one_line_error, tool_runs

pytestmark = pytest.mark.usefixtures("one_thread")


def search(*argv) -> int:
    return avsync_main(["index", "search", *map(str, argv)])


def search_json(capsys, *argv) -> dict:
    assert search(*argv, "--json") == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def refused(capsys, command: str, argv: list[str]) -> str:
    """Run `avsync COMMAND ...` (a tool) and return its one error line; fails unless it exits 2."""
    assert avsync_main([command, *argv]) == 2
    return one_line_error(capsys.readouterr().err, command)


def refused_run(capsys, argv: list[str]) -> str:
    """The same for a LightningCLI subcommand (`avsync test ...`), which exits through SystemExit."""
    with pytest.raises(SystemExit) as exit_:
        avsync_main(argv)
    assert exit_.value.code == 2
    return one_line_error(capsys.readouterr().err, argv[0])


# ------------------------------------------------------------------------------ 8. a damaged index.json
def _edit(change):
    def rewrite(text: str) -> str:
        facts = json.loads(text)
        change(facts)
        return json.dumps(facts)

    return rewrite


INDEX_CASES = [
    ("no `kind`", _edit(lambda f: f.pop("kind")), "has no `kind`"),
    ('`steps` "abc"', _edit(lambda f: f.update(steps="abc")), "`steps` is 'abc', not a positive integer"),
    (
        "a JSON list",
        lambda text: json.dumps([json.loads(text)]),
        "holds a JSON list, not an index description",
    ),
    ("no `files`", _edit(lambda f: f.pop("files")), "has no `files`"),
    ('`kind` "hnsw"', _edit(lambda f: f.update(kind="hnsw")), "`kind` is 'hnsw', not one of"),
    ("`num_clips` -3", _edit(lambda f: f.update(num_clips=-3)), "`num_clips` is -3, not a positive integer"),
    (
        '`modalities` "video"',
        _edit(lambda f: f.update(modalities="video")),
        "`modalities` is 'video', not a list",
    ),
    ("`files` without the searched modality", _edit(lambda f: f["files"].pop("audio")), "`files` is"),
    ("`model` a list", _edit(lambda f: f.update(model=[1])), "`model` is a list, not a mapping"),
    (
        "`model.checkpoint` a number",
        _edit(lambda f: f["model"].update(checkpoint=5)),
        "`model.checkpoint` is 5, not a valid value",
    ),
    (
        "`source.files` entries without a path",
        _edit(lambda f: f["source"].update(files=[{"bytes": 1}])),
        "`source.files` is not a list of {path, bytes} entries",
    ),
    ("JSON nested 100,000 deep", lambda text: "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
]


@pytest.mark.parametrize("case, rewrite, expected", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_a_damaged_index_json_is_one_line_naming_it(
    case, rewrite, expected, clip_index, real_clips, tmp_path, capsys, reliability
):
    index = tmp_path / "index"
    shutil.copytree(clip_index, index)
    facts = index / "index.json"
    facts.write_text(rewrite(facts.read_text()))
    line = refused(capsys, "index", ["search", str(index), "--clip", real_clips[0].stem])
    assert str(facts) in line and expected in line, line
    reliability.record(
        "Hostile inputs",
        f"an `index.json` with {case}",
        "avsync index search",
        f"exit 2, one line naming the file: `{expected}`",
    )


def _embed_output(folder: Path, manifest: str | None, metadata: str | None = None) -> Path:
    """An `avsync embed` output of 3 clips: a `--shards` directory with `manifest` as its manifest.json
    text, or (`manifest` None) an npz whose `metadata` is the given JSON text."""
    rng = np.random.default_rng(0)
    arrays = {
        "keys": np.array(["a", "b", "c"]),
        "audio": rng.normal(size=(3, 4, 8)).astype(np.float32),
        "video": rng.normal(size=(3, 4, 8)).astype(np.float32),
    }
    if manifest is None:
        np.savez(folder / "clips.npz", **arrays, metadata=np.array(metadata))
        return folder / "clips.npz"
    (folder / "embedded").mkdir()
    np.savez(folder / "embedded" / "embeddings-rank0-00000.npz", **arrays)
    (folder / "embedded" / "manifest.json").write_text(manifest)
    return folder / "embedded"


PART = [{"name": "embeddings-rank0-00000.npz", "clips": 3}]
GALLERY_CASES = [
    (
        "an embed manifest.json nested 100,000 deep",
        "[" * 100_000 + "]" * 100_000,
        None,
        "manifest.json: unreadable embed manifest (JSON nested too deeply)",
    ),
    (
        "an embed manifest.json whose `settings` is a list",
        json.dumps({"parts": PART, "settings": [1]}),
        None,
        "manifest.json: unreadable embed manifest (its `settings` is not a mapping)",
    ),
    (
        "an embed npz whose metadata records the checkpoint as a number",
        None,
        json.dumps({"checkpoint": 5}),
        "clips.npz (its embedding metadata): `model.checkpoint` is 5, not a valid value",
    ),
]


@pytest.mark.parametrize(
    "case, manifest, metadata, expected", GALLERY_CASES, ids=[c[0] for c in GALLERY_CASES]
)
def test_index_build_refuses_a_damaged_embed_output_in_one_line(
    case, manifest, metadata, expected, tmp_path, capsys, reliability
):
    source = _embed_output(tmp_path, manifest, metadata)
    line = refused(
        capsys, "index", ["build", str(source), "--out", str(tmp_path / "index"), "--kind", "exact"]
    )
    assert expected in line, line
    assert not (tmp_path / "index" / "index.json").exists()
    reliability.record("Hostile inputs", case, "avsync index build", f"exit 2, one line: `{expected}`")


def test_an_npz_gallery_whose_metadata_is_not_an_object_is_indexed_without_model_facts(tmp_path, capsys):
    source = _embed_output(tmp_path, None, json.dumps(["checkpoint", "alignment"]))
    assert (
        avsync_main(["index", "build", str(source), "--out", str(tmp_path / "index"), "--kind", "exact"]) == 0
    )
    assert json.loads((tmp_path / "index" / "index.json").read_text())["model"] == {}


# ------------------------------------------------------------------------------ 9. the gallery's model
def _two_models(root: Path) -> tuple[Path, Path]:
    """Two folders, each with a different model under the same name `model.safetensors`."""
    paths = []
    for seed, name in enumerate(("first", "second")):
        (root / name).mkdir()
        torch.manual_seed(seed)
        paths.append(save_backbone(CAVMAESync(**SMALL).eval(), root / name / "model.safetensors"))
    return paths[0], paths[1]


def test_the_gallery_model_is_recorded_by_absolute_path_and_digest_and_another_model_is_refused(
    real_clips,
    tmp_path,
    monkeypatch,
    capsys,
    reliability,
):
    model, other = _two_models(tmp_path)
    monkeypatch.chdir(model.parent)  # the embed and the build run where the model is, naming it relatively
    embed = ["model.safetensors", "--out", "clips.npz", "--device", "cpu", "--workers", "0", "--no-progress"]
    assert avsync_main(["embed", *map(str, real_clips), "--ckpt", *embed]) == 0
    metadata = json.loads(str(np.load(model.parent / "clips.npz")["metadata"]))
    digest = fingerprint(load_backbone(model))
    assert metadata["checkpoint"] == str(model.resolve()) and metadata["weights_digest"] == digest
    assert avsync_main(["index", "build", "clips.npz", "--out", "index", "--kind", "exact", "--quiet"]) == 0
    index = model.parent / "index"
    recorded = json.loads((index / "index.json").read_text())["model"]
    assert recorded["checkpoint"] == str(model.resolve()) and recorded["weights_digest"] == digest

    monkeypatch.chdir(other.parent)  # another model answers to `model.safetensors` here
    clip = real_clips[0]
    by_id = search_json(capsys, index, "--clip", clip.stem, "--modality", "video")
    by_file = search_json(capsys, index, "--video", clip, "--modality", "video")
    assert [r["clip"] for r in by_file["results"]] == [r["clip"] for r in by_id["results"]]
    np.testing.assert_allclose(
        [r["score"] for r in by_file["results"]], [r["score"] for r in by_id["results"]], atol=1e-5
    )  # the query was embedded by the gallery's model, not by the one in this folder

    line = refused(
        capsys, "index", ["search", str(index), "--video", str(clip), "--ckpt", "model.safetensors"]
    )
    assert "model.safetensors: not the model the gallery of" in line and digest[:16] in line, line
    shutil.copy(model, other.parent / "copy.safetensors")  # the same weights elsewhere: accepted
    search_json(capsys, index, "--video", clip, "--ckpt", "copy.safetensors")

    facts = json.loads((index / "index.json").read_text())  # as an index written before this fix
    facts["model"]["checkpoint"] = "model.safetensors"
    del facts["model"]["weights_digest"]
    (index / "index.json").write_text(json.dumps(facts))
    line = refused(capsys, "index", ["search", str(index), "--video", str(clip)])
    assert "records the checkpoint as 'model.safetensors', relative to" in line, line
    reliability.record(
        "Hostile inputs",
        "`avsync index search --video` run from another folder holding another model under the relative "
        "name `avsync embed --ckpt` was given; `--ckpt` naming a model with other weights",
        "avsync embed, avsync index build, avsync index search (in two folders)",
        "embed outputs and index.json record the absolute path and the weights digest: the query is "
        "embedded by the gallery's model (scores equal the stored clip's); another model is refused in "
        "one line (exit 2); an older index with a relative path asks for --ckpt",
    )


def test_an_embed_shards_manifest_records_the_model_by_absolute_path_and_digest(tmp_path, monkeypatch):
    model, _ = _two_models(tmp_path)
    write_shards(tmp_path / "shards", [3])
    monkeypatch.chdir(model.parent)
    argv = ["--shards", str(tmp_path / "shards"), "--ckpt", "model.safetensors", "--out", "embedded"]
    argv += ["--device", "cpu", "--workers", "0", "--num-frames", "4", "--no-progress"]
    assert avsync_main(["embed", *argv]) == 0
    manifest = json.loads((model.parent / "embedded" / "manifest.json").read_text())
    digest = fingerprint(load_backbone(model))
    assert manifest["checkpoint"] == str(model.resolve()) and manifest["weights_digest"] == digest
    assert avsync_main(["index", "build", "embedded", "--out", "index", "--kind", "exact", "--quiet"]) == 0
    assert (
        json.loads((model.parent / "index" / "index.json").read_text())["model"]["weights_digest"] == digest
    )


# ------------------------------------------------------------------------------ 10. deeply nested metadata
def _weights() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in CAVMAESync(**SMALL_BACKBONE).state_dict().items()}


def test_export_metadata_nested_thousands_deep_is_a_checkpoint_error_everywhere(
    tool_inputs, tmp_path, capsys, reliability
):
    path = tmp_path / "nested.safetensors"
    nested = "[" * 100_000 + "]" * 100_000  # 200 KB
    save_file(_weights(), str(path), metadata={"avsync_backbone_config": nested, "format_version": "1"})
    expected = "the backbone config in its metadata is nested too deeply to be a config"
    with pytest.raises(CheckpointError, match=f"{path.name}: {expected}"):
        avsync.load(path, device="cpu")
    for tool, argv in tool_runs(path, tool_inputs, tmp_path).items():
        line = refused(capsys, tool, argv[1:])
        assert str(path) in line and expected in line, line
    line = refused_run(capsys, retrieval_test(path, tool_inputs["shards"], tmp_path))
    assert str(path) in line and expected in line, line
    reliability.record(
        "Hostile inputs",
        "a safetensors export whose config metadata is JSON nested 100,000 deep (200 KB)",
        "avsync.load, avsync export / embed / retrieve / localize / segment, avsync test --config retrieval",
        f"CheckpointError naming the file: `{expected}`; exit 2 and one line, no RecursionError",
    )


def test_an_export_destination_whose_header_is_nested_thousands_deep_is_kept_in_one_line(
    tmp_path, capsys, reliability
):
    model = save_backbone(CAVMAESync(**SMALL_BACKBONE), tmp_path / "model.safetensors")
    out = tmp_path / "out.safetensors"  # an existing file `avsync export` must recognise (or not) first
    header = ("[" * 100_000 + "]" * 100_000).encode()
    out.write_bytes(struct.pack("<Q", len(header)) + header)
    line = refused(capsys, "export", [str(model), str(out)])
    assert str(out) in line and "is not an avsync safetensors export" in line, line
    assert out.read_bytes()[8:] == header  # left as it was
    reliability.record(
        "Hostile inputs",
        "an existing `avsync export` destination whose safetensors header is JSON nested 100,000 deep",
        "avsync export",
        "exit 2, one line: not an export, so not replaced (no RecursionError)",
    )


def retrieval_test(checkpoint: Path, shards: Path, out: Path) -> list[str]:
    return [
        "test", "--config", str(REPO_ROOT / "configs" / "retrieval" / "tiny_cpu.yaml"),
        f"--model.init_args.backbone_checkpoint={checkpoint}",
        f"--model.init_args.output_dir={out / 'retrieval'}",
        f"--data.init_args.test_shards={shards}", f"--trainer.default_root_dir={out}",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ 11. NaN weights, NaN tokens
def _with_nan(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    return state


def test_an_export_with_nan_weights_is_refused_before_any_tool_runs(
    tool_inputs, tmp_path, capsys, reliability
):
    model = CAVMAESync(**SMALL_BACKBONE)
    path = tmp_path / "nan.safetensors"
    metadata = {"avsync_backbone_config": json.dumps(model.config), "format_version": "1"}
    save_file(_with_nan(_weights(), "joint.norm.weight"), str(path), metadata=metadata)
    expected = "weights hold NaN or infinite values (joint.norm.weight)"
    with pytest.raises(CheckpointError, match=f"{path.name}: {expected.replace('(', '.').replace(')', '.')}"):
        avsync.load(path, device="cpu")
    for tool, argv in tool_runs(path, tool_inputs, tmp_path).items():
        line = refused(capsys, tool, argv[1:])
        assert str(path) in line and expected in line, line
    assert not (tmp_path / "e.npz").exists()  # embed wrote nothing
    reliability.record(
        "Hostile inputs",
        "a safetensors export with a NaN weight",
        "avsync.load, avsync export / embed / retrieve / localize / segment",
        f"refused at load in one line naming the file and tensor (`{expected}`), exit 2: no NaN "
        "embeddings written, no evaluation run",
    )


def test_nan_weights_are_refused_by_every_loader(tmp_path, prepared_shards, capsys, reliability):
    backbone = CAVMAESync(**SMALL_BACKBONE)
    lightning = tmp_path / "nan.ckpt"  # a Lightning checkpoint of a task (backbone under `backbone.`)
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    content = {"state_dict": _with_nan(weights, "backbone.joint.norm.weight")}
    hyper_parameters = {"backbone_config": backbone.config}
    torch.save(
        {**content, "hyper_parameters": hyper_parameters, "pytorch-lightning_version": L.__version__},
        lightning,
    )
    with pytest.raises(CheckpointError, match="nan.ckpt: weights hold NaN"):
        load_backbone(lightning)

    authors = shrink_authors_state(torch.load(shared_path(*REFERENCE), weights_only=True)["state_dict"])
    good, bad = tmp_path / "authors.pth", tmp_path / "authors_nan.pth"
    torch.save(authors, good)
    torch.save(_with_nan(authors, "blocks_u.0.attn.qkv.weight"), bad)
    load_backbone(good, **AUTHORS_KWARGS)  # the same file without the NaN loads
    with pytest.raises(
        CheckpointError, match=r"authors_nan.pth: weights hold NaN .*blocks_u.0.attn.qkv.weight"
    ):
        load_backbone(bad, **AUTHORS_KWARGS)
    line = refused(
        capsys,
        "export",
        [str(bad), str(tmp_path / "x.safetensors"), "--authors-kwargs", json.dumps(AUTHORS_KWARGS)],
    )
    assert "authors_nan.pth: weights hold NaN" in line

    mae = tmp_path / "mae_nan.pth"  # an ImageNet MAE for `init_from`
    torch.save({"model": {"blocks.0.norm1.weight": torch.full((32,), float("nan"))}}, mae)
    config = fit_config(tmp_path / "fit.yaml", prepared_shards, tmp_path / "runs")
    line = refused_run(capsys, ["fit", "--config", str(config), f"--model.init_args.init_from={mae}"])
    assert f"{mae}: weights hold NaN" in line, line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    validate = ["validate", "--config", str(config), "--ckpt_path", str(lightning)]
    line = refused_run(capsys, [*validate, f"--data.init_args.val_shards={prepared_shards}"])
    assert f"{lightning}: weights hold NaN" in line, line  # `--ckpt_path`, read by AtomicCheckpointIO
    reliability.record(
        "Hostile inputs",
        "a NaN weight in a Lightning `.ckpt`, the authors' `.pth` and an ImageNet MAE for `init_from`",
        "load_backbone (every tool, avsync.load), avsync export, avsync fit --model.init_args.init_from, "
        "avsync validate --ckpt_path",
        "CheckpointError naming the file and the tensors; exit 2 and one line, before any step",
    )


@pytest.mark.parametrize("kind, clips", [("exact", 6), ("compressed", 1000)])
def test_index_build_refuses_nan_tokens_naming_the_clips(kind, clips, tmp_path, capsys, reliability):
    rng = np.random.default_rng(0)
    audio, video = rng.normal(size=(2, clips, 4, 8)).astype(np.float32)
    video[3, 2, 5] = np.nan
    keys = np.array([f"clip{i:04d}" for i in range(clips)])
    gallery = tmp_path / "gallery.npz"
    np.savez(gallery, keys=keys, audio=audio, video=video)
    argv = ["build", str(gallery), "--out", str(tmp_path / "index"), "--kind", kind, "--quiet"]
    line = refused(
        capsys, "index", argv + (["--pca-dim", "16", "--base-dim", "8"] if kind == "compressed" else [])
    )
    assert (
        f"{gallery}: video tokens: 1 clip(s) have NaN/inf or all-zero tokens (clips ['clip0003'])" in line
    ), line
    assert not (tmp_path / "index" / "index.json").exists()
    reliability.record(
        "Hostile inputs",
        f"a gallery with a NaN token, {kind} index ({clips} clips)",
        "avsync index build",
        "exit 2, one line naming the file and the clip ids; no index written",
    )


# ------------------------------------------------------------------------------ 12. backbone_checkpoint
def _lightning_file(path: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    state = {f"backbone.{k}": v for k, v in weights.items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone_config": config}}, path)
    return path


def bad_backbone_files(folder: Path) -> list[tuple[str, Path, str]]:
    """(case, file, expected message) for files that cannot serve as a `backbone_checkpoint`."""
    small = CAVMAESync(**SMALL_BACKBONE)
    whole = _lightning_file(folder / "whole.ckpt", small.config, small.state_dict())
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    payload = folder / "payload.ckpt"
    torch.save({"state_dict": {}, "extra": Payload(folder / "payload_ran")}, payload)
    wide = CAVMAESync(**{**SMALL_BACKBONE, "embed_dim": 64})
    return [
        ("a truncated checkpoint", truncated, "not a readable PyTorch checkpoint"),
        ("a missing file", folder / "absent.ckpt", "no such checkpoint file"),
        ("a pickle with a code payload", payload, "refused to load"),
        (
            "a config declaring 10^6 encoder blocks",
            _lightning_file(
                folder / "deep.ckpt", {**small.config, "encoder_depth": 10**6}, small.state_dict()
            ),
            "declares more blocks than the file has tensors",
        ),
        (
            "weights of the wrong shapes",
            _lightning_file(folder / "shapes.ckpt", small.config, wide.state_dict()),
            "weights do not fit the backbone",
        ),
    ]


CONFIGS = ("retrieval/tiny_cpu.yaml", "localization/synth_tiny.yaml", "probe/tiny_cpu.yaml")


@pytest.mark.parametrize("config", CONFIGS)
def test_a_bad_backbone_checkpoint_in_avsync_test_is_one_line_and_exit_2(
    config, tmp_path, monkeypatch, capsys, reliability
):
    monkeypatch.chdir(tmp_path)  # the configs' relative output folders land here, if anywhere
    cases = bad_backbone_files(tmp_path)
    for case, path, expected in cases:
        argv = [
            "test",
            "--config",
            str(REPO_ROOT / "configs" / config),
            f"--model.init_args.backbone_checkpoint={path}",
        ]
        line = refused_run(capsys, argv)
        assert str(path) in line and expected in line, (case, line)
    assert not (tmp_path / "payload_ran").exists() and not (tmp_path / "results").exists()
    reliability.record(
        "Hostile inputs",
        f"a `backbone_checkpoint` that cannot serve ({', '.join(c[0] for c in cases)})",
        f"avsync test --config configs/{config}",
        "exit 2, one line naming the file (as `avsync retrieve` gives); the payload never runs",
    )
