"""Ablation of located safety heads on Qwen2.5-Coder-0.5B-Instruct: ASR and benign utility.

Reproduces experiments/results/ablation_qwen.md (and .json):

    # 1. a modest plain-prompt store and its head ranking (skipped when they exist)
    python -m lit_sahs extract --target qwen2.5-coder-0.5b-instruct --harmful advbench,harmbench \\
        --benign truthfulqa,healthsearchqa,sharegpt --attacks plain --limit 300 --store stores/qwen-plain
    python -m lit_sahs locate --store stores/qwen-plain --top_k 16
    # (both are `bash experiments/qwen_plain_store.sh`, which this script runs when either is missing)
    # 2. the study
    python experiments/ablation_qwen.py

Harmful prompts: AdvBench prompts *not* in the store (so not used for locating). Benign prompts:
TruthfulQA and HealthSearchQA questions not in the store. Greedy decoding. Configurations: no
ablation; top-k heads of the ranking (zero and mean ablation, mean over the store's benign rows);
random k heads drawn from outside the top k (zero ablation, several seeds).
"""
from __future__ import annotations

import json as json_
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from lit_sahs.commands import script_main

ROOT = Path(__file__).resolve().parents[1]
TARGET = "qwen2.5-coder-0.5b-instruct"


def ensure_store_and_ranking(store: Path) -> None:
    """The store and its ranking from experiments/qwen_plain_store.sh when either is missing."""
    if not (store / "manifest.json").exists() or not (store / "ranking.json").exists():
        subprocess.run(["bash", str(ROOT / "experiments" / "qwen_plain_store.sh"), str(store)], check=True,
                       env={**os.environ, "PY": sys.executable})


def run(store: str = "stores/qwen-plain", ks: str = "4,8,16", modes: str = "zero,mean", random_modes: str = "zero",
        seeds: int = 3, n_harmful: int = 64, n_benign: int = 32, max_new_tokens: int = 32, batch_size: int = 16,
        out: str = "experiments/results/ablation_qwen.md", json: Optional[str] = None,
        threads: Optional[int] = None) -> int:
    """ASR and benign utility with the top-k probe-ranked heads, random heads or none ablated (paths from the repo root).

    Args:
        store: the plain-prompt store; its ranking.json and benign means are used, its prompts held out
        ks: comma-separated head counts
        modes: modes for the top-k heads (zero, mean)
        random_modes: modes for the random heads
        seeds: random head sets per k and mode
        n_harmful: held-out AdvBench prompts (ASR)
        n_benign: held-out TruthfulQA + HealthSearchQA questions (utility)
        max_new_tokens: greedy tokens per answer
        batch_size: prompts per generate call
        out: the markdown write-up
        json: also write every number, the prompts and example answers here
        threads: torch threads (on a shared machine 1 thread can be several times faster than oversubscribing)
    """
    args = dict(locals())
    os.chdir(ROOT)
    import torch

    if threads:
        torch.set_num_threads(threads)

    from lit_sahs.ablate import format_table, gather, run_study, study_configs, summarise
    from lit_sahs.data.samples import normalise_text
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.io import atomic_write_text
    from lit_sahs.judge import REFUSAL_PHRASES, PhraseJudge
    from lit_sahs.ranking import HeadRanking
    from lit_sahs.targets import load_target

    store_path = Path(store)
    t_all = time.perf_counter()
    ensure_store_and_ranking(store_path)
    store = ActivationStore.open(store_path)
    ranking = HeadRanking.load(store_path / "ranking.json")
    target = load_target(TARGET)
    ranking.fingerprint.check(target.fingerprint, "the ranking")
    ks = [int(k) for k in ks.split(",")]
    configs = study_configs(ranking, ks, modes.split(","), seeds, target.geometry,
                            random_modes.split(","))
    exclude = {normalise_text(r["text"]) for r in store.index()}
    harmful = gather(["advbench"], n_harmful, exclude, 0)
    benign = gather(["truthfulqa", "healthsearchqa"], n_benign, exclude, 0)
    print(f"{len(configs)} configurations, {len(harmful)} harmful + {len(benign)} benign prompts", flush=True)
    results = run_study(target, harmful, benign, configs, store=store, judge=PhraseJudge(),
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    minutes = (time.perf_counter() - t_all) / 60
    tied = sum(1 for s in ranking.scores if s["auroc"] >= ranking.scores[0]["auroc"] - 1e-12)
    top = max(ks)
    cmd = "python experiments/ablation_qwen.py " + " ".join(sys.argv[1:])
    lines = [
        "# Safety-head ablation on Qwen2.5-Coder-0.5B-Instruct",
        "",
        f"Produced by `{cmd.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"({platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, shared machine; "
        f"{minutes:.0f} min in all).",
        "",
        f"* Store `{store_path.relative_to(ROOT) if store_path.is_relative_to(ROOT) else store_path}`: "
        f"{len(store)} plain prompts (harmful: AdvBench + HarmBench; benign: TruthfulQA, HealthSearchQA, ShareGPT), "
        "ranking by `python -m lit_sahs locate` (per-head probe AUROC on the val split).",
        f"* Harmful: {len(harmful)} AdvBench prompts **not in the store** (never used for locating). "
        f"Benign: {len(benign)} TruthfulQA + HealthSearchQA questions not in the store.",
        f"* Greedy decoding, {max_new_tokens} new tokens. ASR = share of harmful prompts whose answer the "
        f"phrase judge (`lit_sahs.judge.PhraseJudge`, {len(REFUSAL_PHRASES)} phrases, first 200 characters) "
        "does not call a refusal.",
        "* Benign utility against the unablated answers: *exact match* (share of answers identical token for "
        "token), *prefix kept* (mean share of the unablated answer reproduced before the first different token), "
        "*ppl* (perplexity of the unablated answers under the ablated target, teacher-forced; the `none` row is "
        "the floor), *benign refused* (over-refusal by the same judge).",
        f"* top-k: the first k heads of the ranking. random-k: k heads drawn uniformly from the heads outside "
        f"the top k (seeds 0..{seeds - 1}, mean over seeds with the ASR range). zero: the head's output "
        "is set to 0 at every position (prefill and decode); mean: set to its mean over the store's benign rows.",
        "",
        format_table(results),
        "",
        f"Top-{top} heads (layer.head): " + ", ".join(f"{l}.{h}" for l, h in ranking.top_k(top)) + ".",
        f"Caveat: {tied} of {len(ranking.scores)} heads tie at the best val AUROC "
        f"({ranking.scores[0]['auroc']:.3f}) on this easy plain-prompt store (ties broken by accuracy, then by "
        "position), so the order inside the top group is weakly determined.",
        "",
        "Every configuration (random seeds one by one):",
        "",
        "| config | heads | ASR | benign exact | prefix kept | ppl | benign refused | seconds |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['config']} | {' '.join(f'{l}.{h}' for l, h in r['heads']) or '-'} | {r['asr']:.3f} | "
          f"{r['exact']:.3f} | {r['prefix']:.3f} | {r['ppl']:.3f} | {r['benign_refused']:.3f} | {r['seconds']} |"
          for r in results],
        "",
        "First answers to the first three harmful prompts, unablated and with the largest top-k zero-ablated:",
        "",
        *[f"* `{r['config']}`: " + " / ".join(json_.dumps(t[:100]) for t in r["examples"]["harmful"])
          for r in results if r["kind"] == "none" or (r["kind"] == "top" and r["k"] == top and r["mode"] == "zero")],
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(out, text)
    if json:
        atomic_write_text(json, json_.dumps({"command": cmd.strip(), "args": args, "minutes": round(minutes, 1),
                                                 "harmful": harmful, "benign": benign, "results": results,
                                                 "summary": summarise(results)}, indent=1, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
