"""`locate` and the cached DataModule on stores larger than the memory they are given.

Builds synthetic stores of several sizes (random fp16 activations with a planted class signal in a
few heads, real block format: zarr + zstd + checksums) under --dir, and for each runs, in a fresh
process:

* `locate(store, memory_budget=B)`: heads fitted a chunk at a time (--max_iter Newton steps; the
  memory does not depend on the step count, so a few keep the run short);
* a `CachedActivationDataModule` over all heads with `max_memory_mb` below the store's size, so it
  streams block by block, iterated once over its train split;

and prints each one's peak RSS next to the store's size (goal: flat, set by the budget and one
block, not by the store). Stores are deleted after use.

    python experiments/benchmarks/locate_large.py --sizes_gb 1,4 --dir /tmp
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lit_sahs.commands import script_main
from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.heads import Geometry, TargetFingerprint

CHILD = r"""
import json, resource, sys, time
mode, store, budget_mb, max_iter = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import torch
from lit_sahs.data.store import ActivationStore
from lit_sahs.locate import locate
from lit_sahs.data.datamodules import CachedActivationDataModule
s = ActivationStore.open(store)
base = rss()
t = time.perf_counter()
if mode == "locate":
    r = locate(s, memory_budget=budget_mb * 2**20, max_iter=max_iter)
    extra = {"chunks": len(r.meta["probe"]["head_chunks"]), "top": r.scores[0]["layer"], "top_head": r.scores[0]["head"]}
else:
    dm = CachedActivationDataModule(store, all_heads=True, max_memory_mb=budget_mb, batch_size=1024)
    dm.setup("fit")
    n = 0
    for b in dm.train_dataloader():
        n += len(b["y"]) if isinstance(b, dict) and "y" in b else len(b[next(iter(b))]) if isinstance(b, dict) else len(b[0])
    extra = {"in_memory": dm.in_memory, "train_rows": n}
print(json.dumps({"base_rss_mb": base, "peak_rss_mb": rss(), "seconds": time.perf_counter() - t, **extra}))
"""


def build(path: Path, geometry: Geometry, size_bytes: int, block_rows: int, seed: int = 0) -> int:
    fp = TargetFingerprint("synthetic-large", geometry, "d" * 64)
    store = ActivationStore.create_or_open(path, fp, "rule", {"fmt": "synthetic"})
    rng = np.random.default_rng(seed)
    row_bytes = int(np.prod(geometry.shape)) * 2
    n_rows = max(block_rows, size_bytes // row_bytes)
    pool = rng.standard_normal((block_rows,) + geometry.shape, dtype=np.float32).astype(np.float16)
    signal = {(geometry.num_layers // 2, 1): 1.0, (geometry.num_layers - 1, 3): 0.5}
    families = ("plain", "dan", "pliny")
    written = 0
    while written < n_rows:
        n = min(block_rows, n_rows - written)
        acts = np.roll(pool, int(rng.integers(block_rows)), axis=0)[:n].copy()
        labels = rng.integers(0, 2, n)
        for (l, h), s in signal.items():
            acts[:, l, h, :4] += (s * (2 * labels - 1)).astype(np.float16)[:, None]
        rows = [Sample(id=f"r{written + i}", text=f"prompt {written + i}", label=int(labels[i]),
                       source=f"src{(written + i) % 4}", attack=families[i % 3], attack_family=families[i % 3],
                       base_id=f"b{written + i}").index_row() for i in range(n)]
        store.write_block(rows, acts)
        written += n
    return written


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(sizes_gb: str = "1,4", geometry: str = "16,16,64", block_rows: int = 2048, budget_mb: int = 256,
        max_iter: int = 3, dir: str = "/tmp", skip: str = "") -> None:
    """Peak RSS of `locate` and the cached DataModule on synthetic stores larger than their memory budget.

    Args:
        sizes_gb: comma-separated store sizes in GB
        geometry: layers,heads,head_dim
        block_rows: store rows per block
        budget_mb: locate memory_budget and DataModule max_memory_mb
        max_iter: locate's Newton steps
        dir: where the stores are built (deleted after use)
        skip: comma-separated modes to skip: locate,datamodule
    """
    args = SimpleNamespace(**locals())
    sys.stdout.reconfigure(line_buffering=True)
    geometry = Geometry(*(int(x) for x in args.geometry.split(",")))
    skip = {m for m in args.skip.split(",") if m}
    print(f"geometry {geometry.shape}, block_rows {args.block_rows}, budget {args.budget_mb} MB, "
          f"locate max_iter {args.max_iter}")
    print("| store on disk | rows | mode | peak RSS (MB) | RSS after open (MB) | seconds | notes |")
    print("|---|---|---|---|---|---|---|")
    for gb in (float(x) for x in args.sizes_gb.split(",")):
        d = Path(tempfile.mkdtemp(prefix="lit_sahs_large_", dir=args.dir))
        try:
            t = time.perf_counter()
            rows = build(d / "store", geometry, int(gb * 2 ** 30), args.block_rows)
            size = du(d / "store")
            print(f"(built {size / 2 ** 30:.2f} GiB, {rows} rows in {time.perf_counter() - t:.0f}s)")
            for mode in ("locate", "datamodule"):
                if mode in skip:
                    continue
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(d / "store"), str(args.budget_mb),
                                      str(args.max_iter)], capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-3000:])
                    raise SystemExit(out.returncode)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                notes = {k: v for k, v in r.items() if k not in ("base_rss_mb", "peak_rss_mb", "seconds")}
                print(f"| {size / 2 ** 30:.2f} GiB | {rows} | {mode} | {r['peak_rss_mb']:.0f} | "
                      f"{r['base_rss_mb']:.0f} | {r['seconds']:.0f} | {json.dumps(notes)} |")
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(script_main(run))
