"""The training recipes shipped inside the package (`avsync/configs/<task>/<name>.yaml`).

They are package data, so an installed `avsync` (a wheel, no repository) still has them; the
repository's top-level `configs/` is a link to the same folder, the one copy. A recipe is named by
its path without the suffix (`pretrain/tiny_cpu`), or by its file name alone (`audioset2m_vitb`)
when only one task has it. `avsync fit --config NAME` and `avsync config NAME` resolve names here.
"""

from __future__ import annotations

import sys
from importlib.resources import as_file, files
from pathlib import Path

from avsync.tools import Config

SUFFIXES = (".yaml", ".yml")


def recipe_root() -> Path:
    """The folder of the shipped recipes (in the installed package, or `src/avsync/configs` when
    the package is installed in editable mode)."""
    with as_file(files("avsync") / "configs") as root:  # a real folder for wheels and editable installs
        return Path(root)


def recipes() -> dict[str, Path]:
    """Recipe name (`task/name`) -> its file, sorted by name."""
    root = recipe_root()
    found = {
        path.relative_to(root).with_suffix("").as_posix(): path
        for path in root.rglob("*")
        if path.suffix in SUFFIXES and path.is_file()
    }
    return dict(sorted(found.items()))


def find_recipe(name: str) -> Path:
    """The file of recipe `name` (`pretrain/tiny_cpu`, `pretrain/tiny_cpu.yaml` or a unique
    `tiny_cpu`); a `ValueError` naming the choices when there is none or more than one."""
    known = recipes()
    stem = name[: -len(suffix)] if (suffix := next((s for s in SUFFIXES if name.endswith(s)), "")) else name
    stem = stem.removeprefix("configs/")
    if stem in known:
        return known[stem]
    matches = [key for key in known if key.rsplit("/", 1)[-1] == stem]
    if len(matches) == 1:
        return known[matches[0]]
    if matches:
        raise ValueError(f"recipe {name!r} is ambiguous: say one of {', '.join(matches)}")
    raise ValueError(f"no config file or recipe named {name!r}; recipes: {', '.join(known)}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """`argv` with every `--config VALUE` that is not an existing file but names a recipe replaced by
    the recipe's path, so that `avsync fit --config pretrain/tiny_cpu` works from any folder."""
    resolved = list(argv)
    try:
        for index, argument in enumerate(resolved):
            if argument == "--config" and index + 1 < len(resolved):
                resolved[index + 1] = _resolve(resolved[index + 1])
            elif argument.startswith("--config="):
                resolved[index] = "--config=" + _resolve(argument.removeprefix("--config="))
    except ValueError as error:  # a usage error: one line, no traceback
        print(f"avsync: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return resolved


def _resolve(value: str) -> str:
    # inline first: a JSON config longer than a file name makes `Path.exists` raise ENAMETOOLONG
    if value.lstrip().startswith(("{", "[")) or "\n" in value or Path(value).exists():
        return value  # a config given inline, or a file
    return str(find_recipe(value))


def run_config(options: Config) -> int:
    """`avsync config NAME` prints a recipe; `avsync config --list` names them all."""
    if options.list or options.name is None:
        for name in recipes():
            print(name)
        return 0
    try:
        path = find_recipe(options.name)
    except ValueError as error:
        print(f"avsync config: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(path.read_text())
    return 0
