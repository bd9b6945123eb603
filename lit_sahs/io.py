"""Atomic writes: the one place that writes a file or a directory so that a reader (or a killed
run) never sees half of it. Everything is written under a temporary name in the destination's
own folder (same filesystem, so the final rename is atomic) and renamed into place."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

TMP_PREFIX = ".tmp-"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of `path` (hidden, recognisable by TMP_PREFIX)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False, fsync: bool = True) -> bool:
    """Write `data` to `path` atomically; returns True when written.

    exclusive=True creates `path` only if it is absent (a hard link is atomic create-if-absent,
    so concurrent writers cannot clobber each other) and returns False when it already exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    atomic_write_bytes(path, text.encode("utf-8"), exclusive=exclusive)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, exclusive: bool = False, **dump_kwargs: Any) -> bool:
    """JSON with a trailing newline; see atomic_write_bytes for `exclusive`."""
    dump_kwargs.setdefault("indent", 1)
    return atomic_write_bytes(path, (json.dumps(obj, **dump_kwargs) + "\n").encode("utf-8"), exclusive=exclusive)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write with any library (savefig, copyfileobj…); on success it is
    renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(dest: str | os.PathLike, build: Callable[[Path], None], replace: bool = False,
               marker: Optional[str] = None) -> Path:
    """Run build(tmp_dir) and rename the result to `dest`. An existing `dest` is kept as it is
    unless `replace` (then it is swapped out and removed only after the new one is in place).
    `marker`: a file written last inside the directory, for readers that check completeness."""
    dest = Path(dest)
    if dest.exists() and not replace:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{TMP_PREFIX}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        if marker:
            (tmp / marker).write_text(json.dumps({"complete": True}))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.exists():  # another process published the same directory first: keep it
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
