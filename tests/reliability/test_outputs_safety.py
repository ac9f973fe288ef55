"""Outputs never destroy what the user did not hand over, and distinct inputs get distinct outputs.

Every command that writes is run on real files (PyAV clips, prepared shards, a safetensors export,
`avsync synth` sets), in a subprocess of `avsync` for the headline cases and through `avsync.cli.main`
for their variants:

- an output path naming an input, or an existing file that is not the command's own earlier output,
  is refused in one line (exit 2) before any work, and the file is left as it was;
- an output folder path that is an existing file is refused before any work (not after the run);
- a command that replaces its own earlier outputs (`synth`, `prepare --overwrite`, `index build
  --overwrite`, `demo`) replaces only those;
- videos that share a file name (`d1/clip.mp4`, `d2/clip.mp4`) get one result each.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from avsync.api.outputs import is_embeddings_file
from avsync.cli import main as avsync_main
from avsync.synth import load_synth, synthesize

from .conftest import avsync_command, avsync_env

GROUP = "Hostile inputs"
#: A checkpoint path that does not exist: a tool that reports the output path instead checked it first.
MISSING_CKPT = "missing.ckpt"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        avsync_command(*args), cwd=cwd, env=avsync_env(), capture_output=True, text=True, timeout=600
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its digest: what must not change."""
    return {p.relative_to(folder).as_posix(): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(stderr: str, command: str) -> str:
    """The error line of a refused command, after checking it is the only thing printed about it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"avsync {command}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr[-3000:]
    return errors[0]


def in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`avsync ARGV` through `avsync.cli.main`: exit status and stderr."""
    capsys.readouterr()
    try:
        code = avsync_main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def shown(line: str, *folders: Path) -> str:
    """An error line as the table shows it: without the test's temporary folders."""
    for folder in folders:
        line = line.replace(f"{folder}/", "").replace(str(folder), "DIR")
    return f"`{line.split(': error: ', 1)[1]}`"


# ------------------------------------------------------------------------------------------ item 4: embed
def test_embed_never_writes_over_an_input_or_a_file_that_is_not_its_output(
    output_kit, tmp_path, capsys, reliability
):
    ckpt = str(output_kit["ckpt"])
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(output_kit["first"].read_bytes())
    b.write_bytes(output_kit["second"].read_bytes())
    before = digest(b)

    result = run("embed", "a.mp4", "b.mp4", "--ckpt", ckpt, "--out", "b.mp4", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result.stderr, "embed")
    assert "--out b.mp4: is one of the inputs" in line
    assert digest(b) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]
    reliability.record(
        GROUP,
        "`embed a.mp4 b.mp4 --out b.mp4`: the output names an input video",
        "avsync embed (subprocess)",
        f"refused before any work, exit 2: {shown(line)}; b.mp4 intact",
    )

    # inside a folder given as input, and other files that are not embed outputs: refused, intact
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes\n")
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, keys=np.array(["x"]), audio=np.zeros((1, 2, 3)), video=np.zeros((1, 2, 3)))
    for out, expected in [
        (a, "is one of the inputs"),
        (notes, "exists and is not an avsync embed output"),
        (theirs, "exists and is not an avsync embed output"),
        (tmp_path, "is one of the inputs"),
    ]:
        kept = tree(tmp_path)
        code, err = in_process(["embed", str(tmp_path), "--ckpt", MISSING_CKPT, "--out", str(out)], capsys)
        assert code == 2 and expected in one_line_error(err, "embed"), err
        assert tree(tmp_path) == kept
    reliability.record(
        GROUP,
        "`embed --out` names an existing file that is not an embed output (text, a foreign npz)",
        "avsync embed",
        "refused before the checkpoint is read, exit 2: "
        "`--out notes.txt: exists and is not an avsync embed output (...)`; the file intact",
    )

    # its own earlier output is replaced, and a file of the user's named like a temporary is not touched
    out = tmp_path / "out" / "emb.npz"
    out.parent.mkdir()
    user_partial = out.with_name("emb.npz.partial")
    user_partial.write_text("the user's file\n")
    args = ["embed", str(a), "--ckpt", ckpt, "--out", str(out), "--workers", "0", "--no-progress"]
    assert in_process(args, capsys)[0] == 0 and is_embeddings_file(out)
    first = digest(out)
    assert in_process([*args[:2], str(b), *args[2:]], capsys)[0] == 0  # another run over the same --out
    with np.load(out) as data:
        assert [Path(p).name for p in data["paths"]] == ["a.mp4", "b.mp4"]
    assert digest(out) != first and user_partial.read_text() == "the user's file\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.npz", "emb.npz.partial"]
    reliability.record(
        GROUP,
        "`embed --out` names its own earlier output",
        "avsync embed",
        "replaced (an npz with avsync's `metadata`, or a parquet with the `avsync` schema key)",
    )


def test_embed_shards_writes_only_into_a_folder_of_its_own(output_kit, tmp_path, capsys, reliability):
    shards, ckpt = output_kit["shards"], str(output_kit["ckpt"])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"dataset": "the user\'s"}\n')
    afile = tmp_path / "results.txt"
    afile.write_text("the user's results\n")
    kept = {**tree(shards), **tree(tmp_path)}
    cases = [
        (shards, "is the shard folder"),
        (theirs, "its manifest.json is not one of avsync embed --shards"),
        (afile, "exists and is not a folder"),
    ]
    for out, expected in cases:
        code, err = in_process(["embed", "--shards", str(shards), "--ckpt", ckpt, "--out", str(out)], capsys)
        assert code == 2 and expected in one_line_error(err, "embed"), err
    assert {**tree(shards), **tree(tmp_path)} == kept
    reliability.record(
        GROUP,
        "`embed --shards S --out` names the shard folder, a folder with another "
        "program's manifest.json, or a file",
        "avsync embed --shards",
        "refused before the checkpoint is read, exit 2 (`is the shard folder`, `its manifest.json "
        "is not one of avsync embed --shards`, `exists and is not a folder`); nothing changed",
    )


# ------------------------------------------------------------------------------------------ export
def test_export_replaces_only_an_earlier_export(output_kit, tmp_path, capsys, reliability):
    from safetensors.numpy import save_file

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(output_kit["ckpt"].read_bytes())
    theirs = tmp_path / "theirs.safetensors"
    save_file({"weight": np.zeros(3, np.float32)}, str(theirs), metadata={"format": "pt"})
    (tmp_path / "described.json").write_text('{"the user\'s": "notes"}\n')
    kept = tree(tmp_path)
    for argv, expected in [
        (["export", str(ckpt), str(ckpt)], "is one of the inputs"),
        (["export", MISSING_CKPT, str(theirs)], "exists and is not an avsync safetensors export"),
        (["export", "--random-init", "pretrain/tiny_cpu", str(theirs)], "not an avsync safetensors export"),
        (["export", str(ckpt), str(tmp_path / "described.safetensors"), "--json"],
         "described.json: exists and is not the JSON description of an avsync export"),
        (["export", str(ckpt), str(tmp_path)], "is a folder"),
    ]:  # fmt: skip
        code, err = in_process(argv, capsys)
        assert code == 2 and expected in one_line_error(err, "export"), err
        assert tree(tmp_path) == kept  # not even the .safetensors beside the refused .json is written
    own = tmp_path / "exported.safetensors"
    for _ in range(2):  # the second run replaces the first run's export and description
        assert in_process(["export", str(ckpt), str(own), "--json"], capsys)[0] == 0
    assert json.loads(own.with_suffix(".json").read_text())["avsync_backbone_config"]
    reliability.record(
        GROUP,
        "`export CKPT OUT` where OUT is the checkpoint itself, a foreign safetensors "
        "file or folder, or `--json` would replace another JSON file",
        "avsync export",
        "refused before the checkpoint is read, exit 2 (`is one of the inputs`, `exists and is "
        "not an avsync safetensors export`); an earlier export is replaced",
    )


# ------------------------------------------------------------------------------------------ item 5: synth
def test_synth_replaces_only_the_sets_own_files(tmp_path, capsys, reliability):
    small = dict(classes=2, duration=2.0, size=32, min_event=0.5, workers=0)
    out = tmp_path / "set"
    synthesize(out, clips=2, seed=0, **small)
    (out / "precious.txt").write_text("the user's notes\n")
    (out / "mywork").mkdir()
    (out / "mywork" / "draft.md").write_text("a draft\n")
    theirs = {
        "precious.txt": digest(out / "precious.txt"),
        "mywork/draft.md": digest(out / "mywork" / "draft.md"),
    }

    result = run(
        "synth", "set", "--clips", "3", "--classes", "2", "--seed", "1", "--duration", "2", "--size", "32",
        "--min-event", "0.5", "--workers", "0", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept what else was there, untouched: mywork, precious.txt" in result.stdout
    assert {name: digest(out / name) for name in theirs} == theirs
    replaced = load_synth(out)
    assert (replaced.config.seed, len(replaced.clips)) == (1, 3)
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"synth_s1_0000{i}.mp4" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging or retired folder left
    reliability.record(
        GROUP,
        "`synth DIR` over an earlier set plus the user's `precious.txt` and `mywork/`",
        "avsync synth (subprocess)",
        "the set's own files replaced, the user's kept untouched "
        "(and listed: `kept what else was there, untouched: mywork, precious.txt`)",
    )

    # a file of the user's inside the set's own folders would go with them: refused, nothing changes
    (out / "videos" / "mine.mp4").write_bytes(b"the user's video")
    kept = tree(out)
    code, err = in_process([
        "synth", str(out), "--clips", "2", "--classes", "2", "--seed", "2", "--duration", "2", "--size", "32",
        "--min-event", "0.5", "--workers", "0",
    ], capsys)  # fmt: skip
    assert code == 2 and "videos/mine.mp4" in one_line_error(err, "synth")
    assert tree(out) == kept and load_synth(out).config.seed == 1
    reliability.record(
        GROUP,
        "`synth DIR` where the set's `videos/` also holds a file of the user's",
        "avsync synth",
        f"refused before any work, exit 2: {shown(one_line_error(err, 'synth'), out)}; nothing changed",
    )


# ------------------------------------------------------------------------------ item 6: same names
def test_videos_that_share_a_name_get_one_result_each(output_kit, capsys, reliability):
    root, ckpt = output_kit["root"], str(output_kit["ckpt"])
    out = root / "seg"
    result = run(
        "segment", "d1/clip.mp4", "d2/clip.mp4", "--ckpt", ckpt, "--out", "seg", "--segments", "2", cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "segments.json").read_text())["videos"]
    assert sorted(entry["video"] for entry in report.values()) == ["d1/clip.mp4", "d2/clip.mp4"]
    figures = sorted(entry["figure"] for entry in report.values())
    assert len(set(figures)) == 2 and sorted(p.name for p in out.glob("*.png")) == figures
    assert len({digest(out / name) for name in figures}) == 2  # each its own clip's picture
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == list(report)  # both printed
    reliability.record(
        GROUP,
        "`segment d1/clip.mp4 d2/clip.mp4`: two videos with one file name",
        "avsync segment (subprocess)",
        f"one entry and one figure each: `{figures[0]}`, "
        f"`{figures[1]}` (the second name with a hash of its path)",
    )

    # the same pair through `embed` (keys) and `localize` (overlays): distinct too
    embedded = root / "pair.npz"
    pair = [str(root / "d1" / "clip.mp4"), str(root / "d2" / "clip.mp4")]
    code, err = in_process(["embed", *pair, "--ckpt", ckpt, "--out", str(embedded), "--workers", "0"], capsys)
    assert code == 0, err
    with np.load(embedded) as data:
        keys, paths = list(data["keys"]), [Path(p).parent.name for p in data["paths"]]
    assert len(set(keys)) == 2 and paths == ["d1", "d2"]
    located = root / "loc"
    code, err = in_process([
        "localize", "--ckpt", ckpt, "--manifest", str(output_kit["manifest"]), "--out", str(located),
        "--workers", "0", "--accelerator", "cpu",
    ], capsys)  # fmt: skip
    assert code == 0, err
    overlays = sorted(p.name for p in (located / "overlays").glob("*.png"))
    assert len(overlays) == 2 and json.loads((located / "metrics.json").read_text())["prompts"] == 2
    reliability.record(
        GROUP,
        "the same two videos through `embed` and a `localize` manifest",
        "avsync embed, avsync localize",
        f"distinct keys ({', '.join(f'`{k}`' for k in keys)}) and one overlay per manifest row",
    )


def test_video_names_differ_even_without_case():
    from avsync.tasks.segmentation import video_names

    videos = [Path("a/Clip.mp4"), Path("b/clip.mp4"), Path("c/clip.MP4"), Path("x.mp4")]
    names = video_names(videos)
    assert names[0] == "Clip" and names[1].startswith("clip-") and names[3] == "x"
    assert len({name.casefold() for name in names}) == 4  # distinct on a case-insensitive file system too
    assert video_names(videos) == names  # stable


# ------------------------------------------------------------------------------ item 15: OUT a file
@pytest.mark.parametrize(
    "command",
    [
        ["retrieve", "--ckpt", "{ckpt}", "--shards", "{shards}", "--workers", "0", "--out", "OUT"],
        ["localize", "--ckpt", "{ckpt}", "--manifest", "{manifest}", "--workers", "0", "--out", "OUT"],
        ["segment", "{first}", "--ckpt", "{ckpt}", "--out", "OUT"],
    ],
    ids=["retrieve", "localize", "segment"],
)
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(
    command, output_kit, tmp_path, capsys, reliability
):
    target = tmp_path / "results.txt"
    target.write_text("the user's results\n")
    argv = [str(output_kit[a[1:-1]]) if a.startswith("{") else a for a in command]
    argv = [str(target) if a == "OUT" else a for a in argv]

    result = run(*argv, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result.stderr, argv[0])
    assert f"--out {target}: exists and is not a folder" in line
    assert target.read_text() == "the user's results\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "results.txt"
    ]
    # before any work: even before the checkpoint is read
    code, err = in_process([MISSING_CKPT if a == str(output_kit["ckpt"]) else a for a in argv], capsys)
    assert code == 2 and "exists and is not a folder" in one_line_error(err, argv[0])
    reliability.record(
        GROUP,
        f"`{argv[0]} --out FILE`: the output folder is an existing file",
        f"avsync {argv[0]} (subprocess)",
        f"refused before the checkpoint is read, exit 2: {shown(line, tmp_path)}; the file intact",
    )


def test_every_other_output_folder_that_is_a_file_is_refused(output_kit, tmp_path, capsys, reliability):
    """The rest of the commands that write a folder, each given an existing file (in this process)."""
    target = tmp_path / "results.txt"
    target.write_text("the user's results\n")
    kit = {name: str(value) for name, value in output_kit.items()}
    commands = {
        "prepare": ["prepare", kit["root"] + "/d1", str(target)],
        "synth": ["synth", str(target), "--clips", "1", "--classes", "1"],
        "embed --shards": ["embed", "--shards", kit["shards"], "--ckpt", MISSING_CKPT, "--out", str(target)],
        "index build": ["index", "build", kit["embeddings"], "--out", str(target), "--kind", "exact"],
        "demo": ["demo", "--workdir", str(target)],
    }
    for argv in commands.values():
        code, err = in_process(argv, capsys)
        line = one_line_error(err, argv[0])
        assert code == 2 and ("not a folder" in line or "not a directory" in line or "is a file" in line), err
        assert target.read_text() == "the user's results\n"
    retrieval = {
        "model": {"class_path": "avsync.tasks.retrieval.RetrievalModule",
                  "init_args": {"backbone_checkpoint": kit["ckpt"], "output_dir": str(target)}},
        "data": {"class_path": "avsync.data.datamodule.AVShardDataModule",
                 "init_args": {"test_shards": kit["shards"]}},
    }  # fmt: skip
    code, err = in_process(["test", "--config", json.dumps(retrieval)], capsys)
    assert (
        code == 2
        and "output_dir" in one_line_error(err, "test")
        and target.read_text() == "the user's results\n"
    )
    reliability.record(
        GROUP,
        "an existing file as the output folder of `prepare`, `synth`, `embed --shards`, "
        "`index build`, `demo --workdir`, or a retrieval config's `output_dir` (`avsync test`)",
        ", ".join(f"avsync {name}" for name in commands) + ", avsync test",
        "refused before any work, exit 2, one line each; the file intact",
    )


# ------------------------------------------------------------------------------------------ own outputs only
def test_commands_that_replace_their_outputs_leave_other_programs_files(
    output_kit, tmp_path, capsys, reliability
):
    kit = {name: str(value) for name, value in output_kit.items()}
    theirs = '{"written by": "another program"}\n'
    folders = {name: tmp_path / name for name in ("prepare", "index", "retrieve", "demo")}
    for folder in folders.values():
        folder.mkdir()
    (folders["prepare"] / "manifest.json").write_text(theirs)
    (folders["index"] / "index.json").write_text(theirs)
    (folders["retrieve"] / "config.yaml").write_text("the user's: config\n")
    (folders["demo"] / "precious.txt").write_text("the user's notes\n")
    kept = tree(tmp_path)
    cases = {
        "prepare": (["prepare", kit["root"] + "/d1", str(folders["prepare"]), "--overwrite"],
                    "not a manifest of avsync prepare"),
        "index": (["index", "build", kit["embeddings"], "--out", str(folders["index"]), "--kind", "exact",
                   "--overwrite"],
                  "not an avsync index description"),
        "retrieve": (["retrieve", "--ckpt", MISSING_CKPT, "--shards", kit["shards"],
                      "--out", str(folders["retrieve"])],
                     "config.yaml: exists and is not the saved config of an avsync retrieval run"),
        "demo": (["demo", "--workdir", str(folders["demo"])],
                 "holds files that are not the demo's (precious.txt)"),
    }  # fmt: skip
    for argv, expected in cases.values():
        code, err = in_process(argv, capsys)
        assert code == 2 and expected in one_line_error(err, argv[0]), err
    assert tree(tmp_path) == kept
    reliability.record(
        GROUP,
        "`prepare --overwrite`, `index build --overwrite`, `retrieve --out` and `demo "
        "--workdir` on a folder holding another program's manifest.json / index.json / "
        "config.yaml, or the user's files",
        "avsync prepare, index build, retrieve, demo",
        "refused, exit 2, one line naming the file; nothing deleted or replaced",
    )
