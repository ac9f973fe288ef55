"""Issue 22 item 2: the start-up of `avsync --help` and of every tool's `--help`, before the redesign
(argparse parsers spelled out in `tool_parsers.py`) against now (parsers built from each tool's options
dataclass in `avsync.tools`), in one run.

Each command is a fresh `python -m avsync.cli ... --help` process with `PYTHONPATH` naming one source
tree (the code before issue 22: commit 7368bef, extracted with `git archive`), its
bytecode compiled once into a private cache, as an installed package has it; the trees alternate for
every command and round so that drifting load slows both alike; medians. Each run also checks that the
help was printed and that torch was not imported.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import source_tree
from benchmarks.prepare_resolutions import BEFORE_SRC, CURRENT_SRC

#: `avsync` and each tool, as `--help` is asked of them.
COMMANDS = (
    (),
    ("prepare",),
    ("synth",),
    ("retrieve",),
    ("localize",),
    ("segment",),
    ("embed",),
    ("export",),
    ("index",),
    ("index", "search"),
    ("demo",),
    ("config",),
    ("app",),
)
_PROBE = """
import runpy, sys
sys.argv = ["avsync", *sys.argv[1:]]
try:
    runpy.run_module("avsync.cli", run_name="__main__")
except SystemExit as stop:
    code = stop.code
assert "torch" not in sys.modules, "torch imported"
sys.exit(code)
"""


def help_times(rounds: int = 7, before: str = BEFORE_SRC) -> dict:
    """Median wall seconds of each `avsync ... --help`, per source tree (module docstring)."""
    trees = {"current": CURRENT_SRC}
    before_src = source_tree(before)
    if before_src is not None:
        trees = {"before": str(before_src), **trees}
    with tempfile.TemporaryDirectory(prefix="avsync-cli-help-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        times: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
        for round_ in range(rounds + 1):  # round 0 compiles the bytecode; not counted
            for command in COMMANDS:
                for tree, source in trees.items():
                    argv = [sys.executable, "-c", _PROBE, *command, "--help"]
                    started = time.perf_counter()
                    done = subprocess.run(
                        argv, cwd=cache, capture_output=True, text=True, env={**env, "PYTHONPATH": source}
                    )
                    elapsed = time.perf_counter() - started
                    if done.returncode != 0 or "usage: avsync" not in done.stdout:
                        what = " ".join(["avsync", *command, "--help"])
                        raise RuntimeError(f"{tree}: {what}: {done.stderr[-1000:]}")
                    if round_:
                        times[tree].setdefault(" ".join(["avsync", *command, "--help"]), []).append(elapsed)
    medians = {tree: {name: statistics.median(t) for name, t in runs.items()} for tree, runs in times.items()}
    return {"rounds": rounds, "trees": trees, "median_s": medians}
