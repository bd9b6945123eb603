"""Extraction speed and memory, measured in one run on the same batches.

Prints: bare forward vs forward under HeadCapture (alternating, median of repeats; goal <= 1.02),
the extraction loop (`run_extraction` on an already loaded target: capture, extras, background
store writes, Lightning) against the bare forward on exactly the loop's batches, alternating
loop / forward per repeat (goal on the CPU: loop >= 80% of the forward's samples/s), with the
loop's start-up (store, Trainer, prompt length check) and teardown timed apart, the same loop
with inline (main-thread) store writes, and the peak RSS of extraction runs over two dataset
sizes (bounded by batch and block size, not by the number of samples).

    python experiments/benchmarks/extract.py --target smollm2-135m-instruct
    python experiments/benchmarks/extract.py --repeats 0 --ram_sizes '' --loop_samples 128 --loop_repeats 3
    python experiments/benchmarks/extract.py --repeats 0 --ram_sizes '' --loop_samples 64 --paired   # per batch
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from unittest import mock

import lightning as L
import torch

from lit_sahs import extract as _extract
from lit_sahs.capture_timing import alternate_bare_and_capture
from lit_sahs.commands import script_main
from lit_sahs.data.protocol import build_dataset
from lit_sahs.targets import load_target, prompting

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


class Clock(L.Callback):
    """Wall-clock marks of one extraction: loop start (after store, Trainer and target placement) and end
    (after the last block is committed)."""

    def __init__(self):
        self.marks = {}

    def on_predict_start(self, trainer, pl_module):
        self.marks["start"], self.marks["cpu_start"] = time.perf_counter(), time.process_time()

    def on_predict_end(self, trainer, pl_module):
        self.marks["end"], self.marks["cpu_end"] = time.perf_counter(), time.process_time()


class Paired(L.Callback):
    """Per batch, a bare forward of the same encoded batch inside the loop, so both see the same moment
    of a shared machine: before the loop's step on even batches, after it on odd ones (the first run
    of a new batch shape pays for allocations, so a fixed order would favour the second). `bare` sums
    those forwards; `loop` is predict's wall time (start to end, final flush and writer close
    included) minus them."""

    def __init__(self, model):
        self.model, self.bare, self.loop = model, 0.0, 0.0

    def _bare(self, batch):
        t = time.perf_counter()
        with torch.no_grad():
            self.model(**batch["enc"], logits_to_keep=1, use_cache=False)
        self.bare += time.perf_counter() - t

    def on_predict_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx % 2 == 0:
            self._bare(batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx % 2 == 1:
            self._bare(batch)

    def on_predict_end(self, trainer, pl_module):
        self.loop = time.perf_counter() - self._t0 - self.bare


def paired_per_batch(target, samples, args) -> None:
    loop_once(target, samples[: 2 * args.batch_size], args.batch_size, args.block_rows)  # warm-up
    for extras in (True, False):
        cb = Paired(target.model)
        with tempfile.TemporaryDirectory() as d, mock.patch.object(
                _extract, "HeadExtractor", lambda *a, _x=extras, _e=_extract.HeadExtractor, **k: _e(*a, baselines=_x, **k)):
            _extract.run_extraction(target, samples, f"{d}/store", batch_size=args.batch_size,
                                    block_rows=args.block_rows, trainer_kwargs={**TRAINER, "callbacks": [cb]})
        print(f"paired per batch ({'with' if extras else 'without'} baseline extras): bare forward {cb.bare:.2f}s "
              f"({len(samples) / cb.bare:.2f} samples/s), loop {cb.loop:.2f}s ({len(samples) / cb.loop:.2f} "
              f"samples/s), loop/forward {cb.bare / cb.loop:.3f}")


def loop_once(target, samples, batch_size, block_rows, background=True, extras=True) -> dict:
    clock = Clock()
    writer, extractor = _extract.StoreWriter, _extract.HeadExtractor
    with tempfile.TemporaryDirectory() as d, mock.patch.object(
            _extract, "StoreWriter", lambda *a, **k: writer(*a, background=background, **k)), mock.patch.object(
            _extract, "HeadExtractor", lambda *a, **k: extractor(*a, baselines=extras, **k)):
        t0 = time.perf_counter()
        _extract.run_extraction(target, samples, f"{d}/store", batch_size=batch_size, block_rows=block_rows,
                                trainer_kwargs={**TRAINER, "callbacks": [clock]})
        t1 = time.perf_counter()
    return {"startup": clock.marks["start"] - t0, "loop": clock.marks["end"] - clock.marks["start"],
            "teardown": t1 - clock.marks["end"], "cpu": clock.marks["cpu_end"] - clock.marks["cpu_start"]}


def loop_batches(target, samples, batch_size) -> list[dict]:
    """The loop's own batches: its sort order, its batch composition, its collate function."""
    todo = sorted(samples, key=lambda s: (len(s.text), s.id))
    collate = _extract.EncodeBatch(target)
    return [collate(todo[i:i + batch_size])["enc"] for i in range(0, len(todo), batch_size)]


def bare_seconds(model, batches) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of a bare forward over `batches`."""
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in batches:
            model(**b, logits_to_keep=1, use_cache=False)
    return time.perf_counter() - t, time.process_time() - c


def loop_vs_forward(target, args) -> None:
    samples = build_dataset(harmful=("advbench",), benign=("truthfulqa", "sharegpt"), attacks=("plain", "pyrit"),
                            limit=args.loop_samples, seed=0, max_chars=args.max_chars)
    n = len(samples)
    if args.paired:
        paired_per_batch(target, samples, args)
        return
    batches = loop_batches(target, samples, args.batch_size)
    bare_seconds(target.model, batches[:2])  # warm-up
    loop_once(target, samples[: 2 * args.batch_size], args.batch_size, args.block_rows)
    bare, bare_cpu, loops, inline, plain = [], [], [], [], []
    for i in range(args.loop_repeats):  # alternating, so drift on a shared machine hits all of them
        wall, cpu = bare_seconds(target.model, batches)
        bare.append(wall)
        bare_cpu.append(cpu)
        loops.append(loop_once(target, samples, args.batch_size, args.block_rows))
        plain.append(loop_once(target, samples, args.batch_size, args.block_rows, extras=False))
        if args.inline:
            inline.append(loop_once(target, samples, args.batch_size, args.block_rows, background=False))
        print(f"repeat {i}: wall (CPU) s: bare {wall:.2f} ({cpu:.2f}), loop {loops[-1]['loop']:.2f} "
              f"({loops[-1]['cpu']:.2f}), no extras {plain[-1]['loop']:.2f} ({plain[-1]['cpu']:.2f})"
              + (f", inline writes {inline[-1]['loop']:.2f} ({inline[-1]['cpu']:.2f})" if inline else ""))
    mb = statistics.median(bare)
    mp = statistics.median(r["loop"] for r in plain)
    cb = statistics.median(bare_cpu)
    print(f"CPU seconds (this process, all threads; less sensitive to other jobs than wall time): "
          f"forward/loop {cb / statistics.median(r['cpu'] for r in loops):.3f}, "
          f"forward/loop-without-extras {cb / statistics.median(r['cpu'] for r in plain):.3f}")
    ml = statistics.median(r["loop"] for r in loops)
    mi = statistics.median(r["loop"] for r in inline) if inline else float("nan")
    print(f"loop vs forward: {n} samples, batch {args.batch_size}, block_rows {args.block_rows}, "
          f"{args.loop_repeats} alternating repeats, torch threads {torch.get_num_threads()}")
    print(f"bare forward (loop's batches, pre-encoded)  median {mb:.2f}s  {n / mb:.1f} samples/s")
    print(f"extraction loop, background writes          median {ml:.2f}s  {n / ml:.1f} samples/s  "
          f"loop/forward {mb / ml:.3f} (goal >= 0.80); per repeat "
          + ", ".join(f"{b / r['loop']:.3f}" for b, r in zip(bare, loops)))
    print(f"extraction loop, inline writes              median {mi:.2f}s  {n / mi:.1f} samples/s  "
          f"loop/forward {mb / mi:.3f}")
    print(f"extraction loop, no baseline extras         median {mp:.2f}s  {n / mp:.1f} samples/s  "
          f"loop/forward {mb / mp:.3f} (HeadExtractor(baselines=False): no residuals, prompt NLL, refusal)")
    print(f"start-up (store, Trainer, length check) median {statistics.median(r['startup'] for r in loops):.2f}s, "
          f"teardown median {statistics.median(r['teardown'] for r in loops):.2f}s (not in the loop figures)")

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


def run(target: str = "smollm2-135m-instruct", batch_size: int = 8, batches: int = 4, repeats: int = 5,
        ram_sizes: str = "64,256", max_chars: int = 1200, loop_samples: int = 128, loop_repeats: int = 3,
        block_rows: int = 64, inline: bool = False, paired: bool = False) -> None:
    """Capture overhead, extraction loop against the bare forward, and peak RAM of extraction.

    Args:
        target: packaged target name
        batch_size: prompts per batch
        batches: batches per timed pass of the capture timing
        repeats: alternating bare/captured repeats (0: skip the capture timing and the RAM runs)
        ram_sizes: dataset sizes for the peak-RAM runs
        max_chars: longest attacked prompt (template choice)
        loop_samples: samples per loop-vs-forward repeat
        loop_repeats: loop-vs-forward repeats (0 skips that section)
        block_rows: store rows per block in the loop
        inline: also time the loop with inline (main-thread) writes
        paired: loop vs forward paired per batch inside one loop (robust to a machine whose load drifts)
    """
    args = SimpleNamespace(**locals())
    sys.stdout.reconfigure(line_buffering=True)  # lines appear as measured, also when piped

    t = time.perf_counter()
    target = load_target(args.target)
    print(f"load_target {args.target}: {time.perf_counter() - t:.2f}s")
    if args.loop_repeats:
        loop_vs_forward(target, args)
    if not args.repeats:
        print(f"this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        return
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
    raise SystemExit(script_main(run))
