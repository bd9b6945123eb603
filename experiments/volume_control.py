"""Does a larger store teach more? Both sizes scored on the same held-out rows.

`evaluate --protocol sources` on a larger store scores each fold on more held-out rows than on a smaller
draw of the same sources, so the two reports differ in their test rows as well as their training rows
(TPR@1%FPR with 24 held-out benign prompts and with 50 is read at zero false positives either way, and more
benign prompts hold a higher top score). Here every fold of the larger store is scored on its own held-out
rows twice: trained on every training row it holds (`full`), and on only the training rows the smaller
store holds (`subset`). Same recipe in both arms: heads re-ranked inside each fold, a `detector` on the
top-k with `detector_args`. A packaged draw of a smaller `--limit` is a subset of a larger one's (the
480-prompt guard draw lies inside the 1000-prompt one), so a resumed extraction gives both stores.

    python experiments/volume_control.py --store stores/guard1000-qwen2.5-coder-1.5b \
        --subset stores/guard-qwen2.5-coder-1.5b --top_k 9 --detector_args '{l2: 0.9}' --max_epochs 20 \
        --seeds 0,1,2 --out experiments/results/volume-guard-qwen2.5-coder-1.5b
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from lit_sahs.commands import script_main

ARMS = ("subset", "full")


def run(store: str, subset: str, out: str, seeds: str = "0,1,2", top_k: int = 8, detector: str = "logistic",
        detector_args: Optional[dict] = None, max_epochs: int = 20, min_rows: int = 20) -> int:
    """Both arms on every source fold (round robin) of `store`, for each seed.

    Args:
        store: the larger activation store (its folds and held-out rows are used)
        subset: a smaller store of the same target whose rows all lie in `store`
        out: output directory (volume.md, volume.json)
        seeds: comma-separated split seeds
        top_k: heads of the detector, re-ranked inside each fold
        detector: detector family
        detector_args: the family's arguments, e.g. '{l2: 0.9}'
        max_epochs: epochs per fit
        min_rows: smallest source used
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lit_sahs.data.store import ActivationStore
    from lit_sahs.errors import LitSahsError
    from lit_sahs.evaluate import split_reports
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.generalisation import COLUMNS

    big, small = ActivationStore.open(store), ActivationStore.open(subset)
    if big.fingerprint != small.fingerprint:
        raise LitSahsError(f"{subset} was extracted from {small.fingerprint.name}, {store} from {big.fingerprint.name}")
    inside = np.zeros(len(big), dtype=bool)
    inside[big.positions(small.ids())] = True  # every row of the subset must be in the larger store
    if inside.all():
        raise LitSahsError(f"{subset} holds every row of {store}: nothing to compare")
    src = np.array([r["source"] for r in big.index()])
    results: dict = {}
    seed_list = [int(s) for s in seeds.split(",")]
    subsets: dict[tuple, str] = {}  # one subset store per held-out pair, reused by every seed
    tmp = tempfile.mkdtemp(prefix="volume-")
    bar = tqdm(desc="fits", unit="fit")
    try:
        for seed in seed_list:
            full = Folds(store, seed=seed)
            holdouts, _ = full.source_holdouts("round_robin", min_rows, ())
            bar.total = len(seed_list) * len(holdouts) * len(ARMS)
            folds = []
            for hold in holdouts:
                key = tuple(sorted(hold.sources))
                if key not in subsets:
                    subsets[key] = os.path.join(tmp, f"fold{len(subsets)}")
                    big.copy_rows(np.flatnonzero(np.isin(src, key) | inside), subsets[key])
                fold, test_ids = {"holdout": list(hold.sources)}, {}
                for arm, folds_of_arm in zip(ARMS, (Folds(subsets[key], seed=seed), full)):
                    fit = fit_fold(folds_of_arm, detector, detector_args, top_k, hold, max_epochs=max_epochs)
                    reports, _, y, _ = split_reports(fit.detector, fit.datamodule, "test", ("tfidf",))
                    rows = fit.datamodule.split_rows("test")
                    if not all(r["source"] in hold.sources for r in rows):
                        raise LitSahsError(f"fold {hold.sources}: the test split holds rows outside the held-out pair")
                    test_ids[arm] = sorted(r["id"] for r in rows)
                    fold[arm] = {"n_train": len(fit.datamodule.split_rows("train")), "n_test": len(rows),
                                 "n_malicious": int(y.sum()), "n_benign": int((y == 0).sum()),
                                 "methods": {m: {c: float(rep["overall"][c]) for c in COLUMNS}
                                             for m, rep in reports.items()}}
                    bar.update()
                if test_ids["subset"] != test_ids["full"]:
                    raise LitSahsError(f"fold {hold.sources}: the two arms were scored on different rows")
                folds.append(fold)
            mean = {arm: {m: {c: float(np.nanmean([f[arm]["methods"][m][c] for f in folds])) for c in COLUMNS}
                          for m in folds[0][arm]["methods"]} for arm in ARMS}
            results[str(seed)] = {"folds": folds, "mean": mean}
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"store": store, "subset": subset, "detector": detector, "detector_args": detector_args or {},
              "top_k": top_k, "seeds": results}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "volume.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    text = _markdown(report)
    with open(os.path.join(out, "volume.md"), "w", encoding="utf-8") as f:
        f.write(text)
    _plot(report, os.path.join(out, "volume_auroc.png"))
    print(text)
    return 0


def _plot(report: dict, path: str) -> None:
    """Per fold, the heads' held-out AUROC of each arm, averaged over the seeds."""
    import numpy as np

    from lit_sahs.plots import fold_bars

    seeds = list(report["seeds"].values())
    folds = [" + ".join(f["holdout"]) for f in seeds[0]["folds"]]
    names = {"subset": f"{os.path.basename(report['subset'])}'s rows", "full": f"all of {os.path.basename(report['store'])}"}
    values = {names[arm]: [float(np.mean([s["folds"][i][arm]["methods"]["heads"]["auroc"] for s in seeds]))
                           for i in range(len(folds))] for arm in ARMS}
    fold_bars(values, folds, path, title=f"held-out AUROC on the same rows, mean of {len(seeds)} seeds")


def _markdown(report: dict) -> str:
    seeds = report["seeds"]
    first = next(iter(seeds.values()))["folds"]
    lines = [f"Same held-out rows, two training sets: `{report['subset']}`'s rows (subset) or every row of "
             f"`{report['store']}` (full); {report['detector']} top {report['top_k']} "
             f"{report['detector_args']}, heads re-ranked per fold.", "",
             "| seed | training rows per fold, subset / full | heads AUROC subset / full | TPR@1%FPR | TPR@5%FPR "
             "| held-out benign FPR (validation threshold) | TF-IDF AUROC |", "|---|---|---|---|---|---|---|"]

    def pair(mean, m, c):
        return f"{mean['subset'][m][c]:.3f} / {mean['full'][m][c]:.3f}"

    for seed, r in seeds.items():
        m, f = r["mean"], r["folds"]
        n = [round(sum(x[a]["n_train"] for x in f) / len(f)) for a in ARMS]
        lines.append(f"| {seed} | {n[0]} / {n[1]} | {pair(m, 'heads', 'auroc')} | {pair(m, 'heads', 'tpr_at_1fpr')} "
                     f"| {pair(m, 'heads', 'tpr_at_5fpr')} | {pair(m, 'heads', 'fpr')} | {pair(m, 'tfidf', 'auroc')} |")
    lines += ["", "Per fold, heads AUROC subset / full (seeds in order):", "",
              "| held out | n mal / ben | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|---|" + "---|" * len(seeds)]
    for i, fold in enumerate(first):
        cells = [f"{r['folds'][i]['subset']['methods']['heads']['auroc']:.3f} / "
                 f"{r['folds'][i]['full']['methods']['heads']['auroc']:.3f}" for r in seeds.values()]
        lines.append(f"| {' + '.join(fold['holdout'])} | {fold['full']['n_malicious']} / {fold['full']['n_benign']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(script_main(run))
