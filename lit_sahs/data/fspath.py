"""Store locations given as URLs (``file://``, ``memory://``, ``s3://``, ``gs://``, ...), read through fsspec.

An ActivationStore is a directory tree of small files (manifest, per-block index, checksums,
extras, zarr chunks). Reading one needs only "list a directory" and "read a file", which every
fsspec filesystem has, so a store opened from a URL reads by the same code as a local one:
`FsPath` offers the few ``pathlib.Path`` operations the readers use, and each block's zarr array
is opened through zarr's ``FsspecStore``. Writing needs an atomic directory rename (the block
commit), which object stores do not have, so stores are *written* to local paths only (a
``file://`` URL is turned into one); extract locally and copy the store directory to the bucket.

Credentials and other filesystem options come from fsspec's usual configuration (environment,
``~/.config/fsspec``) or `storage_options`.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from lit_sahs.errors import LitSahsError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def is_url(path) -> bool:
    return isinstance(path, FsPath) or (isinstance(path, str) and bool(_URL.match(path)))


def local_path(path) -> Optional[Path]:
    """A local Path for a plain path or a ``file://`` URL; None for any other URL."""
    if isinstance(path, FsPath):
        return None
    if isinstance(path, str) and _URL.match(path):
        if path.startswith("file://"):
            import fsspec

            return Path(fsspec.filesystem("file")._strip_protocol(path))
        return None
    return Path(path)


class FsPath:
    """A file or directory on an fsspec filesystem, with the ``pathlib.Path`` subset store readers use."""

    def __init__(self, fs, path: str, protocol: str, storage_options: Optional[dict] = None, _isdir=None):
        self.fs, self._path, self.protocol = fs, path.rstrip("/") or "/", protocol
        self.storage_options = storage_options or {}
        self._isdir = _isdir  # known from a listing, saves a round trip on object stores

    @classmethod
    def from_url(cls, url: str, storage_options: Optional[dict] = None) -> "FsPath":
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise LitSahsError(f"cannot open store URL {url!r}: {e} (the filesystem's fsspec package may be "
                               "missing, e.g. s3fs for s3://, gcsfs for gs://)") from e
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return cls(fs, path, protocol, storage_options)

    # ------------------------------------------------------------ pathlib-like
    def __truediv__(self, part: str) -> "FsPath":
        return FsPath(self.fs, f"{self._path.rstrip('/')}/{part}", self.protocol, self.storage_options)

    def __str__(self) -> str:
        return f"{self.protocol}://{self._path.lstrip('/')}" if self.protocol != "file" else f"file://{self._path}"

    def __repr__(self) -> str:
        return f"FsPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FsPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self._path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "FsPath":
        head = self._path.rstrip("/").rsplit("/", 1)[0] or "/"
        return FsPath(self.fs, head, self.protocol, self.storage_options)

    @property
    def url(self) -> str:
        return str(self)

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self._path)
        except FileNotFoundError:
            raise
        except IsADirectoryError as e:
            raise FileNotFoundError(str(self)) from e

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def exists(self) -> bool:
        return self.fs.exists(self._path)

    def is_file(self) -> bool:
        return self.fs.isfile(self._path)

    def is_dir(self) -> bool:
        return self._isdir if self._isdir is not None else self.fs.isdir(self._path)

    def iterdir(self) -> Iterator["FsPath"]:
        try:
            entries = self.fs.ls(self._path, detail=True)
        except FileNotFoundError:
            return iter(())
        out = []
        for e in entries:
            p = e["name"].rstrip("/")
            if p == self._path.rstrip("/"):
                continue
            out.append(FsPath(self.fs, p, self.protocol, self.storage_options, _isdir=e.get("type") == "directory"))
        return iter(out)

    def glob(self, pattern: str) -> Iterator["FsPath"]:
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def zarr_store(self):
        """This directory as a read-only zarr store."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(str(self), storage_options=self.storage_options or None, read_only=True)


def store_location(path) -> "Path | FsPath":
    """Where a store lives: a local Path (plain paths, ``file://`` URLs when written) or an FsPath."""
    if isinstance(path, (FsPath, Path)):
        return path
    if isinstance(path, os.PathLike):
        return Path(path)
    return FsPath.from_url(path) if is_url(path) else Path(path)
