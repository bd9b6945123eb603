"""Which features a detector should read, chosen on source folds that leave a report's test rows out.

A fit config that holds out an attack family (and validation-only sources) tests on those rows; choosing
its features by that test report would be choosing on the test set. This script scores each feature set
on source folds of the *remaining* rows instead: the held-out families and sources stay out of every fold
(as ``CrossFitCalibration``'s inner folds keep them out), each fold leaves one harmful and one benign
training source out, a logistic detector on the fold's top-k heads (located inside the fold) plus the
features is fitted on the rest and scored on the left-out sources' rows.

    python experiments/heads_features_heldout_sources.py --store stores/safevlm-heads-qwen0.5b \\
        --held_out_families dan --held_out_sources future_tense,rho_overrefusal,innocent_alarming \\
        --features ";resid" --out experiments/results/heads-features-safevlm-split
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.commands import script_main


def run(store: str, out: str, held_out_families: str = "", held_out_sources: str = "", features: str = ";resid",
        top_k: int = 8, seed: int = 0, min_rows: int = 10, max_epochs: Optional[int] = None) -> int:
    """Score each feature set on the source folds of the rows the held-out families and sources leave.

    Args:
        store: an activation store (with the features' extras, e.g. residual layers for resid)
        out: output directory (features.json, features.md)
        held_out_families: comma-separated attack families kept out of every fold (a report's test family)
        held_out_sources: comma-separated sources kept out of every fold (validation-only sources)
        features: ';'-separated feature sets after the heads ('' = heads only), e.g. ";resid;resid,refusal"
        top_k: heads of the detector (located inside each fold)
        seed: split seed of the folds
        min_rows: smallest fold used
        max_epochs: epochs per fold fit (default: the family's)
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lit_sahs.crossfit import left_out_fit
    from lit_sahs.data.extra_features import parse_names
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.detectors.metrics import compute_report
    from lit_sahs.folds import Folds, source_holdouts
    from lit_sahs.io import atomic_write_text

    sets = list(dict.fromkeys(f.strip() for f in features.split(";")))
    for name in sets:  # an unknown name fails before any fold is fitted
        parse_names(name)
    held = Holdout(families=held_out_families, sources=held_out_sources)
    folds = Folds(store, seed=seed)
    rows = [r for r, keep in zip(folds.index, held.keeps(folds.index)) if keep]  # a misspelt name is an error
    inner, skipped = source_holdouts(rows, "round_robin", min_rows)
    result = {name or "heads": [] for name in sets}
    for name in sets:
        for hold in tqdm(inner, desc=f"heads + {name}" if name else "heads", unit="fold"):
            fit, test, mine = left_out_fit(folds, hold, held, "logistic", {}, top_k, max_epochs=max_epochs,
                                           features=name or None)
            y = np.array([int(r["label"]) for r in test])[mine]
            rep = compute_report(np.asarray(fit.scores("test"))[mine], y)["overall"]
            result[name or "heads"].append({"held_out": hold.name, "n": int(mine.sum()), "auroc": rep["auroc"],
                                            "tpr_at_1fpr": rep["tpr_at_1fpr"], "tpr_at_5fpr": rep["tpr_at_5fpr"]})
    names = list(result)
    lines = [f"# Feature sets on the source folds of `{store}` without {held.name or 'nothing held out'}", "",
             f"Logistic on the fold's top {top_k} heads plus the features; {len(rows)} rows; AUROC / TPR@5%FPR of the "
             "left-out sources' rows. Written by `experiments/heads_features_heldout_sources.py`.", "",
             "| left out | rows | " + " | ".join(f"heads + {n}" if n != "heads" else n for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for i, hold in enumerate(inner):
        lines.append(f"| {hold.name} | {result[names[0]][i]['n']} | "
                     + " | ".join(f"{result[n][i]['auroc']:.3f} / {result[n][i]['tpr_at_5fpr']:.3f}" for n in names) + " |")
    mean = {n: {k: float(np.mean([f[k] for f in result[n]])) for k in ("auroc", "tpr_at_1fpr", "tpr_at_5fpr")}
            for n in names}
    lines.append("| **mean** | | " + " | ".join(f"**{mean[n]['auroc']:.3f} / {mean[n]['tpr_at_5fpr']:.3f}**"
                                            for n in names) + " |")
    if skipped:
        lines += ["", f"Skipped folds: {skipped}"]
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "features.json"), json.dumps(
        {"store": store, "held_out": {"families": list(held.families), "sources": list(held.sources)},
         "top_k": top_k, "seed": seed, "mean": mean, "folds": result, "skipped": skipped}, indent=1))
    atomic_write_text(os.path.join(out, "features.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
