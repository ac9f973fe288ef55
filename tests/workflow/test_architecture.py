"""The package's structure (docs/architecture.md): the import contracts of pyproject.toml hold (the layers,
no circle, a model free of kernel and checkpoint code, nothing from `benchmarks/`), they catch what they
are there to catch, and the wheel holds the product and no benchmark code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import read_configuration

from tests.conftest import REPO_ROOT


def lint_imports() -> str | None:
    """The `lint-imports` of this environment (import-linter, a dev dependency), or None."""
    beside = Path(sys.executable).with_name("lint-imports")
    return str(beside) if beside.is_file() else shutil.which("lint-imports")


needs_import_linter = pytest.mark.skipif(
    lint_imports() is None, reason="import-linter is not installed: pip install -e '.[dev]'"
)


def run_contracts(package_root: Path | None = None) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contracts, on `package_root/avsync` (default: the checkout's)."""
    env = dict(os.environ)
    if package_root is not None:  # found before the editable install's path entry
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    command = [lint_imports(), "--no-cache", str(REPO_ROOT / "pyproject.toml")]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@needs_import_linter
def test_the_import_contracts_hold():
    result = run_contracts()
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


@needs_import_linter
def test_the_contracts_catch_upward_imports_circles_and_what_the_wheel_must_not_import(tmp_path):
    """On a copy of the package with four planted imports, each is named: data reaching up to tasks (and
    so a circle), the product importing the synthetic generator, the model importing kernel choices, the
    wheel importing the benchmarks (which it does not hold)."""
    shutil.copytree(
        REPO_ROOT / "src" / "avsync", tmp_path / "avsync", ignore=shutil.ignore_patterns("__pycache__")
    )
    planted = {
        "data/labels.py": "import avsync.tasks.localization_data\n",
        "tasks/segmentation.py": "import avsync.synth\n",
        "model/masking.py": "import avsync.kernels\n",
        "search/index.py": "from benchmarks import suite\n",
    }
    for name, line in planted.items():
        path = tmp_path / "avsync" / name
        path.write_text(path.read_text() + line)
    result = run_contracts(tmp_path)
    assert result.returncode == 1
    report = result.stdout
    assert "avsync.data.labels -> avsync.tasks.localization_data" in report
    assert "avsync.tasks.segmentation -> avsync.synth" in report
    assert "avsync.model.masking -> avsync.kernels" in report
    assert "avsync.search.index -> benchmarks" in report
    assert "No cycles are allowed in avsync." in report


def test_the_wheel_holds_the_product_and_no_benchmark_code():
    """setuptools' own package discovery, as `pip wheel` runs it from pyproject.toml (building the wheel
    itself takes 15 s): `avsync` and its subpackages only, none of them benchmark code."""
    packages = read_configuration(REPO_ROOT / "pyproject.toml")["tool"]["setuptools"]["packages"]
    assert "avsync" in packages and "avsync.synth" in packages and "avsync.tasks" in packages
    assert all(name == "avsync" or name.startswith("avsync.") for name in packages), packages
    assert not [name for name in packages if "bench" in name], packages
    assert (REPO_ROOT / "benchmarks" / "__main__.py").is_file()  # where `make bench` runs them
