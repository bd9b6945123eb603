"""What the refusal direction costs on the answer side: a guard whose every prompt is an answered row
(``answer_below`` 1.0: the worst case, every row decodes with the direction ablated) against the same
guard with the nudge alone, generate-N on one batch, in alternating pairs (the order flips every pair),
reporting the median of the per-pair ratios with a distribution-free 95% interval of that median.

    python experiments/benchmarks/answer_direction.py --detector artifacts/safevlm-heads/detector \\
        --direction artifacts/refusal-direction-qwen0.5b-effect.safetensors --pairs 16 --threads 2 \\
        --out experiments/results/answer_direction_benchmark.md

The ablation is one projection of each decoder layer's output per decode step (hooks on every layer), so
what it adds is mostly the hooks' Python calls; the prefill runs unchanged.
"""
from __future__ import annotations

import statistics
import sys
from datetime import datetime, timezone

import torch

from lit_sahs.commands import script_main
from lit_sahs.paired_timing import alternating_seconds, median_interval
from lit_sahs.errors import LitSahsError


def run(detector: str, direction: str, batch_size: int = 8, new_tokens: int = 128, pairs: int = 16,
        threads: int = 0, out: str = "") -> int:
    """Nudged + ablated / nudged alone, generate-`new_tokens` on `batch_size` benign prompts.

    Args:
        detector: a detector artifact (either family)
        direction: a refusal direction file for the detector's target
        batch_size: prompts per generate
        new_tokens: tokens generated per prompt (the same for both arms)
        pairs: alternating pairs
        threads: torch CPU threads (0: torch's default)
        out: also write the result as markdown here
    """
    if threads:
        torch.set_num_threads(threads)
    from lit_sahs.data.sources import load_source
    from lit_sahs.loading import load_detector_and_target

    det, target = load_detector_and_target(detector, None)
    texts = [s.text for s in load_source("truthfulqa", limit=batch_size, seed=0)]
    arms = {"nudged": det.make_guard(target, threshold=1.0, answer_below=1.0),
            "ablated": det.make_guard(target, threshold=1.0, answer_below=1.0, answer_direction=direction)}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def gen(name):
        return lambda: arms[name].generate(texts, **kw)

    for name in arms:  # warm-up; every row must be an answered row for the worst case
        res = gen(name)()
        if not all(res.answered):
            raise LitSahsError(f"{sum(res.answered)} of {len(texts)} rows are answered rows in the {name} arm: "
                               "the worst case needs every row")
    t = alternating_seconds({name: gen(name) for name in arms}, pairs)
    ratios = [b / a for a, b in zip(t["nudged"], t["ablated"])]
    low, high = median_interval(ratios)
    line = (f"{target.name}, {type(det).__name__}, batch {batch_size}, {new_tokens} new tokens, {pairs} pairs, "
            f"{torch.get_num_threads()} threads: nudged {statistics.median(t['nudged']):.3f} s, nudged + direction "
            f"ablated {statistics.median(t['ablated']):.3f} s; ratio median {statistics.median(ratios):.4f}, 95% interval "
            f"of the median {low:.4f}-{high:.4f}, range {min(ratios):.4f}-{max(ratios):.4f}")
    print(line, flush=True)
    if out:
        from lit_sahs.io import atomic_write_text

        cmd = "python experiments/benchmarks/answer_direction.py " + " ".join(sys.argv[1:])
        atomic_write_text(out, f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `{cmd}`:\n\n{line}.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
