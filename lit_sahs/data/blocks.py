"""Blocks: the immutable pieces an ActivationStore is made of, one small zarr v3 array each.

zarr gives chunked N-d arrays but no atomic multi-chunk commit and no safe concurrent appends
to one array, so every writer flush becomes its own block. A block is written completely under
``blocks/.tmp-<uuid>/`` and then ``os.rename``-d to its final name, so a killed run never leaves
a half block visible, and DDP ranks never touch the same files. Atomic directory rename is a
local/POSIX-filesystem property: writes go to a local (or POSIX-mounted network) path. While a
temp block is written its writer holds an flock on ``.tmp-<uuid>.lock``; a temp block without a
live writer is left over from a killed run and is removed when a store is opened.

Block names sort as ``b<seq>-r<rank>-<uuid>``: ``seq`` counts the rank's own blocks, so the
order of blocks by name is deterministic for a given sequence of writes.

Every chunk is written (``write_empty_chunks``) and the fill value is NaN, so a missing chunk
file reads as NaN instead of silently as zeros.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from lit_sahs.data.manifest import DTYPE, FORMAT_VERSION
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.io import TMP_PREFIX

try:  # POSIX: a dead writer's lock is released by the kernel, so we can tell stale temp blocks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

BLOCKS = "blocks"
INDEX = "index.jsonl"
_BLOCK_RE = re.compile(r"^b(\d{6,})-r(\d{4,})-([0-9a-f]+)$")


@dataclass
class Block:
    name: str
    path: Path
    rows: list[dict]  # all rows of the block, in block order
    keep: np.ndarray  # local positions kept after cross-block de-dup, ascending
    offset: int  # global row of keep[0]


# ---------------------------------------------------------------- naming and discovery

def committed_names(blocks_dir: Path) -> list[str]:
    """Names of the committed blocks under `blocks_dir`, sorted (the reading order)."""
    names = []
    for p in blocks_dir.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        if (p / INDEX).is_file() and (p / "zarr.json").is_file():
            names.append(p.name)
    return sorted(names)


def next_block_name(blocks_dir: Path, rank: int) -> str:
    """A fresh name for `rank`'s next block, sorting after that rank's committed blocks."""
    seq = 0
    for name in committed_names(blocks_dir):
        m = _BLOCK_RE.match(name)
        if m and int(m.group(2)) == rank:
            seq = max(seq, int(m.group(1)))
    return f"b{seq + 1:06d}-r{rank:04d}-{uuid.uuid4().hex[:12]}"


def load_index(block_path: Path) -> list[dict]:
    """A committed block's index rows, in block order."""
    try:
        with open(block_path / INDEX, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise LitSahsError(
            f"corrupt block {block_path} in activation store: {e}; delete that block directory "
            "and re-run extract to rewrite its rows"
        ) from e


# ---------------------------------------------------------------- temp blocks, locks and the commit

def writer_alive(lock: Path) -> bool:
    """Whether the writer of a temp block still holds its lock file."""
    if fcntl is None:  # cannot tell: only age says the writer is gone
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


def clean_stale_tmp(blocks_dir: Path) -> None:
    """Remove temp blocks whose writer is gone. A temp block whose lock is still held belongs
    to a live writer (another rank) and is left alone; committed blocks are never touched."""
    for p in blocks_dir.glob(TMP_PREFIX + "*"):
        if p.name.endswith(".lock") or not p.is_dir():
            continue
        lock = p.with_name(p.name + ".lock")
        if not writer_alive(lock):
            shutil.rmtree(p, ignore_errors=True)
            lock.unlink(missing_ok=True)
    for lock in blocks_dir.glob(TMP_PREFIX + "*.lock"):  # orphan lock files
        if not lock.with_name(lock.name[: -len(".lock")]).exists() and not writer_alive(lock):
            lock.unlink(missing_ok=True)


@contextmanager
def committing(blocks_dir: Path, name: str) -> Iterator[Path]:
    """Yield a new temp block directory, locked as a live writer's; when the body returns it is
    renamed to `name` (the commit point), on any error (interrupts too) it is removed."""
    tmp = blocks_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    lock_path = tmp.with_name(tmp.name + ".lock")
    lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        tmp.mkdir()
        try:
            yield tmp
            os.rename(tmp, blocks_dir / name)  # the commit point
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # best effort; a hard kill leaves it for open()
            raise
    finally:
        os.close(lock_fd)
        lock_path.unlink(missing_ok=True)


# ---------------------------------------------------------------- block files

def write_block_files(zstore, tmp: Path, rows: list[dict], arr: np.ndarray, rank: int) -> None:
    """Write activations `arr` [n, L, H, D] into the zarr store `zstore` of the temp block `tmp`
    (one chunk per (layer, head)) and its n index rows next to them."""
    n, D = arr.shape[0], arr.shape[3]
    z = zarr.create_array(
        store=zstore,
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


def open_block_array(zstore, block: Block, shape: tuple[int, int, int]) -> zarr.Array:
    """A committed block's array (read-only), checked against its index rows and geometry `shape`."""
    z = zarr.open_array(store=zstore, mode="r")
    if z.shape != (len(block.rows),) + shape:
        raise LitSahsError(
            f"corrupt block {block.path}: array shape {z.shape} does not match its {len(block.rows)} index "
            f"rows and geometry {shape}; delete that block and re-run extract"
        )
    return z


def selector(block: Block, local: np.ndarray) -> np.ndarray | slice:
    """`local` block positions as a zarr selection: a plain slice when they are the whole block."""
    if len(local) == len(block.rows) and (len(local) == 0 or (local[0] == 0 and np.all(np.diff(local) == 1))):
        return slice(None)  # whole block: plain slice, no fancy indexing
    return local


def read_block(z: zarr.Array, block: Block, heads: HeadSet | None, local: np.ndarray | slice) -> np.ndarray:
    """Rows `local` (block positions) of one block's array: [m, L, H, D] or [m, k, D] in HeadSet
    order. With heads, only those heads' chunks are fetched (grouped per layer)."""
    if heads is None:
        return z.get_orthogonal_selection((local, slice(None), slice(None), slice(None)))
    m = len(block.rows) if isinstance(local, slice) else len(local)
    out = np.empty((m, len(heads), z.shape[3]), dtype=np.float16)
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
