"""ActivationStore: the on-disk cache of per-head activations at the first-token position.

Why zarr (v3) and not hand-written shard files
----------------------------------------------
The cache is an N-d array problem: for N samples we keep fp16 activations shaped
``[N, layers, heads, head_dim]`` and almost every consumer reads a *few heads for all rows*
(locate streams every head once; detectors read only their HeadSet). zarr gives us, for free
and tested by others:

* chunking along layers and heads, so reading one head reads only that head's bytes
  (each block stores chunks of shape ``(n, 1, 1, head_dim)``: one chunk per (layer, head));
* a documented, language-neutral format (``zarr.json`` + chunk files) that numpy, xarray,
  dask or a notebook can open without lit_sahs;
* storage abstraction (``zarr.storage.LocalStore``, ``FsspecStore`` for object stores);
* compression and per-array attributes.

What zarr does *not* give is an atomic multi-chunk commit or safe concurrent appends to one
array, so the store is a directory of immutable *blocks*, one per writer flush, each its own
small zarr array, committed by an atomic rename (``blocks.py``). The manifest that says what
the activations were extracted with is ``manifest.py``; the store's image copies are
``store_images.py``.

Layout
------
::

    <store>/
      manifest.json                 format_version, lit_sahs version, target fingerprint,
                                    geometry, dtype, position rule, prompt format, created
      blocks/
        b000001-r0000-<uuid12>/     one committed block (immutable)
          zarr.json                 zarr v3 array [n, L, H, D] float16, chunks (n, 1, 1, D)
          c/<0>/<l>/<h>/0           one chunk file per (layer, head)
          index.jsonl               the block's n index rows (Sample.index_row()), same order
          extra-<name>.npy          optional per-row extras (e.g. the last-layer residual and the
                                    prompt's mean token NLL for the baselines), [n, ...]
          checksums.json            sha256 of every file above, written last inside the commit;
                                    reads check the bytes they fetch (see blocks.py)
        .tmp-<uuid>/                a block being written (or left by a killed writer)
        .tmp-<uuid>.lock            flock held by the live writer of that temp block
      images/
        <sha256>.<ext>              every distinct prompt image, once, named by the sha256 of its
                                    bytes; index rows with an image record ``image_sha256`` and
                                    ``image_file`` (``images/<sha256>.<ext>``, relative to the store)

The reading order is blocks by name, rows in block order; block names are deterministic for
a given sequence of writes. If two blocks hold the same sample id (two ranks raced, or a resume
overlapped), the first occurrence in reading order wins; ``read``, ``index``, ``iter_blocks``
and ``len`` all agree on that. Finite values are required on write; a damaged block (a file that
does not match its checksum, a missing or undecodable chunk, non-finite values) is one
LitSahsError naming the block and ``python -m lit_sahs store verify STORE --repair``.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

from lit_sahs.data import blocks as _blocks
from lit_sahs.data.blocks import BLOCKS, INDEX, Block
from lit_sahs.data.fspath import FsPath, local_path, store_location
from lit_sahs.data.manifest import (
    DTYPE,
    EXTRACT_HINT,
    FORMAT_VERSION,
    MANIFEST,
    check_same_extraction,
    jsonable,
    parse_manifest,
    read_manifest,
    write_manifest,
)
from lit_sahs.data.store_images import IMAGE_FIELDS, IMAGES, clean_partial_images, store_images
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint
from lit_sahs.io import TMP_PREFIX

__all__ = ["BLOCKS", "DTYPE", "FORMAT_VERSION", "IMAGES", "IMAGE_FIELDS", "INDEX", "INDEX_FIELDS", "MANIFEST",
           "TMP_PREFIX", "ActivationStore"]  # the constants are re-exported from the modules that use them

log = logging.getLogger(__name__)
_WARNED_UNSEALED: set[str] = set()  # stores already warned about blocks without checksums (once per process)

INDEX_FIELDS = ("id", "label", "source", "attack", "attack_family", "category", "image", "base_id", "text")


def _to_float16(activations: Any) -> np.ndarray:
    if hasattr(activations, "detach"):  # torch.Tensor (any dtype, any device)
        import torch

        return activations.detach().to(device="cpu", dtype=torch.float16).numpy()
    with np.errstate(over="ignore"):  # overflow becomes inf, which write_block rejects by name
        return np.asarray(activations).astype(np.float16, copy=False)


class ActivationStore:
    """A directory of fp16 activations [N, layers, heads, head_dim] plus their sample index.

    Use ``create_or_open`` from writers (extraction; safe to call from every DDP rank) and
    ``open`` from readers. Committed blocks are immutable; ``refresh()`` picks up blocks
    committed by other processes since this object last looked.
    """

    def __init__(self, path: "Path | FsPath", manifest: dict):
        self.path = path if isinstance(path, FsPath) else Path(path)
        self.remote = isinstance(self.path, FsPath)  # opened from a URL: read through fsspec, read-only
        self.manifest = manifest
        fingerprint, geometry = parse_manifest(manifest, self.path)
        self.fingerprint: TargetFingerprint = fingerprint
        self.geometry: Geometry = geometry
        self._blocks: list[Block] = []
        self._rows_cache: dict[str, tuple[list[dict], dict | None]] = {}  # committed blocks never change
        self._arrays: dict[str, zarr.Array] = {}
        self._index: list[dict] = []
        self._ids: dict[str, int] = {}
        if not self.remote:
            self._clean_stale_tmp()
        self.refresh()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike,
        fingerprint: TargetFingerprint,
        position_rule: str,
        prompt_format: dict | str,
    ) -> "ActivationStore":
        """Create the store (directory + manifest) if absent; otherwise open it and check that it
        was made for the same target, position rule and prompt format. Writes need a local path (or a
        ``file://`` URL): a block commits by an atomic directory rename, which object stores lack."""
        local = local_path(path)
        if local is None:
            raise LitSahsError(f"activation store {path} is not local: stores are written to a local directory "
                               "(atomic block commits); extract there, then copy the directory to the object store "
                               "and read it by URL")
        path = local
        if path.exists() and not path.is_dir():
            raise LitSahsError(f"activation store path {path} is a file: give a directory path with --store")
        if not (path / MANIFEST).exists():
            if path.exists() and any(p.name != BLOCKS and not p.name.startswith(TMP_PREFIX) for p in path.iterdir()):
                raise LitSahsError(
                    f"{path} exists, is not empty and has no {MANIFEST}: it is not an activation store; "
                    "choose a new or empty --store path"
                )
            (path / BLOCKS).mkdir(parents=True, exist_ok=True)
            write_manifest(path, fingerprint, position_rule, prompt_format)  # another rank may have won
        store = cls.open(path)
        check_same_extraction(store.manifest, store.fingerprint, path, fingerprint, position_rule, prompt_format)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationStore":
        """Open a store for reading: a local path, or a URL any fsspec filesystem reads (``file://``,
        ``memory://``, ``s3://``, ``gs://`` ..., with that filesystem's package installed)."""
        path = store_location(path)
        manifest = read_manifest(path)
        if not isinstance(path, FsPath):
            (path / BLOCKS).mkdir(exist_ok=True)
        return cls(path, manifest)

    # ------------------------------------------------------------------ block discovery
    @property
    def blocks_dir(self) -> Path:
        return self.path / BLOCKS

    def refresh(self) -> "ActivationStore":
        """Re-list committed blocks (new ones from other writers) and rebuild the de-duplicated index."""
        blocks, index, ids = [], [], {}
        for name in _blocks.committed_names(self.blocks_dir):
            cached = self._rows_cache.get(name)
            if cached is None:
                sums = _blocks.load_checksums(self.blocks_dir / name)
                cached = self._rows_cache[name] = (_blocks.load_index(self.blocks_dir / name, sums), sums)
            rows, sums = cached
            keep = []
            for i, r in enumerate(rows):
                if r["id"] not in ids:
                    ids[r["id"]] = len(index)
                    index.append(r)
                    keep.append(i)
            blocks.append(Block(name, self.blocks_dir / name, rows, np.asarray(keep, dtype=np.int64),
                                len(index) - len(keep), sums))
        self._blocks, self._index, self._ids = blocks, index, ids
        unsealed = sum(b.sums is None for b in blocks)
        if unsealed and str(self.path) not in _WARNED_UNSEALED:
            _WARNED_UNSEALED.add(str(self.path))
            log.warning("activation store %s: %d of %d blocks were written without checksums (by an older "
                        "lit_sahs) and are read unverified; `python -m lit_sahs store verify %s` checks them",
                        self.path, unsealed, len(blocks), self.path)
        return self

    def _clean_stale_tmp(self) -> None:
        """Remove what killed writers left: temp blocks whose writer is gone (see blocks.py) and
        half-done image copies."""
        _blocks.clean_stale_tmp(self.blocks_dir)
        clean_partial_images(self.images_dir)

    # ------------------------------------------------------------------ writing
    def written_ids(self) -> set[str]:
        """Ids in committed blocks (including blocks other writers committed since the last look)."""
        self.refresh()
        return set(self._ids)

    def write_block(self, rows: Sequence[dict], activations: Any, rank: int = 0,
                    extras: dict[str, Any] | None = None, tag: str = "") -> str | None:
        """Commit one block: rows (Sample.index_row() dicts) with activations [n, L, H, D] and
        optional per-row `extras` {name: array [n, ...]} committed in the same block.

        Rows whose id is already committed (or repeated within `rows`) are dropped first, so a
        resumed extraction never duplicates. `tag`: hex digits that start the block name's unique
        part (``rows_tagged`` counts them). Returns the block name, or None if nothing was new."""
        if self.remote:
            raise LitSahsError(f"activation store {self.path} was opened from a URL, read-only: write to a local path")
        rows = list(rows)
        arr = _to_float16(activations)
        want = (len(rows),) + self.geometry.shape
        if arr.shape != want:
            raise LitSahsError(
                f"activations have shape {tuple(arr.shape)} but {len(rows)} rows of this store's target need "
                f"{want} = [rows, layers, heads, head_dim]: pass one [L, H, D] slice per row for the target "
                f"{self.fingerprint.name!r}"
            )
        extras = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                  for k, v in (extras or {}).items()}
        for k, v in extras.items():
            if not re.fullmatch(r"[a-z0-9_]+", k) or v.shape[:1] != (len(rows),):
                raise LitSahsError(f"extra {k!r} must be named [a-z0-9_]+ and have one entry per row "
                                   f"({len(rows)}), got shape {v.shape}")
        if not isinstance(rank, int) or rank < 0:
            raise LitSahsError(f"write_block rank must be a non-negative int, got {rank!r}")
        for r in rows:
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not r["id"]:
                raise LitSahsError(f"index row {r!r} has no string 'id': pass Sample.index_row() dicts")
            missing = [k for k in ("label",) if k not in r]
            if missing:
                raise LitSahsError(f"index row {r['id']!r} lacks {missing}: pass Sample.index_row() dicts")
        rows = store_images(self.path, rows)  # before the block that refers to them commits
        done = self.written_ids()
        keep, seen = [], set()
        for i, r in enumerate(rows):
            if r["id"] not in done and r["id"] not in seen:
                seen.add(r["id"])
                keep.append(i)
        if not keep:
            return None
        rows = [jsonable(rows[i]) for i in keep]
        arr = np.ascontiguousarray(arr[keep]) if len(keep) != arr.shape[0] else np.ascontiguousarray(arr)
        bad = ~np.isfinite(arr).reshape(len(rows), -1).all(axis=1)
        if bad.any():
            ids = [rows[i]["id"] for i in np.flatnonzero(bad)[:5]]
            raise LitSahsError(
                f"activations for samples {ids} are NaN/inf in float16 (|x| > 65504 overflows): "
                "check the target's dtype/outputs before storing them"
            )

        name = _blocks.next_block_name(self.blocks_dir, rank, tag)
        with _blocks.committing(self.blocks_dir, name) as tmp:  # renamed to `name` when the body is done
            self._write_block_files(tmp, rows, arr, rank)
            for k, v in extras.items():
                np.save(tmp / f"extra-{k}.npy", np.ascontiguousarray(v[keep]), allow_pickle=False)
            _blocks.seal_block(tmp)  # checksums of every file, last: part of the same commit
        self.refresh()
        return name

    def _write_block_files(self, tmp: Path, rows: list[dict], arr: np.ndarray, rank: int) -> None:
        _blocks.write_block_files(self._block_store(tmp, read_only=False), tmp, rows, arr, rank)

    # ------------------------------------------------------------------ images
    @property
    def images_dir(self) -> Path:
        return self.path / IMAGES

    def image_path(self, row: dict) -> Path | None:
        """The store's copy of a row's image (None for rows without one)."""
        rel = row.get("image_file")
        return self.path / rel if rel else None

    # ------------------------------------------------------------------ reading
    def _block_store(self, path: "Path | FsPath", read_only: bool):
        """The zarr store for one block directory (a seam: tests wrap it to see which keys are read)."""
        if isinstance(path, FsPath):
            return path.zarr_store()
        return LocalStore(path, read_only=read_only)

    def _array(self, block: Block) -> zarr.Array:
        z = self._arrays.get(block.name)
        if z is None:
            z = _blocks.open_block_array(self._block_store(block.path, read_only=True), block, self.geometry.shape)
            self._arrays[block.name] = z
        return z

    def __len__(self) -> int:
        return len(self._index)

    def index(self) -> list[dict]:
        """Index rows in reading order (blocks by name, rows in block order, first occurrence of an id)."""
        return [dict(r) for r in self._index]

    def ids(self) -> list[str]:
        return [r["id"] for r in self._index]

    def positions(self, ids: Sequence[str]) -> list[int]:
        """Reading-order positions of rows `ids` (for `read(rows=...)`); an id the store lacks is an error."""
        where = {str(r["id"]): i for i, r in enumerate(self._index)}
        missing = [i for i in ids if str(i) not in where]
        if missing:
            raise LitSahsError(f"{len(missing)} rows (e.g. {missing[0]}) are not in store {self.path}")
        return [where[str(i)] for i in ids]

    def labels(self) -> np.ndarray:
        return np.asarray([int(r["label"]) for r in self._index], dtype=np.int64)

    def copy_rows(self, rows: Sequence[int], path: str | os.PathLike) -> "ActivationStore":
        """A new store at `path` holding rows `rows` (reading positions) of this one, extras included:
        a subset to fit on, e.g. a control arm with fewer training rows."""
        m = self.manifest
        out = ActivationStore.create_or_open(path, self.fingerprint, m["position_rule"], m["prompt_format"])
        rows = np.asarray(rows, dtype=np.int64)
        extras = {n: self.read_extra(n, rows=rows) for n in self.extra_names()}
        out.write_block([dict(self._index[i]) for i in rows], self.read(rows=rows), extras=extras)
        return out

    def block_names(self) -> list[str]:
        return [b.name for b in self._blocks]

    def rows_tagged(self, tag: str) -> int:
        """Rows read from blocks written with `tag` (a row another block holds first is not counted):
        what one extraction run added, even while another run wrote to the same store."""
        return sum(len(b.keep) for b in self._blocks if _blocks.block_tag_is(b.name, tag))

    def _check_heads(self, heads: HeadSet | None) -> HeadSet | None:
        if heads is None:
            return None
        if not isinstance(heads, HeadSet):
            heads = HeadSet(heads)
        return heads.validate(self.geometry)

    def _read_block(self, block: Block, heads: HeadSet | None, local: np.ndarray) -> np.ndarray:
        """Rows `local` (block positions) of one block: [m, L, H, D] or [m, k, D] in HeadSet order."""
        return _blocks.read_block(self._array(block), block, heads, _blocks.selector(block, local))

    def read(self, heads: HeadSet | None = None, rows: Sequence[int] | None = None) -> np.ndarray:
        """Activations in reading order: [n, k, D] for a HeadSet (k = len(heads), in its order), or
        [n, L, H, D] for heads=None. `rows` picks row positions of `index()` (any order, repeats ok)."""
        heads = self._check_heads(heads)
        tail = self.geometry.shape if heads is None else (len(heads), self.geometry.head_dim)
        if rows is None:
            parts = [a for _, a in self.iter_blocks(heads)]
            return np.concatenate(parts) if parts else np.empty((0,) + tail, dtype=np.float16)
        sel = np.asarray(rows, dtype=np.int64).reshape(-1)
        if sel.size and (sel.min() < 0 or sel.max() >= len(self)):
            raise LitSahsError(f"row positions must lie in [0, {len(self)}) for this store, got {sel.min()}..{sel.max()}")
        out = np.empty((sel.size,) + tail, dtype=np.float16)
        if not sel.size:
            return out
        offsets = np.asarray([b.offset for b in self._blocks], dtype=np.int64)
        which = np.searchsorted(offsets, sel, side="right") - 1
        for bi in np.unique(which):
            block = self._blocks[bi]
            where = np.flatnonzero(which == bi)
            local = block.keep[sel[where] - block.offset]
            uniq, inv = np.unique(local, return_inverse=True)
            data = self._read_block(block, heads, uniq)
            out[where] = data[inv]
        return out

    def extra_names(self) -> list[str]:
        """Extras present in every committed block."""
        names = None
        for block in self._blocks:
            have = {p.name[len("extra-"):-len(".npy")] for p in block.path.glob("extra-*.npy")}
            names = have if names is None else names & have
        return sorted(names or ())

    def read_extra(self, name: str, rows: Sequence[int] | None = None) -> np.ndarray:
        """A per-row extra in reading order ([n, ...]); `rows` picks positions of `index()`."""
        parts = []
        for block in self._blocks:
            path = block.path / f"extra-{name}.npy"
            if not path.exists() and not (block.sums and path.name in block.sums):
                raise LitSahsError(f"block {block.name} of {self.path} has no extra {name!r} "
                                   f"(present in all blocks: {self.extra_names()}): re-extract into a new store")
            parts.append(_blocks.load_extra(block, name)[block.keep])
        if not parts:
            raise LitSahsError(f"activation store {self.path} is empty: {EXTRACT_HINT}")
        out = np.concatenate(parts)
        return out if rows is None else out[np.asarray(rows, dtype=np.int64)]

    def iter_blocks(self, heads: HeadSet | None = None) -> Iterator[tuple[list[dict], np.ndarray]]:
        """Stream (index rows, activations) one block at a time, in reading order, de-duplicated;
        memory is bounded by one block."""
        heads = self._check_heads(heads)
        for block in self._blocks:
            if not len(block.keep):
                continue
            data = self._read_block(block, heads, block.keep)
            yield [dict(block.rows[i]) for i in block.keep], data

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, target={self.fingerprint.name!r}, rows={len(self)}, "
                f"blocks={len(self._blocks)}, geometry={self.geometry.shape})")
