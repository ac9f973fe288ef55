"""avsync as a user installs it: a wheel built from the sources, installed into a fresh virtual
environment (not editable), run from a folder outside the repository.

Installing torch and the other dependencies again would take minutes, so the fresh environment gets
only the wheel, and a `.pth` line lets it import the third-party packages of the project's `.venv`
(appended after its own site-packages, so `avsync` itself can only come from the wheel). The wheel's
declared requirements are then checked against those packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from avsync.recipes import recipes

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(command: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the sources, install it into a fresh venv; its paths."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)], root)
    (wheel,) = (root / "dist").glob("avsync-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    python = venv / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], root)
    fresh_site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
        ).stdout.strip()
    )
    (fresh_site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = root / "elsewhere"
    outside.mkdir()
    return {
        "wheel": wheel,
        "python": python,
        "avsync": venv / "bin" / "avsync",
        "site": fresh_site,
        "cwd": outside,
    }


def test_wheel_ships_every_recipe_and_declares_bounded_timm_without_rich(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    shipped = {n.removeprefix("avsync/configs/").removesuffix(".yaml") for n in names if "/configs/" in n}
    assert shipped == set(recipes()) and "pretrain/tiny_cpu" in shipped
    requirements = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    assert not any(r.startswith("rich") for r in requirements)
    assert any(r.replace(" ", "").startswith("timm") and "<2" in r for r in requirements)


def test_installed_avsync_is_the_wheel_and_its_requirements_are_met(installed):
    script = (
        "import importlib.metadata as md, avsync\n"
        "from packaging.requirements import Requirement\n"
        "print(avsync.__file__)\n"
        "for text in md.requires('avsync'):\n"
        "    r = Requirement(text)\n"
        "    if r.marker is None or r.marker.evaluate({'extra': ''}):\n"
        "        assert r.specifier.contains(md.version(r.name), prereleases=True), text\n"
    )
    result = run([str(installed["python"]), "-c", script], installed["cwd"])
    assert Path(result.stdout.strip()).is_relative_to(installed["site"])


def test_config_command_prints_and_lists_recipes_outside_the_repository(installed):
    listed = run([str(installed["avsync"]), "config", "--list"], installed["cwd"]).stdout.split()
    assert listed == list(recipes())
    printed = run([str(installed["avsync"]), "config", "pretrain/tiny_cpu"], installed["cwd"]).stdout
    assert printed == (REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml").read_text()
    assert yaml.safe_load(printed)["model"]["class_path"] == "avsync.tasks.PretrainModule"


def test_fit_resolves_a_recipe_name_and_demo_runs_outside_the_repository(installed):
    cwd = installed["cwd"]
    config = run(
        [str(installed["avsync"]), "fit", "--config", "pretrain/tiny_cpu", "--print_config"], cwd
    ).stdout
    assert yaml.safe_load(config)["model"]["init_args"]["backbone"]["init_args"]["embed_dim"] == 128
    help_text = run([str(installed["avsync"]), "demo", "--help"], cwd).stdout
    assert "pretrain/tiny_cpu" in help_text
