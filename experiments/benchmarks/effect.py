"""First-order head scoring (lit_sahs.effect.first_order_effects) vs one real ablation per head.

On SmolLM2-135M-Instruct (30 layers x 9 heads = 270 heads) and the same harmful prompts, in one
run: scores every head's effect on the refusal probability at the prefill to first order (one
forward + backward per batch) and by real zero-ablation (one forward per head and batch), and
prints the time of each, their ratio, and how well the estimate tracks the real effect across all
heads (Spearman, Pearson, and the overlap of the top-10 heads).

    python experiments/benchmarks/effect.py                 # 8 AdvBench prompts, one batch
    python experiments/benchmarks/effect.py --n_prompts 32 --threads 2
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from lit_sahs.commands import script_main


def run(target: str = "smollm2-135m-instruct", n_prompts: int = 8, batch_size: int = 8,
        threads: Optional[int] = None) -> None:
    """First-order head scoring against one real ablation per head: time and agreement.

    Args:
        target: packaged target name
        n_prompts: AdvBench prompts scored
        batch_size: prompts per forward
        threads: torch CPU threads (default: torch's)
    """
    args = SimpleNamespace(**locals())
    if args.threads:
        torch.set_num_threads(args.threads)

    from lit_sahs.effect import ablation_scorer, first_order_effects, harmful_prompts, pearson, spearman
    from lit_sahs.refusal import encode_batches, refusal_token_ids
    from lit_sahs.targets import load_target

    target = load_target(args.target)
    g = target.geometry
    texts, _ = harmful_prompts(None, "advbench", args.n_prompts, seed=0)
    ids = refusal_token_ids(target.tokenizer)
    batches = encode_batches(target, texts, args.batch_size)
    score = ablation_scorer(target, batches, ids)
    score([])  # warm-up: first-call overheads are not counted on either side

    t0 = time.perf_counter()
    est, base = first_order_effects(target, batches, ids)
    t_first = time.perf_counter() - t0

    t0 = time.perf_counter()
    real = np.array([[score([(l, h)]) for h in range(g.num_heads)] for l in range(g.num_layers)]) - base
    t_real = time.perf_counter() - t0

    top = 10
    best_est = set(np.argsort(est.ravel())[:top].tolist())
    best_real = set(np.argsort(real.ravel())[:top].tolist())
    print(f"target {target.name}: {g.num_layers} layers x {g.num_heads} heads = {g.num_layers * g.num_heads} heads; "
          f"{len(texts)} AdvBench prompts in {len(batches)} batches; torch threads {torch.get_num_threads()}")
    tokens = [target.tokenizer.decode([i]) for i in ids]
    print(f"unablated refusal probability at the prefill: {base:.4f} (tokens {tokens})")
    print(f"first-order scoring of all heads: {t_first:.2f} s ({len(batches)} forward+backward)")
    print(f"real ablation, one per head:      {t_real:.2f} s ({g.num_layers * g.num_heads * len(batches)} forwards)")
    print(f"ratio: {t_real / t_first:.1f}x")
    print(f"estimate vs real over all heads: Spearman {spearman(est.ravel(), real.ravel()):.3f}, "
          f"Pearson {pearson(est.ravel(), real.ravel()):.3f}; top-{top} overlap {len(best_est & best_real)}/{top}")
    lr, hr = np.unravel_index(real.argmin(), real.shape)
    le, he = np.unravel_index(est.argmin(), est.shape)
    print(f"largest real drop: head {lr}.{hr} ({real[lr, hr]:+.4f}, estimate {est[lr, hr]:+.4f}); "
          f"largest estimated drop: head {le}.{he} ({est[le, he]:+.4f}, real {real[le, he]:+.4f})")


if __name__ == "__main__":
    raise SystemExit(script_main(run))
