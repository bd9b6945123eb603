"""The up-front output check every command that writes runs before any work: a run must never end,
after its training or scoring, in an unwritable report."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Mapping, Optional

from lit_sahs.errors import LitSahsError
from lit_sahs.io import TMP_PREFIX

PathLike = Optional["str | os.PathLike"]


def check_outputs(files: Optional[Mapping[str, PathLike]] = None,
                  dirs: Optional[Mapping[str, PathLike]] = None) -> None:
    """Refuse an output (option name -> path; None: not asked for) that cannot be written: a file
    output that is a directory or another non-file, a directory output that is a file, a path under
    a file, one path given for two outputs, or a location where nothing can be created (probed with
    a hidden temporary file or folder, removed at once). URLs are left to the code that opens them."""
    seen: dict[str, str] = {}
    wanted = [(flag, path, False) for flag, path in (files or {}).items()]
    wanted += [(flag, path, True) for flag, path in (dirs or {}).items()]
    for flag, path, is_dir in wanted:
        if path is None or "://" in str(path):
            continue
        p = Path(path).expanduser()
        where = f"{flag} {path}"
        if not str(path).strip():
            raise LitSahsError(f"{flag} is empty: give a {'directory' if is_dir else 'file'} path")
        if is_dir:
            if p.exists() and not p.is_dir():
                raise LitSahsError(f"{where} is a file, not a directory: give a directory path")
        else:
            if p.is_dir():
                raise LitSahsError(f"{where} is a directory: give a file path, e.g. {Path(path) / 'out'}")
            if p.exists() and not p.is_file():
                raise LitSahsError(f"{where} exists and is not a regular file: give a file path")
        key = os.path.abspath(p)
        if key in seen:
            raise LitSahsError(f"{seen[key]} and {flag} name the same {'folder' if is_dir else 'file'} {path}: "
                               "give two paths")
        seen[key] = flag
        _probe(p if is_dir else p.parent, where)


def _probe(folder: Path, where: str) -> None:
    """Can a file be created in `folder` (or, when it is missing, can it be created)?"""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LitSahsError(f"{where}: {existing} is a file, so the folder {folder} cannot be created")
    probe = existing / f"{TMP_PREFIX}{uuid.uuid4().hex}-probe"
    try:
        if existing == folder:
            with open(probe, "xb"):
                pass
            probe.unlink()
        else:
            probe.mkdir()
            probe.rmdir()
    except OSError as e:
        raise LitSahsError(f"{where} cannot be written ({e.strerror or e} in {existing}): "
                           "choose a writable location") from None
