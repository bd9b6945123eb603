"""The source-level table on a store, head detector and baselines only (no residual/refusal feature fits,
no sparse-over-all-heads fit): the columns of the earlier `experiments/source_protocol.sh` table, at a
fraction of the cost of `evaluate --protocol sources` on a store that records the extra features.

    python experiments/data2_sources.py --store stores/data2-smollm2 --out experiments/results/data2-smollm2 \
        [--sources advbench,...]   # only these sources held out (training still uses every other source)

Control (`--exclude a,b,...`): the same round-robin folds over `--sources`, but the listed sources are kept
out of training as well (they ride along in each fold's test split and are dropped before scoring), so one
store answers "what do these sources add to training?" on identical held-out rows.
"""
import json
import os

from lit_sahs.commands import script_main


def run(store: str, out: str, sources: str = "", top_k: int = 8, max_epochs: int = 30, seed: int = 0,
        exclude: str = "") -> int:
    """Source-level table (heads and baselines) on a store, or the control with `--exclude`.

    Args:
        store: activation store
        out: output directory (sources.md, sources.json)
        sources: only these sources held out, comma-separated (default all; training still uses every other)
        top_k: heads of the logistic detector, re-ranked inside each fold
        max_epochs: epochs per fit (evaluate's default)
        seed: split seed (validation rows, per-fold ranking)
        exclude: sources kept out of training in every fold (control)
    """
    from lit_sahs.data.protocol import names
    from lit_sahs.generalisation import format_source_tables, source_protocol

    if exclude:
        return control(store, out, sources, top_k, max_epochs, seed, exclude)
    result = source_protocol(store, top_k=top_k, sources=names(sources), max_epochs=max_epochs,
                             feature_sets={}, sparse_all=False, seed=seed)
    os.makedirs(out, exist_ok=True)
    table = format_source_tables(result)
    with open(os.path.join(out, "sources.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(table)
    return 0


def control(store: str, out_dir: str, sources: str, top_k: int, max_epochs: int, seed: int, exclude: str) -> int:
    """The same round-robin folds with the `exclude` sources kept out of training (scored on the held-out pair)."""
    import numpy as np

    from lit_sahs.data.protocol import names
    from lit_sahs.detectors import compute_report
    from lit_sahs.evaluate import split_reports
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.generalisation import COLUMNS, format_source_tables

    excluded = names(exclude)
    folds = Folds(store, seed=seed)
    holdouts, _ = folds.source_holdouts("round_robin", 20, names(sources))
    out = []
    for hold in holdouts:
        fit = fit_fold(folds, "logistic", None, top_k, Holdout(sources=hold.sources + excluded),
                       max_epochs=max_epochs)
        _, scores, y, thresholds = split_reports(fit.detector, fit.datamodule, "test")
        keep = np.array([r["source"] in hold.sources for r in fit.datamodule.split_rows("test")])
        methods = {m: {c: float(compute_report(sc[keep], y[keep], None, thresholds[m])["overall"][c]) for c in COLUMNS}
                   for m, sc in scores.items()}
        out.append({"holdout": list(hold.sources), "n_malicious": int(y[keep].sum()),
                    "n_benign": int((y[keep] == 0).sum()), "methods": methods})
    mean = {m: {c: float(np.nanmean([f["methods"][m][c] for f in out])) for c in COLUMNS} for m in out[0]["methods"]}
    result = {"protocol": "sources", "pairing": "round_robin", "detector": "logistic", "top_k": top_k,
              "excluded_from_training": list(excluded), "folds": out, "mean": mean, "skipped": {}}
    os.makedirs(out_dir, exist_ok=True)
    table = format_source_tables(result)
    with open(os.path.join(out_dir, "sources.md"), "w", encoding="utf-8") as f:
        f.write(f"Control: {', '.join(excluded)} kept out of training in every fold.\n\n{table}\n")
    with open(os.path.join(out_dir, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
