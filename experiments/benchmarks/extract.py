"""Extraction speed and memory, measured in one run on the same batches.

Prints: bare forward vs forward under HeadCapture (alternating, median of repeats; goal <= 1.02),
prompts per second through the extraction loop, and the peak RSS of extraction runs over two
dataset sizes (bounded by batch and block size, not by the number of samples).

    python experiments/benchmarks/extract.py --target smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile

import torch

from capture_timing import alternate_bare_and_capture
from lit_sahs.data.protocol import build_dataset
from lit_sahs.targets import load_target, prompting

CHILD = """
import json, resource, sys, time
from lit_sahs.data.protocol import build_dataset
from lit_sahs.extract import run_extraction
n, target, store, bs = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
samples = build_dataset(harmful=("advbench",), benign=("truthfulqa",), attacks=("plain",), limit=n, seed=1)
t = time.perf_counter()
run_extraction(target, samples, store, batch_size=bs, block_rows=64,
               trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
print(json.dumps({"n": len(samples), "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # lines appear as measured, also when piped
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ram_sizes", default="64,256", help="dataset sizes for the peak-RAM runs")
    ap.add_argument("--max_chars", type=int, default=1200, help="longest attacked prompt (template choice)")
    args = ap.parse_args()

    target = load_target(args.target)
    n = args.batch_size * args.batches
    samples = build_dataset(harmful=("advbench",), benign=("truthfulqa", "sharegpt"), attacks=("plain", "pyrit"),
                            limit=n, seed=0, max_chars=args.max_chars)
    batches = [prompting.encode(target, [s.text for s in samples[i:i + args.batch_size]])
               for i in range(0, len(samples), args.batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    t = alternate_bare_and_capture(target.model, batches, args.repeats)
    mb, mc, ratios = t["bare"], t["captured"], t["ratios"]
    print(f"target {args.target}: {len(samples)} prompts, {tokens} tokens, batch {args.batch_size}, "
          f"{args.repeats} alternating repeats, torch threads {torch.get_num_threads()}")
    print(f"bare forward      median {mb:.3f}s  ({len(samples) / mb:.1f} prompts/s)")
    print(f"under HeadCapture median {mc:.3f}s  ({len(samples) / mc:.1f} prompts/s)")
    print(f"capture/bare ratio of medians {mc / mb:.4f} (goal <= 1.02); per-repeat ratios "
          f"min {ratios[0]:.4f} median {statistics.median(ratios):.4f} max {ratios[-1]:.4f}")
    for size in [int(x) for x in args.ram_sizes.split(",") if x.strip()]:
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run([sys.executable, "-c", CHILD, str(size), args.target, f"{d}/store",
                                  str(args.batch_size)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"extraction loop, {r['n']} plain prompts: {r['n'] / r['seconds']:.1f} prompts/s end to end, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
