"""On-disk cache for targets: assembled GGUF files, dequantized weights, file hashes.

Dequantizing a GGUF costs seconds to tens of seconds on every load, so the dequantized weights
are saved once as safetensors (plus tokenizer files) under a key derived from the GGUF's
sha256, and later loads read those. Every cache entry is written under a temporary name and
renamed into place, so a killed process never leaves a half entry that looks complete.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
from tqdm.auto import tqdm

from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_dir, atomic_file, atomic_write_text


def cache_root() -> Path:
    root = Path(os.environ.get("LIT_SAHS_CACHE", Path.home() / ".cache" / "lit_sahs"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) since weight files are large."""
    path = Path(path).resolve()
    st = path.stat()
    memo_dir = cache_root() / "hashes"
    memo_dir.mkdir(exist_ok=True)
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = memo_dir / key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f, _bytes_bar(st.st_size, f"hashing {path.name}") as bar:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            bar.update(len(chunk))
    digest = h.hexdigest()
    atomic_write_text(memo, digest)
    return digest


def verify_gguf(path: Path) -> None:
    """A GGUF is whole when it parses and its last tensor ends exactly at the end of the file."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LitSahsError(f"{path} is not a valid GGUF file ({e}): delete it and reassemble") from None
    if not reader.tensors:
        raise LitSahsError(f"{path} holds no tensors: delete it and reassemble")
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    size = path.stat().st_size
    if end != size:
        raise LitSahsError(f"{path} is truncated or padded: last tensor ends at byte {end}, file has {size}")


def assemble_parts(parts: list[Path], dest: Path) -> Path:
    """Concatenate chunk files in order into `dest`, verify it, then move it into place."""
    if dest.exists():
        return dest
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise LitSahsError(f"missing model chunk files {missing}: run `bash scripts/setup.sh`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dest) as tmp:
        with open(tmp, "wb") as out, _bytes_bar(sum(p.stat().st_size for p in parts), f"assembling {dest.name}") as bar:
            for p in parts:
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        verify_gguf(tmp)
    return dest


def _bytes_bar(total: int, desc: str) -> tqdm:
    """A progress bar over bytes on stderr; off when stderr is not a terminal. (Dequantizing shows
    transformers' own bar over the GGUF's tensors.)"""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None,
                dynamic_ncols=True, leave=False)


def dequantized_dir(gguf_path: Path) -> tuple[Path, str]:
    """(cache directory for this GGUF's dequantized weights, the GGUF's sha256)."""
    digest = file_sha256(gguf_path)
    return cache_root() / "dequantized" / digest[:24], digest


def publish_dir(build, dest: Path) -> Path:
    """Run build(tmp_dir) and rename the result to dest; a crash leaves no `dest`."""
    return atomic_dir(dest, build, marker="lit_sahs_complete.json")
