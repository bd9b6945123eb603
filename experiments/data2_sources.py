"""The source-level table on a store, head detector and baselines only (no residual/refusal feature fits,
no sparse-over-all-heads fit): the columns of the earlier `experiments/source_protocol.sh` table, at a
fraction of the cost of `evaluate --protocol sources` on a store that records the extra features.

    python experiments/data2_sources.py --store stores/data2-smollm2 --out experiments/results/data2-smollm2 \
        [--sources advbench,...]   # only these sources held out (training still uses every other source)

Control (`--exclude a,b,...`): the same round-robin folds over `--sources`, but the listed sources are kept
out of training as well (they ride along in each fold's test split and are dropped before scoring), so one
store answers "what do these sources add to training?" on identical held-out rows.
"""
import argparse
import json
import os

from lit_sahs.data.protocol import names
from lit_sahs.generalisation import format_source_tables, source_protocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sources", default="")
    ap.add_argument("--top_k", type=int, default=8)
    ap.add_argument("--max_epochs", type=int, default=30)  # evaluate's default
    ap.add_argument("--seed", type=int, default=0, help="split seed (validation rows, per-fold ranking)")
    ap.add_argument("--exclude", default="", help="sources kept out of training in every fold (control)")
    args = ap.parse_args()
    if args.exclude:
        return control(args)
    result = source_protocol(args.store, top_k=args.top_k, sources=names(args.sources), max_epochs=args.max_epochs,
                             feature_sets={}, sparse_all=False, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    table = format_source_tables(result)
    with open(os.path.join(args.out, "sources.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(table)


def control(args) -> None:
    import numpy as np

    from lit_sahs.detectors import compute_report
    from lit_sahs.evaluate import split_reports
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.generalisation import COLUMNS

    excluded = names(args.exclude)
    folds = Folds(args.store, seed=args.seed)
    holdouts, _ = folds.source_holdouts("round_robin", 20, names(args.sources))
    out = []
    for hold in holdouts:
        fit = fit_fold(folds, "logistic", None, args.top_k, Holdout(sources=hold.sources + excluded),
                       max_epochs=args.max_epochs)
        _, scores, y, thresholds = split_reports(fit.detector, fit.datamodule, "test")
        keep = np.array([r["source"] in hold.sources for r in fit.datamodule.split_rows("test")])
        methods = {m: {c: float(compute_report(sc[keep], y[keep], None, thresholds[m])["overall"][c]) for c in COLUMNS}
                   for m, sc in scores.items()}
        out.append({"holdout": list(hold.sources), "n_malicious": int(y[keep].sum()),
                    "n_benign": int((y[keep] == 0).sum()), "methods": methods})
    mean = {m: {c: float(np.nanmean([f["methods"][m][c] for f in out])) for c in COLUMNS} for m in out[0]["methods"]}
    result = {"protocol": "sources", "pairing": "round_robin", "detector": "logistic", "top_k": args.top_k,
              "excluded_from_training": list(excluded), "folds": out, "mean": mean, "skipped": {}}
    os.makedirs(args.out, exist_ok=True)
    table = format_source_tables(result)
    with open(os.path.join(args.out, "sources.md"), "w", encoding="utf-8") as f:
        f.write(f"Control: {', '.join(excluded)} kept out of training in every fold.\n\n{table}\n")
    with open(os.path.join(args.out, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
