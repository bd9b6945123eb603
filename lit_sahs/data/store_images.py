"""The activation store's copies of prompt images: every distinct image once, as
``images/<sha256>.<ext>`` inside the store.

A store must stay usable after the images its rows came from move or change (image caches are
rebuilt, user files are edited), so it keeps its own copy of each, written before the block that
refers to it commits. Naming a copy by the sha256 of its bytes stores an image shared by many
rows or attacks once, and lets two writers copy the same image without conflict.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from lit_sahs.errors import LitSahsError
from lit_sahs.io import TMP_PREFIX, atomic_write_bytes

IMAGES = "images"
IMAGE_FIELDS = ("image_sha256", "image_file")  # added by write_block to rows that have an image


def store_images(root: Path, rows: list[dict]) -> list[dict]:
    """Copy each row's image into ``<root>/images/`` under its content hash (once per distinct image)
    and record the hash in the row. A copy already there is written again only when its bytes do
    not hash to its name (a damaged copy is replaced, never reused)."""
    images_dir = root / IMAGES
    out, checked = [], set()
    for r in rows:
        src = r.get("image") if isinstance(r, dict) else None
        if not src:
            out.append(r)
            continue
        if r.get("image_sha256") and r.get("image_file") and (root / r["image_file"]).is_file():
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
        dest = root / rel
        if rel not in checked and not _intact(dest, sha):
            images_dir.mkdir(exist_ok=True)
            atomic_write_bytes(dest, data)  # same content from two writers: either rename wins
        checked.add(rel)
        out.append({**r, "image_sha256": sha, "image_file": rel})
    return out


def _intact(path: Path, sha: str) -> bool:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == sha
    except OSError:
        return False


def clean_partial_images(images_dir: Path) -> None:
    """Remove image copies a killed writer left half-done (temp files older than an hour)."""
    for p in images_dir.glob(TMP_PREFIX + "*"):
        try:
            if time.time() - p.stat().st_mtime > 3600:
                p.unlink(missing_ok=True)
        except OSError:
            pass
