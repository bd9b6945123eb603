"""Where the time of a CPU extraction goes: cProfile of `run_extraction` on a packaged target.

Groups the profile's cumulative times into the stages of the loop and prints a markdown table
(the shares are of the profiled run; cProfile instruments every Python call, so Python-heavy
stages such as tokenisation and Lightning's loop look somewhat larger than they are unprofiled,
and the C++ forward somewhat smaller). The same run unprofiled is timed first for reference.

    python experiments/benchmarks/extract_profile.py --target smollm2-135m-instruct --n 128 \
        --out experiments/results/extract_profile.md
"""
from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

import torch

from lit_sahs.commands import script_main
from lit_sahs.data.protocol import build_dataset
from lit_sahs.extract import run_extraction
from lit_sahs.targets import load_target

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}

# stage -> (file suffix, function name); the cumulative time of the first match (the largest)
STAGES = [
    ("run_extraction (everything after load_target)", "lit_sahs/extract.py", "run_extraction"),
    ("  prompt length check (fit_context, tokenises every prompt once)", "prompting.py", "fit_context"),
    ("  store open / pending ids", "lit_sahs/extract.py", "pending_samples"),
    ("  Trainer construction", "lit_sahs/extract.py", "_extraction_trainer"),
    ("  trainer.predict", "trainer/trainer.py", "predict"),
    ("    tokenisation + collate (EncodeBatch)", "lit_sahs/extract.py", "__call__"),
    ("    predict_step", "lit_sahs/extract.py", "predict_step"),
    ("      target forward (the CausalLM's forward, incl. capture hooks)", "transformers/models/", "forward"),
    ("      all nn.Module calls (forward + the extras' own module calls)", "torch/nn/modules/module.py", "_call_impl"),
    ("      prompt NLL (baseline extra)", "lit_sahs/hooks.py", "prompt_nll"),
    ("    store writes (StoreWriter.flush)", "lit_sahs/extract.py", "flush"),
    ("      zarr array write", "lit_sahs/data/blocks.py", "write_block_files"),
    ("      checksums (seal_block)", "lit_sahs/data/blocks.py", "seal_block"),
    ("      store refresh (re-list blocks)", "lit_sahs/data/store.py", "refresh"),
]


def cumulative(stats: pstats.Stats, suffix: str, func: str) -> tuple[float, int]:
    best = (0.0, 0)
    for (file, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
        file = file.replace("\\", "/")
        if name == func and (file.endswith(suffix) or (suffix.endswith("/") and suffix in file)) and ct > best[0]:
            best = (ct, nc)
    return best


def run(target: str = "smollm2-135m-instruct", n: int = 128, batch_size: int = 8, block_rows: int = 64,
        max_chars: int = 1200, out: Optional[str] = None) -> None:
    """cProfile of one CPU extraction, grouped into the loop's stages (markdown table).

    Args:
        target: packaged target name
        n: samples extracted
        batch_size: prompts per batch
        block_rows: store rows per block
        max_chars: longest attacked prompt (template choice)
        out: write the table (markdown) here too
    """
    args = SimpleNamespace(**locals())

    t = time.perf_counter()
    target = load_target(args.target)
    load_s = time.perf_counter() - t
    samples = build_dataset(harmful=("advbench",), benign=("truthfulqa", "sharegpt"), attacks=("plain", "pyrit"),
                            limit=args.n, seed=0, max_chars=args.max_chars)
    with tempfile.TemporaryDirectory() as d:  # unprofiled reference run (also warms caches)
        t = time.perf_counter()
        run_extraction(target, samples, f"{d}/store", batch_size=args.batch_size, block_rows=args.block_rows,
                       trainer_kwargs=dict(TRAINER))
        plain_s = time.perf_counter() - t
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        prof.enable()
        run_extraction(target, samples, f"{d}/store", batch_size=args.batch_size, block_rows=args.block_rows,
                       trainer_kwargs=dict(TRAINER))
        prof.disable()
        prof_s = time.perf_counter() - t
    stats = pstats.Stats(prof)
    total = cumulative(stats, "lit_sahs/extract.py", "run_extraction")[0]
    lines = [f"target {args.target}, {len(samples)} samples (advbench/truthfulqa/sharegpt, plain+pyrit, "
             f"max_chars {args.max_chars}), batch {args.batch_size}, block_rows {args.block_rows}, "
             f"torch threads {torch.get_num_threads()}, CPU",
             f"load_target {load_s:.2f}s (not in the table); run_extraction unprofiled {plain_s:.2f}s "
             f"({len(samples) / plain_s:.1f} samples/s), profiled {prof_s:.2f}s",
             "", "| stage | seconds (cumulative, profiled) | share of run_extraction | calls |", "|---|---|---|---|"]
    accounted = 0.0
    for label, suffix, func in STAGES:
        ct, nc = cumulative(stats, suffix, func)
        lines.append(f"| {label} | {ct:.2f} | {100 * ct / total:.1f}% | {nc} |")
    fwd = cumulative(stats, "transformers/models/", "forward")[0]
    collate = cumulative(stats, "lit_sahs/extract.py", "__call__")[0]
    writes = cumulative(stats, "lit_sahs/extract.py", "flush")[0]
    step = cumulative(stats, "lit_sahs/extract.py", "predict_step")[0]
    predict = cumulative(stats, "trainer/trainer.py", "predict")[0]
    accounted = step + collate + writes
    lines.append(f"| Lightning loop overhead (trainer.predict - predict_step - collate - writes) | "
                 f"{predict - accounted:.2f} | {100 * (predict - accounted) / total:.1f}% | |")
    lines.append(f"| predict_step outside the target's forward (extras: prompt NLL, copies, index rows) | "
                 f"{step - fwd:.2f} | {100 * (step - fwd) / total:.1f}% | |")
    text = "\n".join(lines)
    print(text)
    print("\ntop 25 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(25)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    raise SystemExit(script_main(run))
