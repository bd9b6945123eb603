"""`python -m lit_sahs store verify STORE [--repair]`: check every block of an activation store.

A block with checksums (see ``blocks.py``) is good when every file it lists is present, matches its
sha256 and nothing else is in it; a block written before checksums existed is read in full and
must decode to finite values. Bad blocks are listed (exit status 2). ``--repair`` removes them,
each with one atomic rename out of ``blocks/`` (then deleted), so the store reads every other
row and a re-run of the same ``extract`` command writes exactly the removed rows again (extract
skips the sample ids that are still committed).

The store's image copies (``images/<sha256>.<ext>``) are checked too: each must hash to its name,
and each one a row refers to must exist. ``--repair`` rewrites a bad or missing copy from the row's
original image when that file still has the same bytes.

When every block disagrees with the manifest's geometry in the same way, the manifest is what is
wrong: that is reported as such and ``--repair`` removes nothing (it would remove every row).
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from zarr.storage import LocalStore

from lit_sahs.commands import run_command
from lit_sahs.data import blocks as _blocks
from lit_sahs.data.blocks import BLOCKS, CHECKSUMS, Block, DamagedBlock, GeometryMismatch
from lit_sahs.data.manifest import parse_manifest, read_manifest
from lit_sahs.data.store_images import IMAGES
from lit_sahs.errors import LitSahsError
from lit_sahs.io import TMP_PREFIX, atomic_write_bytes

PROG = "python -m lit_sahs store verify"
USAGE = f"usage: {PROG} STORE [--repair]\n\ncommands:\n  verify     check every block of a store; --repair removes the bad ones"


@dataclass
class BlockCheck:
    name: str
    rows: Optional[int]  # None when the index itself is unreadable
    sealed: bool  # has checksums
    problems: list[str] = field(default_factory=list)
    geometry: Optional[tuple] = None  # [layers, heads, head_dim] of a block that disagrees with the manifest


def _file_problems(path: Path, sums: dict[str, str]) -> list[str]:
    """Listed files that are missing or differ from their checksum, and files nobody listed."""
    problems = []
    for key, want in sorted(sums.items()):
        try:
            if _blocks.file_digest(path / key) != want:
                problems.append(f"file {key} does not match its checksum")
        except FileNotFoundError:
            problems.append(f"file {key} is missing")
    listed = set(sums) | {CHECKSUMS}
    problems += [f"unexpected file {p.relative_to(path).as_posix()}" for p in sorted(path.rglob("*"))
                 if p.is_file() and p.relative_to(path).as_posix() not in listed]
    return problems


def check_block(path: Path, shape: tuple[int, int, int]) -> BlockCheck:
    """Every problem of one committed block directory (an empty list: the block is good)."""
    check = BlockCheck(path.name, None, sealed=(path / CHECKSUMS).exists())
    try:
        sums = _blocks.load_checksums(path)
        rows = _blocks.load_index(path, sums)
        check.rows = len(rows)
        if sums is not None:
            check.problems = _file_problems(path, sums)
            if check.problems:
                return check
        block = Block(path.name, path, rows, np.arange(len(rows)), 0, sums)
        z = _blocks.open_block_array(LocalStore(path, read_only=True), block, shape)
        if sums is None:  # nothing to compare with: it must at least decode to finite values
            _blocks.read_block(z, block, None, slice(None))
            for extra in sorted(path.glob("extra-*.npy")):
                if len(_blocks.load_extra(block, extra.name[len("extra-"):-len(".npy")])) != len(rows):
                    check.problems.append(f"{extra.name} does not have one entry per row")
    except DamagedBlock as e:
        check.problems.append(e.what)
    except GeometryMismatch as e:
        check.geometry = e.have
    return check


def _geometry_problems(path: Path, checks: list[BlockCheck], want: tuple) -> None:
    """Blocks shaped unlike the manifest: when no block matches it and they all agree, the manifest is
    wrong (one error, nothing removed); otherwise those blocks are bad."""
    odd = [c for c in checks if c.geometry is not None]
    if not odd:
        return
    shapes = {c.geometry for c in odd}
    if len(odd) == len(checks) and len(shapes) == 1:
        raise LitSahsError(f"every block of activation store {path} holds activations shaped {odd[0].geometry} "
                           f"[layers, heads, head_dim] but its manifest.json says {want}: the manifest is wrong, "
                           "not the blocks; restore manifest.json from a copy of the store (nothing was removed: "
                           "--repair would delete every row)")
    for c in odd:
        c.problems.append(f"activations shaped {c.geometry}, the manifest says {want}")


@dataclass
class ImageCheck:
    file: str  # relative to the store: images/<sha256>.<ext>
    problem: str
    source: Optional[str] = None  # the original image of a row that refers to it, with the same bytes


def verify_images(path: Path, checks: list[BlockCheck]) -> list[ImageCheck]:
    """Image copies that do not hash to their name, and copies a row refers to that are missing."""
    images = path / IMAGES
    bad: dict[str, ImageCheck] = {}
    if images.is_dir():
        for p in sorted(images.iterdir()):
            if p.name.startswith(TMP_PREFIX) or not p.is_file():
                continue
            if _blocks.file_digest(p) != p.name.split(".", 1)[0]:
                rel = f"{IMAGES}/{p.name}"
                bad[rel] = ImageCheck(rel, "does not match its checksum (its name)")
    for c in checks:
        if c.problems:
            continue
        block = path / BLOCKS / c.name
        for row in _blocks.load_index(block, _blocks.load_checksums(block)):
            rel = row.get("image_file")
            if not rel:
                continue
            if rel not in bad and not (path / rel).is_file():
                bad[rel] = ImageCheck(rel, "is missing")
            if rel in bad and bad[rel].source is None and row.get("image") and Path(row["image"]).is_file():
                if _blocks.file_digest(Path(row["image"])) == row.get("image_sha256"):
                    bad[rel].source = row["image"]
    return list(bad.values())


def verify_store(store: str | Path) -> tuple[list[BlockCheck], list[str]]:
    """(a check per block directory, in reading order; directories that look committed but lack
    index.jsonl or zarr.json, which readers skip)."""
    path = Path(store)
    _, geometry = parse_manifest(read_manifest(path), path)
    blocks_dir = path / BLOCKS
    if not blocks_dir.is_dir():
        return [], []
    names = _blocks.committed_names(blocks_dir)
    incomplete = sorted(p.name for p in blocks_dir.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.name not in names)
    checks = [check_block(blocks_dir / n, geometry.shape) for n in names]
    _geometry_problems(path, checks, geometry.shape)
    return checks, incomplete


def remove_block(blocks_dir: Path, name: str) -> None:
    """Take a block out of the store with one atomic rename (readers see it or nothing), then delete it."""
    gone = blocks_dir / f"{TMP_PREFIX}removed-{uuid.uuid4().hex}"
    (blocks_dir / name).rename(gone)  # a crash before rmtree leaves a temp dir that opening a store removes
    shutil.rmtree(gone, ignore_errors=True)


def verify(store: str, repair: bool = False) -> int:
    """Check every block of an activation store (checksums, or a full read for older blocks).

    Args:
        store: activation store directory
        repair: remove the bad blocks, so that re-running extract writes exactly their rows again
    """
    path = Path(store)
    checks, incomplete = verify_store(path)
    bad = [c for c in checks if c.problems]
    unsealed = sum(not c.sealed for c in checks)
    rows = sum(c.rows or 0 for c in checks)
    print(f"checked {len(checks)} block{'s' * (len(checks) != 1)} ({rows} rows) of {path}"
          + (f"; {unsealed} written without checksums were read in full" if unsealed else ""))
    for c in bad:
        more = f" (+{len(c.problems) - 3} more)" if len(c.problems) > 3 else ""
        print(f"bad {c.name} ({'?' if c.rows is None else c.rows} rows): {'; '.join(c.problems[:3])}{more}")
    for name in incomplete:
        print(f"bad {name}: incomplete (no index.jsonl or zarr.json), not read by lit_sahs")
    images = verify_images(path, checks)
    for im in images:
        print(f"bad {im.file}: {im.problem}" + ("" if im.source else "; its original image is gone or changed"))
    names = [c.name for c in bad] + incomplete
    lost = sum(c.rows or 0 for c in bad)
    summary = {"store": str(path), "blocks": len(checks), "bad": names, "bad_images": [im.file for im in images]}
    if (names or images) and not repair:
        print(json.dumps({**summary, "removed": [], "restored_images": []}))
        what = [f"{len(names)} of {len(checks) + len(incomplete)} blocks ({lost} rows)"] if names else []
        what += [f"{len(images)} image copies"] if images else []
        raise LitSahsError(f"{' and '.join(what)} of activation store {path} are damaged: run "
                           f"`{PROG} {path} --repair` to " + ("remove the blocks, then re-run extract to rewrite "
                                                             "their rows" if names else "rewrite the image copies"))
    for name in names:
        remove_block(path / BLOCKS, name)
        print(f"removed {name}")
    restored = []
    for im in images:
        if im.source:
            atomic_write_bytes(path / im.file, Path(im.source).read_bytes())
            restored.append(im.file)
            print(f"restored {im.file} from {im.source}")
    if names:
        print(f"re-run the same extract command with --store {path} to write the {lost} removed rows again")
    elif not images:
        print("all blocks are good")
    print(json.dumps({**summary, "removed": names, "restored_images": restored}))
    lost_images = [im.file for im in images if not im.source]
    if lost_images:
        raise LitSahsError(f"{len(lost_images)} image copies of {path} could not be restored (their original "
                           f"images are gone or changed): {', '.join(lost_images[:3])}; the rows' activations are "
                           "intact, only their image copies are missing")
    return 0


def _argv(argv: list[str]) -> list[str]:
    """`STORE` -> `--store STORE`, a bare `--repair` -> `--repair=true` (the parser takes true/false)."""
    out = []
    for i, a in enumerate(argv):
        if i == 0 and not a.startswith("-"):
            out += ["--store", a]
        elif a == "--repair" and (i + 1 == len(argv) or argv[i + 1].lower() not in ("true", "false")):
            out.append("--repair=true")
        else:
            out.append(a)
    return out


def main(argv: list[str]) -> int:
    """`store verify STORE [--repair]`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] != "verify":
        raise LitSahsError(f"unknown store command {argv[0]!r}: use `{PROG} STORE [--repair]`")
    return run_command(verify, _argv(list(argv[1:])), PROG)
