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

Integrity: before the rename, ``seal_block`` records the sha256 of every file of the block in its
``checksums.json`` (with a digest of that list, so a damaged list is caught too), inside the atomic
commit. Readers check exactly the bytes they fetch (``VerifiedStore`` wraps the block's zarr store;
the index and extras are checked when loaded), so a bit flip, a truncated or a missing chunk is
one ``LitSahsError`` naming the block, never different numbers, a zstd traceback or silent NaN.
The block's ``zarr.json`` says a checksum list belongs to it, so deleting the list is caught as
well. Blocks written before checksums existed have neither and are read unverified (values must
still decode and be finite). ``lit_sahs.data.verify`` checks and repairs whole stores.
"""
from __future__ import annotations

import hashlib
import io
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
from zarr.storage import WrapperStore

from lit_sahs.data.manifest import DTYPE, FORMAT_VERSION
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.io import TMP_PREFIX, atomic_write_json

try:  # POSIX: a dead writer's lock is released by the kernel, so we can tell stale temp blocks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

BLOCKS = "blocks"
INDEX = "index.jsonl"
CHECKSUMS = "checksums.json"
HASH = "sha256"
_BLOCK_RE = re.compile(r"^b(\d{6,})-r(\d{4,})-([0-9a-f]+)$")


@dataclass
class Block:
    name: str
    path: Path
    rows: list[dict]  # all rows of the block, in block order
    keep: np.ndarray  # local positions kept after cross-block de-dup, ascending
    offset: int  # global row of keep[0]
    sums: dict[str, str] | None = None  # sha256 of each file (relative posix path); None: written unsealed


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


def next_block_name(blocks_dir: Path, rank: int, tag: str = "") -> str:
    """A fresh name for `rank`'s next block, sorting after that rank's committed blocks. `tag` (a few
    hex digits) starts the name's unique part: one extraction run tags all its blocks alike, so it
    can count the rows it wrote itself while another run writes to the same store."""
    if not re.fullmatch(r"[0-9a-f]{0,8}", tag):
        raise LitSahsError(f"block tag must be at most 8 hex digits, got {tag!r}")
    seq = 0
    for name in committed_names(blocks_dir):
        m = _BLOCK_RE.match(name)
        if m and int(m.group(2)) == rank:
            seq = max(seq, int(m.group(1)))
    return f"b{seq + 1:06d}-r{rank:04d}-{tag}{uuid.uuid4().hex[:12 - len(tag)]}"


def block_tag_is(name: str, tag: str) -> bool:
    """Whether the block `name` was written with `tag` (see next_block_name)."""
    m = _BLOCK_RE.match(name)
    return bool(tag) and m is not None and m.group(3).startswith(tag)


def repair_hint(store: Path) -> str:
    return f"run `python -m lit_sahs store verify {store} --repair`, then re-run extract to rewrite its rows"


class DamagedBlock(LitSahsError):
    """A committed block whose files are not what its writer committed; `what` says how."""

    def __init__(self, block_path: Path, what: str):
        store = block_path.parent.parent
        super().__init__(f"block {block_path.name} of activation store {store} is damaged ({what}): {repair_hint(store)}")
        self.block, self.what = block_path.name, what


class GeometryMismatch(LitSahsError):
    """A block whose activations have a whole [layers, heads, head_dim] other than the manifest's:
    either the block belongs to another store or the manifest is wrong (``verify`` tells which)."""

    def __init__(self, block_path: Path, have: tuple, want: tuple):
        store = block_path.parent.parent
        super().__init__(f"block {block_path.name} of activation store {store} holds activations shaped {have} "
                         f"[layers, heads, head_dim] but its manifest.json says {want}: the manifest or the block "
                         f"belongs to another target; run `python -m lit_sahs store verify {store}` to see which")
        self.block, self.have, self.want = block_path.name, tuple(have), tuple(want)


def damaged(block_path: Path, what: str) -> DamagedBlock:
    """The one error a damaged committed block gives: names the block, the store and the fix."""
    return DamagedBlock(block_path, what)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def load_index(block_path: Path, sums: dict[str, str] | None = None) -> list[dict]:
    """A committed block's index rows, in block order (checked against `sums` when given)."""
    try:
        data = read_checked(block_path, INDEX, sums)
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(block_path, f"{INDEX} unreadable: {_first_line(e)}") from e


# ---------------------------------------------------------------- checksums

def digest(data) -> str:
    """sha256 (hex) of bytes or any contiguous buffer."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file, read in pieces."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def _list_digest(files: dict[str, str]) -> str:
    return digest("".join(f"{k}\t{v}\n" for k, v in sorted(files.items())).encode("utf-8"))


def seal_block(tmp: Path) -> None:
    """Record the sha256 of every file of the temp block `tmp` in its checksums.json; call it last,
    inside ``committing``, so the list is part of the atomic commit."""
    files = {p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS}
    atomic_write_json(tmp / CHECKSUMS, {"algorithm": HASH, "files": files, "list_sha256": _list_digest(files)},
                      sort_keys=True)


def load_checksums(block_path: Path) -> dict[str, str] | None:
    """{relative path: sha256} of a committed block; None for a block written before checksums
    (whether one should be there is checked against zarr.json when the array is opened)."""
    path = block_path / CHECKSUMS
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(block_path, f"{CHECKSUMS} unreadable: {_first_line(e)}") from e
    files = doc.get("files") if isinstance(doc, dict) else None
    if (not isinstance(files, dict) or doc.get("algorithm") != HASH
            or not all(isinstance(v, str) for v in files.values()) or doc.get("list_sha256") != _list_digest(files)):
        raise damaged(block_path, f"{CHECKSUMS} does not match its own digest")
    return files


def check_bytes(block_path: Path, key: str, data, sums: dict[str, str] | None) -> None:
    """Raise `damaged` when `data` (None: the file is absent) is not what `sums` recorded for `key`."""
    want = None if sums is None else sums.get(key)
    if want is None:
        return
    if data is None:
        raise damaged(block_path, f"file {key} is missing")
    if digest(data) != want:
        raise damaged(block_path, f"file {key} does not match its checksum")


def read_checked(block_path: Path, key: str, sums: dict[str, str] | None) -> bytes:
    """The bytes of one file of a block, checked against `sums`."""
    try:
        data = (block_path / key).read_bytes()
    except FileNotFoundError:
        if sums is None or key not in sums:
            raise
        data = None
    check_bytes(block_path, key, data, sums)
    return data


def load_extra(block: Block, name: str) -> np.ndarray:
    """A block's per-row extra `name` (all its rows), checked against its checksums."""
    key = f"extra-{name}.npy"
    try:
        return np.load(io.BytesIO(read_checked(block.path, key, block.sums)), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise damaged(block.path, f"{key} unreadable: {_first_line(e)}") from e


class VerifiedStore(WrapperStore):
    """A block's zarr store that checks every whole file it returns against the block's checksums,
    so only the bytes actually read are hashed.

    A file that fails its check is not raised inside zarr's concurrent reads (an exception there
    leaves the other chunk tasks pending, and asyncio logs each one when it is destroyed): it reads
    as absent and the damage is kept in ``damage``, which ``raise_damage`` raises once zarr returns."""

    def __init__(self, store, sums: dict[str, str], block_path: Path, _found: list | None = None):
        super().__init__(store)
        self._sums, self._block_path = sums, block_path
        self._found: list[DamagedBlock] = [] if _found is None else _found  # shared with its copies

    @property
    def damage(self) -> DamagedBlock | None:
        return self._found[0] if self._found else None

    def _with_store(self, store):
        return type(self)(store, self._sums, self._block_path, self._found)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if byte_range is None:
            try:
                check_bytes(self._block_path, key, None if buf is None else buf.as_numpy_array(), self._sums)
            except DamagedBlock as e:
                self._found.append(e)
                return None
        return buf


def raise_damage(zstore) -> None:
    """Raise the damage a VerifiedStore found during the last zarr call (no-op for other stores),
    and forget it: the next read of other chunks of the block starts clean."""
    found = getattr(zstore, "_found", None)
    if found:
        damage = found[0]
        found.clear()
        raise damage


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

class SettlingStore(WrapperStore):
    """A block's zarr store for writing that counts the chunk writes in flight. zarr writes chunks
    concurrently and, when one fails (a full disk), raises at once while the others still run, and
    they would recreate files in the temp block after it is removed; ``settle`` waits for them."""

    def __init__(self, store, _state: list | None = None):
        super().__init__(store)
        self._state = [0, None] if _state is None else _state  # [writes in flight, first error], shared with copies

    def _with_store(self, store):
        return type(self)(store, self._state)

    async def set(self, key, value, *args, **kwargs):
        if self._state[1] is not None:
            raise self._state[1]  # after a failure nothing more is written
        self._state[0] += 1
        try:
            return await self._store.set(key, value, *args, **kwargs)
        except BaseException as e:
            self._state[1] = self._state[1] or e
            raise
        finally:
            self._state[0] -= 1

    def settle(self, timeout: float = 30.0) -> None:
        """Wait (at most `timeout` seconds) until no chunk write is in flight."""
        end = time.monotonic() + timeout
        while self._state[0] > 0 and time.monotonic() < end:
            time.sleep(0.01)


def write_block_files(zstore, tmp: Path, rows: list[dict], arr: np.ndarray, rank: int) -> None:
    """Write activations `arr` [n, L, H, D] into the zarr store `zstore` of the temp block `tmp`
    (one chunk per (layer, head)) and its n index rows next to them. On a failure every chunk write
    still running has ended before the error leaves, so the temp block can be removed whole."""
    zstore = SettlingStore(zstore)
    try:
        _write_block_files(zstore, tmp, rows, arr, rank)
    except BaseException:
        zstore.settle()
        raise


def _write_block_files(zstore, tmp: Path, rows: list[dict], arr: np.ndarray, rank: int) -> None:
    n, D = arr.shape[0], arr.shape[3]
    z = zarr.create_array(
        store=zstore,
        shape=arr.shape,
        chunks=(n, 1, 1, D),
        dtype=DTYPE,
        fill_value=float("nan"),  # a lost chunk reads as NaN, never as plausible zeros
        dimension_names=("row", "layer", "head", "head_dim"),
        attributes={"lit_sahs": {"rows": n, "rank": rank, "format_version": FORMAT_VERSION, "checksums": CHECKSUMS}},
        config={"write_empty_chunks": True},
    )
    z[...] = arr
    with open(tmp / INDEX, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def open_block_array(zstore, block: Block, shape: tuple[int, int, int]) -> zarr.Array:
    """A committed block's array (read-only, verified when the block has checksums), checked against
    its index rows and geometry `shape`."""
    if block.sums is not None:
        zstore = VerifiedStore(zstore, block.sums, block.path)
    try:
        z = zarr.open_array(store=zstore, mode="r")
    except (LitSahsError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever zarr raises on a broken zarr.json
        raise_damage(zstore)
        raise damaged(block.path, f"zarr.json unreadable: {_first_line(e)}") from e
    raise_damage(zstore)
    if block.sums is None and (z.attrs.get("lit_sahs") or {}).get("checksums"):
        raise damaged(block.path, f"{CHECKSUMS} is missing")
    if len(z.shape) == 4 and z.shape[0] == len(block.rows) and tuple(z.shape[1:]) != tuple(shape):
        raise GeometryMismatch(block.path, tuple(z.shape[1:]), tuple(shape))
    if z.shape != (len(block.rows),) + shape:
        raise damaged(block.path, f"array shape {z.shape} does not match its {len(block.rows)} index rows "
                                  f"and geometry {shape}")
    return z


def selector(block: Block, local: np.ndarray) -> np.ndarray | slice:
    """`local` block positions as a zarr selection: a plain slice when they are the whole block."""
    if len(local) == len(block.rows) and (len(local) == 0 or (local[0] == 0 and np.all(np.diff(local) == 1))):
        return slice(None)  # whole block: plain slice, no fancy indexing
    return local


def read_block(z: zarr.Array, block: Block, heads: HeadSet | None, local: np.ndarray | slice) -> np.ndarray:
    """Rows `local` (block positions) of one block's array: [m, L, H, D] or [m, k, D] in HeadSet
    order. With heads, only those heads' chunks are fetched (grouped per layer). A chunk that does
    not decode or holds non-finite values (only finite ones are written) is a damaged block."""
    try:
        out = _read_selection(z, block, heads, local)
    except (LitSahsError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - zstd/codec errors of an unverified (pre-checksum) block
        raise damaged(block.path, f"a chunk does not decode: {_first_line(e)}") from e
    raise_damage(z.store)
    if not np.isfinite(out).all():
        raise damaged(block.path, "a chunk file is missing or holds non-finite values")
    return out


def _read_selection(z: zarr.Array, block: Block, heads: HeadSet | None, local: np.ndarray | slice) -> np.ndarray:
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
