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
small zarr array. A block is written completely under ``blocks/.tmp-<uuid>/`` and then
``os.rename``-d to its final name, so a killed run never leaves a half block visible, and
DDP ranks never touch the same files. Atomic directory rename is a local/POSIX-filesystem
property: writes go to a local (or POSIX-mounted network) path.

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
        .tmp-<uuid>/                a block being written (or left by a killed writer)
        .tmp-<uuid>.lock            flock held by the live writer of that temp block
      images/
        <sha256>.<ext>              every distinct prompt image, once, named by the sha256 of its
                                    bytes; index rows with an image record ``image_sha256`` and
                                    ``image_file`` (``images/<sha256>.<ext>``, relative to the store)

Block names sort as ``b<seq>-r<rank>-<uuid>``: ``seq`` counts the rank's own blocks, so
the reading order (blocks by name, rows in block order) is deterministic for a given
sequence of writes. If two blocks hold the same sample id (two ranks raced, or a resume
overlapped), the first occurrence in reading order wins; ``read``, ``index``, ``iter_blocks``
and ``len`` all agree on that.

Every chunk is written (``write_empty_chunks``) and the fill value is NaN, so a missing chunk
file reads as NaN instead of silently as zeros; finite values are required on write.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

import lit_sahs
from lit_sahs.errors import LitSahsError
from lit_sahs.io import TMP_PREFIX, atomic_write_bytes, atomic_write_json
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint

try:  # POSIX: a dead writer's lock is released by the kernel, so we can tell stale temp blocks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BLOCKS = "blocks"
INDEX = "index.jsonl"
DTYPE = "float16"
INDEX_FIELDS = ("id", "label", "source", "attack", "attack_family", "category", "image", "base_id", "text")
IMAGES = "images"
IMAGE_FIELDS = ("image_sha256", "image_file")  # added by write_block to rows that have an image
_BLOCK_RE = re.compile(r"^b(\d{6,})-r(\d{4,})-([0-9a-f]+)$")
_EXTRACT_HINT = "run `python -m lit_sahs extract ...` first"


def _jsonable(x: Any) -> Any:
    """Normalise through JSON so tuples/lists and key order compare equal after a round trip."""
    return json.loads(json.dumps(x, sort_keys=True))


def _to_float16(activations: Any) -> np.ndarray:
    if hasattr(activations, "detach"):  # torch.Tensor (any dtype, any device)
        import torch

        return activations.detach().to(device="cpu", dtype=torch.float16).numpy()
    with np.errstate(over="ignore"):  # overflow becomes inf, which write_block rejects by name
        return np.asarray(activations).astype(np.float16, copy=False)


@dataclass
class _Block:
    name: str
    path: Path
    rows: list[dict]  # all rows of the block, in block order
    keep: np.ndarray  # local positions kept after cross-block de-dup, ascending
    offset: int  # global row of keep[0]


class ActivationStore:
    """A directory of fp16 activations [N, layers, heads, head_dim] plus their sample index.

    Use ``create_or_open`` from writers (extraction; safe to call from every DDP rank) and
    ``open`` from readers. Committed blocks are immutable; ``refresh()`` picks up blocks
    committed by other processes since this object last looked.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        try:
            self.fingerprint = TargetFingerprint.from_dict(manifest["fingerprint"])
            self.geometry = Geometry.from_dict(manifest["geometry"])
        except (KeyError, TypeError, ValueError) as e:
            raise LitSahsError(
                f"corrupt manifest in activation store {self.path}: {e!r}; delete it and re-run extract"
            ) from e
        if self.geometry != self.fingerprint.geometry:
            raise LitSahsError(
                f"corrupt manifest in activation store {self.path}: geometry disagrees with the fingerprint; "
                "delete it and re-run extract"
            )
        self._blocks: list[_Block] = []
        self._rows_cache: dict[str, list[dict]] = {}  # committed blocks never change
        self._arrays: dict[str, zarr.Array] = {}
        self._index: list[dict] = []
        self._ids: dict[str, int] = {}
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
        was made for the same target, position rule and prompt format."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LitSahsError(f"activation store path {path} is a file: give a directory path with --store")
        if not (path / MANIFEST).exists():
            if path.exists() and any(p.name != BLOCKS and not p.name.startswith(TMP_PREFIX) for p in path.iterdir()):
                raise LitSahsError(
                    f"{path} exists, is not empty and has no {MANIFEST}: it is not an activation store; "
                    "choose a new or empty --store path"
                )
            (path / BLOCKS).mkdir(parents=True, exist_ok=True)
            manifest = {
                "format_version": FORMAT_VERSION,
                "lit_sahs_version": lit_sahs.__version__,
                "fingerprint": fingerprint.to_dict(),
                "geometry": fingerprint.geometry.to_dict(),
                "dtype": DTYPE,
                "layout": {"array": "[n, layer, head, head_dim]", "chunks": "(n, 1, 1, head_dim)",
                           "images": "images/<sha256>.<ext>, one file per distinct image"},
                "position_rule": position_rule,
                "prompt_format": _jsonable(prompt_format),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write_json(path / MANIFEST, manifest, exclusive=True, indent=2, sort_keys=True)  # another rank may have won
        store = cls.open(path)
        try:
            store.fingerprint.check(fingerprint, f"activation store {path}")
        except LitSahsError as e:
            raise LitSahsError(
                f"{e}; the store was made for another target: give a new --store path for {fingerprint.name!r}"
            ) from None
        for key, want in (("position_rule", position_rule), ("prompt_format", _jsonable(prompt_format))):
            have = store.manifest.get(key)
            if have != want:
                raise LitSahsError(
                    f"activation store {path} was extracted with {key} {have!r} but this run uses {want!r}: "
                    "use the same setting or give a new --store path"
                )
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationStore":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise LitSahsError(f"no activation store at {path} (no {MANIFEST}): {_EXTRACT_HINT}")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LitSahsError(f"corrupt {mpath}: {e}; delete the store and re-run extract") from e
        if not isinstance(manifest, dict) or "format_version" not in manifest:
            raise LitSahsError(f"corrupt {mpath}: not a lit_sahs manifest; delete the store and re-run extract")
        if manifest["format_version"] != FORMAT_VERSION:
            raise LitSahsError(
                f"activation store {path} has format_version {manifest['format_version']!r}, this lit_sahs "
                f"({lit_sahs.__version__}) reads {FORMAT_VERSION}: re-run extract or use a matching lit_sahs"
            )
        if manifest.get("dtype") != DTYPE:
            raise LitSahsError(f"corrupt {mpath}: dtype {manifest.get('dtype')!r}, expected {DTYPE!r}")
        (path / BLOCKS).mkdir(exist_ok=True)
        return cls(path, manifest)

    # ------------------------------------------------------------------ block discovery
    @property
    def blocks_dir(self) -> Path:
        return self.path / BLOCKS

    def _committed_names(self) -> list[str]:
        names = []
        for p in self.blocks_dir.iterdir():
            if p.name.startswith(".") or not p.is_dir():
                continue
            if (p / INDEX).is_file() and (p / "zarr.json").is_file():
                names.append(p.name)
        return sorted(names)

    def refresh(self) -> "ActivationStore":
        """Re-list committed blocks (new ones from other writers) and rebuild the de-duplicated index."""
        blocks, index, ids = [], [], {}
        for name in self._committed_names():
            rows = self._rows_cache.get(name)
            if rows is None:
                rows = self._load_index(self.blocks_dir / name)
                self._rows_cache[name] = rows
            keep = []
            for i, r in enumerate(rows):
                if r["id"] not in ids:
                    ids[r["id"]] = len(index)
                    index.append(r)
                    keep.append(i)
            blocks.append(_Block(name, self.blocks_dir / name, rows, np.asarray(keep, dtype=np.int64),
                                 len(index) - len(keep)))
        self._blocks, self._index, self._ids = blocks, index, ids
        return self

    def _load_index(self, block_path: Path) -> list[dict]:
        try:
            with open(block_path / INDEX, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise LitSahsError(
                f"corrupt block {block_path} in activation store: {e}; delete that block directory "
                "and re-run extract to rewrite its rows"
            ) from e

    def _clean_stale_tmp(self) -> None:
        """Remove temp blocks whose writer is gone. A temp block whose lock is still held belongs
        to a live writer (another rank) and is left alone; committed blocks are never touched."""
        for p in self.blocks_dir.glob(TMP_PREFIX + "*"):
            if p.name.endswith(".lock") or not p.is_dir():
                continue
            lock = p.with_name(p.name + ".lock")
            if not self._writer_alive(lock):
                shutil.rmtree(p, ignore_errors=True)
                lock.unlink(missing_ok=True)
        for lock in self.blocks_dir.glob(TMP_PREFIX + "*.lock"):  # orphan lock files
            if not lock.with_name(lock.name[: -len(".lock")]).exists() and not self._writer_alive(lock):
                lock.unlink(missing_ok=True)
        import time

        for p in self.images_dir.glob(TMP_PREFIX + "*"):  # image copies a killed writer left half-done
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink(missing_ok=True)
            except OSError:
                pass

    @staticmethod
    def _writer_alive(lock: Path) -> bool:
        if fcntl is None:  # cannot tell: only age says the writer is gone
            import time

            try:
                return time.time() - lock.stat().st_mtime < 3600
            except FileNotFoundError:
                return False
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also releases our lock
        return False

    # ------------------------------------------------------------------ writing
    def written_ids(self) -> set[str]:
        """Ids in committed blocks (including blocks other writers committed since the last look)."""
        self.refresh()
        return set(self._ids)

    def _next_block_name(self, rank: int) -> str:
        seq = 0
        for name in self._committed_names():
            m = _BLOCK_RE.match(name)
            if m and int(m.group(2)) == rank:
                seq = max(seq, int(m.group(1)))
        return f"b{seq + 1:06d}-r{rank:04d}-{uuid.uuid4().hex[:12]}"

    def write_block(self, rows: Sequence[dict], activations: Any, rank: int = 0,
                    extras: dict[str, Any] | None = None) -> str | None:
        """Commit one block: rows (Sample.index_row() dicts) with activations [n, L, H, D] and
        optional per-row `extras` {name: array [n, ...]} committed in the same block.

        Rows whose id is already committed (or repeated within `rows`) are dropped first, so a
        resumed extraction never duplicates. Returns the block name, or None if nothing was new."""
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
        rows = self._store_images(rows)
        done = self.written_ids()
        keep, seen = [], set()
        for i, r in enumerate(rows):
            if r["id"] not in done and r["id"] not in seen:
                seen.add(r["id"])
                keep.append(i)
        if not keep:
            return None
        rows = [_jsonable(rows[i]) for i in keep]
        arr = np.ascontiguousarray(arr[keep]) if len(keep) != arr.shape[0] else np.ascontiguousarray(arr)
        bad = ~np.isfinite(arr).reshape(len(rows), -1).all(axis=1)
        if bad.any():
            ids = [rows[i]["id"] for i in np.flatnonzero(bad)[:5]]
            raise LitSahsError(
                f"activations for samples {ids} are NaN/inf in float16 (|x| > 65504 overflows): "
                "check the target's dtype/outputs before storing them"
            )

        name = self._next_block_name(rank)
        tmp = self.blocks_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        lock_path = tmp.with_name(tmp.name + ".lock")
        lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            tmp.mkdir()
            try:
                self._write_block_files(tmp, rows, arr, rank)
                for k, v in extras.items():
                    np.save(tmp / f"extra-{k}.npy", np.ascontiguousarray(v[keep]), allow_pickle=False)
                os.rename(tmp, self.blocks_dir / name)  # the commit point
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # best effort; a hard kill leaves it for open()
                raise
        finally:
            os.close(lock_fd)
            lock_path.unlink(missing_ok=True)
        self.refresh()
        return name

    # ------------------------------------------------------------------ images
    @property
    def images_dir(self) -> Path:
        return self.path / IMAGES

    def _store_images(self, rows: list[dict]) -> list[dict]:
        """Copy each row's image into ``images/`` under its content hash (once per distinct image,
        before the block that refers to it commits) and record the hash in the row. A file already
        there is not written again, so an image shared by many rows or attacks is stored once."""
        out = []
        for r in rows:
            src = r.get("image") if isinstance(r, dict) else None
            if not src:
                out.append(r)
                continue
            if r.get("image_sha256") and r.get("image_file") and (self.path / r["image_file"]).is_file():
                out.append(r)  # already stored (rows read back from another store)
                continue
            try:
                data = Path(src).read_bytes()
            except OSError as e:
                raise LitSahsError(f"sample {r.get('id')}: image {src} cannot be read ({e.strerror or e}): "
                                   "the store keeps a copy of every image") from None
            sha = hashlib.sha256(data).hexdigest()
            ext = Path(src).suffix.lower()
            if not re.fullmatch(r"\.[a-z0-9]{1,5}", ext):
                ext = ".img"
            rel = f"{IMAGES}/{sha}{ext}"
            dest = self.path / rel
            if not dest.is_file() or dest.stat().st_size != len(data):
                self.images_dir.mkdir(exist_ok=True)
                atomic_write_bytes(dest, data)  # same content from two writers: either rename wins
            out.append({**r, "image_sha256": sha, "image_file": rel})
        return out

    def image_path(self, row: dict) -> Path | None:
        """The store's copy of a row's image (None for rows without one)."""
        rel = row.get("image_file")
        return self.path / rel if rel else None

    def _write_block_files(self, tmp: Path, rows: list[dict], arr: np.ndarray, rank: int) -> None:
        n, (L, H, D) = arr.shape[0], self.geometry.shape
        z = zarr.create_array(
            store=self._block_store(tmp, read_only=False),
            shape=arr.shape,
            chunks=(n, 1, 1, D),
            dtype=DTYPE,
            fill_value=float("nan"),  # a lost chunk reads as NaN, never as plausible zeros
            dimension_names=("row", "layer", "head", "head_dim"),
            attributes={"lit_sahs": {"rows": n, "rank": rank, "format_version": FORMAT_VERSION}},
            config={"write_empty_chunks": True},
        )
        z[...] = arr
        with open(tmp / INDEX, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ reading
    def _block_store(self, path: Path, read_only: bool):
        """The zarr store for one block directory (a seam: tests wrap it to see which keys are read)."""
        return LocalStore(path, read_only=read_only)

    def _array(self, block: _Block) -> zarr.Array:
        z = self._arrays.get(block.name)
        if z is None:
            z = zarr.open_array(store=self._block_store(block.path, read_only=True), mode="r")
            if z.shape != (len(block.rows),) + self.geometry.shape:
                raise LitSahsError(
                    f"corrupt block {block.path}: array shape {z.shape} does not match its {len(block.rows)} index "
                    f"rows and geometry {self.geometry.shape}; delete that block and re-run extract"
                )
            self._arrays[block.name] = z
        return z

    def __len__(self) -> int:
        return len(self._index)

    def index(self) -> list[dict]:
        """Index rows in reading order (blocks by name, rows in block order, first occurrence of an id)."""
        return [dict(r) for r in self._index]

    def ids(self) -> list[str]:
        return [r["id"] for r in self._index]

    def labels(self) -> np.ndarray:
        return np.asarray([int(r["label"]) for r in self._index], dtype=np.int64)

    def block_names(self) -> list[str]:
        return [b.name for b in self._blocks]

    def _check_heads(self, heads: HeadSet | None) -> HeadSet | None:
        if heads is None:
            return None
        if not isinstance(heads, HeadSet):
            heads = HeadSet(heads)
        return heads.validate(self.geometry)

    def _read_block(self, block: _Block, heads: HeadSet | None, local: np.ndarray | slice) -> np.ndarray:
        """Rows `local` (block positions) of one block: [m, L, H, D] or [m, k, D] in HeadSet order.
        With heads, only those heads' chunks are fetched (grouped per layer)."""
        z = self._array(block)
        if heads is None:
            return z.get_orthogonal_selection((local, slice(None), slice(None), slice(None)))
        m = len(block.rows) if isinstance(local, slice) else len(local)
        out = np.empty((m, len(heads), self.geometry.head_dim), dtype=np.float16)
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for pos, (l, h) in enumerate(heads):
            by_layer.setdefault(l, []).append((h, pos))
        for l, pairs in by_layer.items():
            hs = sorted(h for h, _ in pairs)
            got = z.get_orthogonal_selection((local, l, hs, slice(None)))  # [m, len(hs), D]
            col = {h: i for i, h in enumerate(hs)}
            for h, pos in pairs:
                out[:, pos, :] = got[:, col[h], :]
        return out

    @staticmethod
    def _selector(block: _Block, local: np.ndarray) -> np.ndarray | slice:
        if len(local) == len(block.rows) and (len(local) == 0 or (local[0] == 0 and np.all(np.diff(local) == 1))):
            return slice(None)  # whole block: plain slice, no fancy indexing
        return local

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
            data = self._read_block(block, heads, self._selector(block, uniq))
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
            if not path.exists():
                raise LitSahsError(f"block {block.name} of {self.path} has no extra {name!r} "
                                   f"(present in all blocks: {self.extra_names()}): re-extract into a new store")
            parts.append(np.load(path, allow_pickle=False)[block.keep])
        if not parts:
            raise LitSahsError(f"activation store {self.path} is empty: {_EXTRACT_HINT}")
        out = np.concatenate(parts)
        return out if rows is None else out[np.asarray(rows, dtype=np.int64)]

    def iter_blocks(self, heads: HeadSet | None = None) -> Iterator[tuple[list[dict], np.ndarray]]:
        """Stream (index rows, activations) one block at a time, in reading order, de-duplicated;
        memory is bounded by one block."""
        heads = self._check_heads(heads)
        for block in self._blocks:
            if not len(block.keep):
                continue
            data = self._read_block(block, heads, self._selector(block, block.keep))
            yield [dict(block.rows[i]) for i in block.keep], data

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, target={self.fingerprint.name!r}, rows={len(self)}, "
                f"blocks={len(self._blocks)}, geometry={self.geometry.shape})")
