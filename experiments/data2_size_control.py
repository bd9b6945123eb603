"""Is the gain from the harder negatives hard data, or just more data? A size-matched control.

`experiments/data2_sources.py --exclude` compares, on identical held-out rows, training on the old
sources alone (control) with training on old + new sources. The second arm also trains on ~35% more
rows. Here the with-new-sources arm is cut, per fold, to the control's number of training-eligible
rows. Whole base prompts are dropped at random, from old and new sources alike, so a prompt's
templates stay together. The held-out pair is kept whole, so the test rows are the same as in both
other arms. Each fold gets its own subset store (a copy of the kept rows, extras included), and the
fold is scored by the same `source_protocol` (heads re-ranked inside the fold, logistic top-k).

    python experiments/data2_size_control.py --store stores/data2-smollm2 \
        --out experiments/results/data2-smollm2-sizematched --seeds 0,1,2
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from lit_sahs.commands import script_main

OLD = "advbench,harmbench,donotanswer,past_tense,truthfulqa,mmlu,healthsearchqa,sharegpt_instructions"
NEW = "rho_refusal,rho_refusal_benign,rho_overrefusal,sharegpt_creative,innocent_alarming"


def run(store: str, out: str, sources: str = OLD, new: str = NEW, seeds: str = "0,1,2", top_k: int = 8,
        max_epochs: int = 30) -> int:
    """Old + new sources with training rows cut to the control's count, per fold and seed.

    Args:
        store: activation store holding the old and the new sources
        out: output directory (sources.md, sources.json)
        sources: the sources held out in turn (round robin), as in the control
        new: the sources the control leaves out of training
        seeds: comma-separated seeds (split, and which base prompts are dropped)
        top_k: heads of the logistic detector, re-ranked inside each fold
        max_epochs: epochs per fit
    """
    import numpy as np

    from lit_sahs.data.protocol import names
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.evaluate import split_reports
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.generalisation import COLUMNS

    path, store = store, ActivationStore.open(store)
    index = store.index()
    src = np.array([r["source"] for r in index])
    base = np.array([r.get("base_id") or r["id"] for r in index])
    new = set(names(new))
    results = {}
    for seed in [int(s) for s in seeds.split(",")]:
        holdouts, _ = Folds(path, seed=seed).source_holdouts("round_robin", 20, names(sources))
        folds = []
        for hold in holdouts:
            held = np.isin(src, list(hold.sources))
            control_n = int((~held & ~np.isin(src, list(new))).sum())  # the control's training-eligible rows
            rng = np.random.default_rng(seed)
            bases = rng.permutation(np.unique(base[~held]))
            kept, n = [], 0
            for b in bases:  # whole base prompts until the control's row count is reached
                rows = np.flatnonzero((base == b) & ~held)
                if n + len(rows) > control_n:
                    continue
                kept.append(rows)
                n += len(rows)
            keep = np.sort(np.concatenate([np.flatnonzero(held)] + kept))
            tmp = tempfile.mkdtemp(prefix="sizematched-")
            try:
                store.copy_rows(keep, os.path.join(tmp, "s"))
                sub = Folds(os.path.join(tmp, "s"), seed=seed)  # heads re-ranked inside the fold, as everywhere
                fit = fit_fold(sub, "logistic", None, top_k, hold, max_epochs=max_epochs)
                reports, _, y, _ = split_reports(fit.detector, fit.datamodule, "test", ("tfidf", "residual"))
                test = np.array([r["source"] in hold.sources for r in fit.datamodule.split_rows("test")])
                assert test.all(), "the fold's test split holds rows outside the held-out pair"
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fold = {"holdout": list(hold.sources), "n_malicious": int(y.sum()), "n_benign": int((y == 0).sum()),
                    "methods": {m: {c: float(rep["overall"][c]) for c in COLUMNS} for m, rep in reports.items()}}
            fold.update({"training_eligible_rows": n, "control_rows": control_n,
                         "new_source_rows_kept": int(sum(np.isin(src[r], list(new)).sum() for r in kept))})
            folds.append(fold)
            print(seed, hold.sources, n, control_n, {m: round(v["auroc"], 3) for m, v in fold["methods"].items()},
                  flush=True)
        mean = {m: {c: float(np.nanmean([f["methods"][m][c] for f in folds])) for c in COLUMNS}
                for m in folds[0]["methods"]}
        results[seed] = {"folds": folds, "mean": mean}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    lines = ["Size-matched: old + new sources, training rows cut to the control's count per fold.", "",
             "| seed | heads AUROC | heads TPR@1%FPR | heads benign FPR | residual AUROC | TF-IDF AUROC |",
             "|---|---|---|---|---|---|"]
    for seed, r in results.items():
        m = r["mean"]
        lines.append(f"| {seed} | {m['heads']['auroc']:.3f} | {m['heads']['tpr_at_1fpr']:.3f} | {m['heads']['fpr']:.3f} "
                     f"| {m['residual']['auroc']:.3f} | {m['tfidf']['auroc']:.3f} |")
    lines += ["", "Per fold (heads AUROC / benign FPR, rows kept / control rows, new-source rows kept):", ""]
    for seed, r in results.items():
        for f in r["folds"]:
            lines.append(f"- seed {seed}, {' + '.join(f['holdout'])}: {f['methods']['heads']['auroc']:.3f} / "
                         f"{f['methods']['heads']['fpr']:.3f}, {f['training_eligible_rows']} / {f['control_rows']}, "
                         f"{f['new_source_rows_kept']}")
    with open(os.path.join(out, "sources.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
