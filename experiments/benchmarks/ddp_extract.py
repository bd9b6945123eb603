"""Extraction throughput with 1 vs N DDP processes on the CPU, measured in one run on the same prompts.

Each configuration runs in a fresh worker process (`--worker`), so both pay the same start-up; with
N > 1 the worker extracts under Lightning's plain `ddp` strategy, whose launcher re-runs the worker
as the other ranks, as `python -m lit_sahs extract --trainer.strategy ddp` does. Printed per
configuration: the predict loop's samples/s (first batch to the last block written by any rank,
rank 0's clock) and end to end (run_extraction, including starting and importing the other
ranks), then the N/1 ratios of the medians; `--repeats` alternates the configurations, and the load
average is printed, since a shared machine skews such a comparison. On a CPU the ranks share the
cores (Lightning gives each cores/N threads), so the ratio measures what DDP's sharding costs or
gains over one process's intra-op threads, not more hardware; a third configuration, one process
with one thread (OMP_NUM_THREADS=1), separates the two.

    python experiments/benchmarks/ddp_extract.py --target smollm2-135m-instruct --samples 64
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

from lit_sahs.commands import script_main


def run_worker(args) -> None:
    import lightning as L
    import torch

    from lit_sahs.data.protocol import build_dataset
    from lit_sahs.extract import run_extraction

    class LoopClock(L.Callback):
        """Rank 0's time from its first batch to the end of predicting, once every rank has written its blocks."""

        def on_predict_batch_start(self, trainer, *a, **k):
            if not hasattr(self, "t0"):
                self.t0 = time.perf_counter()

        def on_predict_end(self, trainer, pl_module):
            trainer.strategy.barrier("loop clock")
            self.seconds = time.perf_counter() - self.t0

    samples = build_dataset(harmful=("advbench",), benign=("truthfulqa",), attacks=("plain",), limit=args.samples,
                            seed=0)
    clock = LoopClock()
    kw = {"accelerator": "cpu", "devices": args.processes, "enable_progress_bar": False, "callbacks": [clock]}
    if args.processes > 1:
        kw["strategy"] = "ddp"
    t = time.perf_counter()
    result = run_extraction(args.target, samples, args.store, batch_size=args.batch_size, block_rows=64,
                            trainer_kwargs=kw)
    total = time.perf_counter() - t
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print("RESULT " + json.dumps({"processes": args.processes, "n": result["written"], "loop_s": clock.seconds,
                                      "total_s": total, "threads": torch.get_num_threads()}), flush=True)


def run(target: str = "smollm2-135m-instruct", samples: int = 128, batch_size: int = 8, processes: int = 2,
        repeats: int = 1, worker: bool = False, store: Optional[str] = None) -> None:
    """Extraction throughput with 1 vs N DDP processes on the CPU, same prompts, one run.

    Args:
        target: packaged target name
        samples: prompts extracted per configuration
        batch_size: prompts per batch
        processes: the DDP configuration compared with one process
        repeats: alternating runs of each configuration
        worker: internal: run one configuration (the script starts itself with it)
        store: internal: the worker's store directory
    """
    args = SimpleNamespace(**locals())
    if args.worker:
        return run_worker(args)
    sys.stdout.reconfigure(line_buffering=True)
    print("load average at start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    configs = [(1, None), (args.processes, None), (1, 1)]  # (processes, OMP_NUM_THREADS)
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as d:
        for i, (n, threads) in enumerate(configs * args.repeats):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--target", args.target, "--samples",
                   str(args.samples), "--batch_size", str(args.batch_size), "--processes", str(n),
                   "--store", f"{d}/store-{i}"]
            env = {k: v for k, v in os.environ.items()
                   if k not in ("MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"worker with {n} process(es) failed:\n{out.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            runs[(n, threads)].append(r)
            print(f"{n} process(es), {r['threads']} torch threads each: {r['n']} prompts, predict loop "
                  f"{r['loop_s']:.1f} s = {r['n'] / r['loop_s']:.2f} samples/s; end to end {r['total_s']:.1f} s "
                  f"= {r['n'] / r['total_s']:.2f} samples/s")
    print("load average at end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    one, many, single = ({k: statistics.median(r[k] for r in runs[c]) for k in ("loop_s", "total_s")}
                         for c in configs)
    print(f"target {args.target}, batch {args.batch_size}, {os.cpu_count()} CPU cores, {args.repeats} run(s) each: "
          f"{args.processes} processes / 1 process throughput = {one['loop_s'] / many['loop_s']:.2f} (predict loop), "
          f"{one['total_s'] / many['total_s']:.2f} (end to end); against 1 process with 1 thread "
          f"{single['loop_s'] / many['loop_s']:.2f} (predict loop), "
          f"{single['total_s'] / many['total_s']:.2f} (end to end)")


if __name__ == "__main__":
    raise SystemExit(script_main(run))
