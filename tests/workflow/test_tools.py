"""The tools' one command layer (`avsync.tools`): each option is a field of the tool's dataclass, the
command line is built from it, and the function that runs the tool receives the dataclass."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

import pytest

from avsync import tools
from avsync.tools import TOOLS, matching, parse

#: Each tool's required arguments, to parse a command line of defaults.
MINIMAL = {
    tools.Prepare: ["in", "out"],
    tools.Synth: ["out", "--clips", "2", "--classes", "2"],
    tools.Retrieve: ["--ckpt", "c", "--shards", "s"],
    tools.Localize: ["--ckpt", "c", "--synth", "s", "--out", "o"],
    tools.Segment: ["v.mp4", "--ckpt", "c", "--out", "o"],
    tools.Embed: ["--ckpt", "c", "--out", "o"],
    tools.Export: ["c", "o.safetensors"],
    tools.IndexBuild: ["build", "e.npz", "--out", "o"],
    tools.IndexSearch: ["search", "i", "--clip", "a"],
    tools.Config: [],
    tools.App: ["--ckpt", "c"],
    tools.Demo: [],
}
CLASSES = [
    (name, tool)
    for name, (spec, _) in TOOLS.items()
    for tool in (spec.values() if isinstance(spec, dict) else [spec])
]


@pytest.mark.parametrize("name, tool", CLASSES, ids=[tool.__name__ for _, tool in CLASSES])
def test_each_option_is_declared_once_and_reaches_the_tool(name, tool):
    # the function that runs the tool takes its dataclass
    module, function = tool.RUN.split(":")
    run = getattr(importlib.import_module(module), function)
    (parameter,) = inspect.signature(run).parameters.values()
    assert typing.get_type_hints(run)[parameter.name] is tool
    # every field has help in the docstring, and is on the command line under its name
    helps = tools._described(tool)[1]
    options = [f for f in dataclasses.fields(tool) if f.name != tool.REST]
    assert {f.name for f in options} <= set(helps), f"{tool.__name__}: fields without help"
    # a command line of the required arguments gives the dataclass's own defaults
    parsed = parse(name, MINIMAL[tool])
    assert type(parsed) is tool
    given = set(MINIMAL[tool])
    for item in options:
        if item.metadata.get("positional") or "--" + item.name.replace("_", "-") in given:
            continue
        if item.default is not dataclasses.MISSING:
            assert getattr(parsed, item.name) == item.default, item.name
        elif item.default_factory is not dataclasses.MISSING:
            assert getattr(parsed, item.name) == item.default_factory(), item.name


def test_flags_keep_their_documented_spelling():
    options = parse("localize", ["--ckpt", "c", "--manifest", "m.csv", "--out", "o", "--workers", "0"])
    assert options.num_workers == 0 and options.manifest == "m.csv" and options.synth is None
    options = parse(
        "prepare", ["a", "b", "out", "--keep-order", "--no-progress", "--shard-max-bytes", "1MiB"]
    )
    assert (options.inputs, options.output) == (["a", "b"], "out")
    assert options.keep_order and options.no_progress and options.shard_max_bytes == 2**20
    options = parse("synth", ["out", "--clips", "3", "--classes", "2", "--events", "1", "3"])
    assert options.events == [1, 3] and str(options.out) == "out"
    options = parse("retrieve", ["--ckpt", "c", "--shards", "s", "--strategies", "block_max"])
    assert options.strategies == ["block_max"] and options.authors_kwargs == {}
    options = parse("export", ["c", "o.safetensors", "--authors-kwargs", '{"num_heads": 12}'])
    assert options.authors_kwargs == {"num_heads": 12}


def test_the_demo_passes_options_it_does_not_know_to_the_pretraining_run():
    options = parse("demo", ["--clips", "40", "--trainer.max_epochs", "1"])
    assert options.clips == 40 and options.fit_args == ["--trainer.max_epochs", "1"]


def test_matching_takes_the_named_parameters_and_the_given_values():
    def target(shards, out=None, *, batch_size=8, **authors_kwargs):
        return shards, out, batch_size, authors_kwargs

    options = parse(
        "retrieve", ["--ckpt", "c", "--shards", "s", "--batch-size", "3", "--authors-kwargs", "{}"]
    )
    arguments = matching(options, target, out="elsewhere")
    # no `authors_kwargs=` keyword: it would land inside `**authors_kwargs`
    assert arguments == {"shards": "s", "out": "elsewhere", "batch_size": 3}


def test_the_start_up_benchmark_times_every_help_and_renders_its_table(tmp_path):
    from benchmarks.cli_help import COMMANDS, help_times
    from benchmarks.report import render

    result = help_times(rounds=1, before=str(tmp_path))  # no tree there: the current code alone
    medians = result["median_s"]["current"]
    assert list(result["median_s"]) == ["current"] and len(medians) == len(COMMANDS)
    assert all(0 < seconds < 30 for seconds in medians.values())
    text = render({"results": {"cli_help": result}})
    assert "## 3g. Command start-up (issue 22 item 2)" in text and "| `avsync index search --help` |" in text
