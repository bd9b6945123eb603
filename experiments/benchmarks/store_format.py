"""Block layout: one chunk file per (layer, head) (the store's format) vs zarr v3's sharding codec (one
shard file per block, an inner chunk per head, crc32c per inner chunk and on the shard index).

On the same random block, alternating the two layouts per repeat, prints: files per block, write
seconds (zarr write only), full-block read seconds, and the seconds to read 8 heads of the block
(what a detector's DataModule does), plus bytes on disk.

    python experiments/benchmarks/store_format.py --geometry 30,9,64 --rows 256 --repeats 5
    python experiments/benchmarks/store_format.py --geometry 32,32,128 --rows 256   # LLaVA-7B shape
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from lit_sahs.commands import script_main


def write(path: Path, arr: np.ndarray, sharded: bool) -> float:
    n, L, H, D = arr.shape
    t = time.perf_counter()
    if sharded:
        z = zarr.create_array(store=str(path), shape=arr.shape, chunks=(n, 1, 1, D), shards=(n, L, H, D),
                              dtype="float16", fill_value=float("nan"), config={"write_empty_chunks": True},
                              compressors=[ZstdCodec(level=0), Crc32cCodec()], serializer=BytesCodec())
    else:
        z = zarr.create_array(store=str(path), shape=arr.shape, chunks=(n, 1, 1, D), dtype="float16",
                              fill_value=float("nan"), config={"write_empty_chunks": True})
    z[...] = arr
    return time.perf_counter() - t


def read_heads(path: Path, heads) -> float:
    t = time.perf_counter()
    z = zarr.open_array(str(path), mode="r")
    by_layer = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    for l, hs in by_layer.items():
        z.get_orthogonal_selection((slice(None), l, sorted(hs), slice(None)))
    return time.perf_counter() - t


def read_all(path: Path) -> float:
    t = time.perf_counter()
    zarr.open_array(str(path), mode="r")[...]
    return time.perf_counter() - t


def run(geometry: str = "30,9,64", rows: int = 256, repeats: int = 5) -> None:
    """Chunk file per head against one zarr shard per block: files, bytes, write and read seconds.

    Args:
        geometry: layers,heads,head_dim of the random block
        rows: rows of the block
        repeats: alternating repeats of both layouts
    """
    args = SimpleNamespace(**locals())
    L, H, D = (int(x) for x in args.geometry.split(","))
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((args.rows, L, H, D), dtype=np.float32).astype(np.float16)
    heads = [(int(rng.integers(L)), int(rng.integers(H))) for _ in range(8)]
    res = {False: {"write": [], "all": [], "heads": []}, True: {"write": [], "all": [], "heads": []}}
    files, size = {}, {}
    for _ in range(args.repeats):
        for sharded in (False, True):
            d = Path(tempfile.mkdtemp())
            try:
                res[sharded]["write"].append(write(d / "b", arr, sharded))
                res[sharded]["all"].append(read_all(d / "b"))
                res[sharded]["heads"].append(read_heads(d / "b", heads))
                fs = [p for p in (d / "b").rglob("*") if p.is_file()]
                files[sharded], size[sharded] = len(fs), sum(p.stat().st_size for p in fs)
                assert (zarr.open_array(str(d / "b"), mode="r")[...] == arr).all()
            finally:
                shutil.rmtree(d)
    print(f"block [{args.rows}, {L}, {H}, {D}] float16 ({arr.nbytes / 2 ** 20:.1f} MiB), {args.repeats} alternating "
          "repeats, medians (shared, contended CPU)")
    print("| layout | files | MiB on disk | write s | read all s | read 8 heads s |")
    print("|---|---|---|---|---|---|")
    for sharded, name in ((False, "chunk file per head (format 1)"), (True, "one shard, inner chunk per head")):
        r = res[sharded]
        print(f"| {name} | {files[sharded]} | {size[sharded] / 2 ** 20:.1f} | {statistics.median(r['write']):.3f} | "
              f"{statistics.median(r['all']):.3f} | {statistics.median(r['heads']):.4f} |")


if __name__ == "__main__":
    raise SystemExit(script_main(run))
