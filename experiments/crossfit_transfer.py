"""Does the cross-fitted threshold lose by moving from the inner fits' scores to the shipped fit's?

``lit_sahs.crossfit`` places the threshold on benign scores from fits that left each source out, and applies it
to the detector fitted on every source: a different model, maybe more or less confident. This compares that raw
transfer with two that first put every fit's scores on its own scale, read from the fit's validation rows (rows of
its training sources it did not train on), and map the threshold back through the shipped fit's scale:

- ``raw``: the product's rule (the threshold on the inner fits' scores as they are);
- ``class_means``: log-odds measured from the validation benign mean in units of the gap to the harmful mean;
- ``benign_z``: log-odds standardised by the validation benign rows' mean and spread.

On every source fold of `evaluate --protocol sources` the fold's fit plays the shipped detector, its training
sources are cross-fitted as ``crossfit_threshold`` does, and each rule's threshold is scored on the held-out
sources: benign FPR against the target, harmful TPR.

    python experiments/crossfit_transfer.py --store stores/guard-qwen2.5-coder-1.5b --out experiments/results/transfer-guard-qwen1.5b
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.commands import script_main

RULES = ("raw", "class_means", "benign_z")


def logodds(p):
    import numpy as np

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def scales(fit) -> dict:
    """{rule: (offset, unit)} of a fit's log-odds, read from its validation rows."""
    import numpy as np

    s = logodds(fit.scores("val"))
    y = np.array([int(r["label"]) for r in fit.datamodule.split_rows("val")])
    b, h = s[y == 0], s[y == 1]
    return {"raw": (0.0, 1.0), "class_means": (b.mean(), max(h.mean() - b.mean(), 1e-9)),
            "benign_z": (b.mean(), max(b.std(), 1e-9))}


def fold_thresholds(folds, hold, top_k: int, target_fpr: float, max_epochs: Optional[int], min_rows: int):
    """(the fold's fit, {rule: threshold in its log-odds}): each rule's cross-fitted threshold for the fold's fit."""
    import numpy as np

    from lit_sahs.crossfit import inner_source_folds, left_out_fit
    from lit_sahs.detectors.metrics import weighted_threshold
    from lit_sahs.folds import fit_fold

    fit = fit_fold(folds, "logistic", {}, top_k, hold, max_epochs=max_epochs, target_fpr=target_fpr)
    benign: dict[str, dict[str, list]] = {r: {} for r in RULES}
    for inner in inner_source_folds(folds, hold, min_rows=min_rows):
        f, test, mine = left_out_fit(folds, inner, hold, "logistic", {}, top_k, max_epochs=max_epochs,
                                     target_fpr=target_fpr)
        s = logodds(f.scores("test"))
        label = np.array([int(r["label"]) for r in test])
        source = np.array([str(r.get("source", "")) for r in test])
        for rule, (offset, unit) in scales(f).items():
            for src in inner.sources:
                keep = mine & (label == 0) & (source == src)
                if keep.any():
                    benign[rule].setdefault(src, []).append((s[keep] - offset) / unit)
    shipped = scales(fit)
    out = {}
    for rule, by_source in benign.items():  # every source weighing the same; log-odds have no ceiling
        t = weighted_threshold({src: np.concatenate(v) for src, v in by_source.items()}, target_fpr, ceiling=None)
        offset, unit = shipped[rule]
        out[rule] = offset + t * unit
    return fit, out


def run(store: str, out: str, top_k: int = 8, seed: int = 0, min_rows: int = 20, max_epochs: Optional[int] = None,
        target_fpr: float = 0.05) -> int:
    """Score each transfer rule's threshold on every source fold; write transfer.{json,md,png}.

    Args:
        store: an activation store
        out: output directory
        top_k: heads of the logistic detector (located inside each fold)
        seed: the folds' split seed (evaluate --seed)
        min_rows: smallest held-out fold (evaluate --min_rows)
        max_epochs: epochs per fold fit (default: the family's)
        target_fpr: share of an unseen source's benign prompts the threshold may flag
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lit_sahs.checks import probability
    from lit_sahs.folds import Folds
    from lit_sahs.io import atomic_write_text
    from lit_sahs.plots import fold_bars

    target_fpr = probability(target_fpr, "target_fpr")
    folds = Folds(store, seed=seed)
    holdouts, skipped = folds.source_holdouts("round_robin", min_rows)
    per_fold = []
    for hold in tqdm(holdouts, desc="source folds"):
        fit, thresholds = fold_thresholds(folds, hold, top_k, target_fpr, max_epochs, min_rows)
        s = logodds(fit.scores("test"))
        y = folds.labels[fit.rows("test")]
        per_fold.append({"held_out": list(hold.sources), **{
            rule: {"threshold": float(t), "fpr": float((s[y == 0] >= t).mean()), "tpr": float((s[y == 1] >= t).mean())}
            for rule, t in thresholds.items()}})
    mean = {r: {k: float(np.mean([f[r][k] for f in per_fold])) for k in ("fpr", "tpr")} for r in RULES}
    over = {r: int(sum(f[r]["fpr"] > target_fpr + 1e-9 for f in per_fold)) for r in RULES}
    lines = [f"# Moving the cross-fitted threshold to the shipped fit, on the source folds of `{store}` "
             f"({len(folds.index)} rows)", "",
             f"Logistic on the fold's top {top_k} heads; threshold aimed at {target_fpr:.0%} of an unseen source's benign "
             "prompts, cross-fitted over the fold's training sources and moved to the fold's fit as it is (`raw`, the "
             "product's rule) or through each fit's own validation scale (`class_means`, `benign_z`). Held-out benign "
             f"FPR / harmful TPR, split seed {seed}. Written by `experiments/crossfit_transfer.py`.", "",
             "| held out | " + " | ".join(RULES) + " |", "|---|" + "---:|" * len(RULES)]
    lines += [f"| {' + '.join(f['held_out'])} | " + " | ".join(f"{f[r]['fpr']:.3f} / {f[r]['tpr']:.3f}" for r in RULES)
              + " |" for f in per_fold]
    lines.append("| **mean** | " + " | ".join(f"**{mean[r]['fpr']:.3f} / {mean[r]['tpr']:.3f}**" for r in RULES) + " |")
    lines.append(f"| folds over {target_fpr:.0%} | " + " | ".join(str(over[r]) for r in RULES) + " |")
    if skipped:
        lines += ["", f"Skipped folds: {skipped}"]
    result = {"store": store, "top_k": top_k, "seed": seed, "target_fpr": target_fpr, "mean": mean,
              "folds_over_target": over, "folds": per_fold, "skipped": skipped}
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "transfer.json"), json.dumps(result, indent=1))
    atomic_write_text(os.path.join(out, "transfer.md"), "\n".join(lines) + "\n")
    fold_bars({f"{r} FPR": [f[r]["fpr"] for f in per_fold] for r in RULES},
              [" + ".join(f["held_out"]) for f in per_fold], os.path.join(out, "transfer.png"), ylabel="held-out benign FPR",
              title=f"held-out benign FPR at the cross-fitted threshold (aimed at {target_fpr:.0%})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
