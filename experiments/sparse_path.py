"""The sparse detector's regularisation path on a store: for each group_lasso, how many heads
survive and what held-out AUROC the detector reaches on them (all heads offered, one family
held out). Writes a markdown table.

    python experiments/sparse_path.py --store stores/quickstart-smollm2 --held_out dan \
        --out experiments/results/sparse_path.md
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from datetime import datetime, timezone
from typing import Optional

from lit_sahs.commands import script_main


def run(store: str = "stores/quickstart-smollm2", held_out: str = "dan", group_lasso: str = "0.02,0.05,0.1,0.2,0.3,0.5",
        max_epochs: int = 15, out: Optional[str] = None) -> int:
    """Heads kept and held-out AUROC of the sparse detector at each group_lasso strength.

    Args:
        store: activation store (all its heads are offered)
        held_out: held-out attack family (the test split)
        group_lasso: comma-separated group-lasso strengths, one fit each
        max_epochs: epochs per fit
        out: also write the markdown table here
    """
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.detectors import SparseHeadDetector
    from lit_sahs.engine import fit_detector
    from lit_sahs.evaluate import detector_scores
    from lit_sahs.io import atomic_write_text

    dm = CachedActivationDataModule(store, all_heads=True, held_out=Holdout(families=[held_out]), batch_size=512)
    dm.setup("fit")
    y = np.array([int(r["label"]) for r in dm.split_rows("test")])
    x = dm.store.read(dm.head_set, rows=dm.splits["test"])
    rows = []
    for gl in [float(g) for g in group_lasso.split(",")]:
        t = time.perf_counter()
        det = fit_detector(SparseHeadDetector(group_lasso=gl), dm, max_epochs=max_epochs)
        kept = det.selected_heads()
        nonzero = int((det.head_norms() > 0).sum())
        auroc = roc_auc_score(y, detector_scores(det, x))
        top = ", ".join(f"{r['layer']}.{r['head']}" for r in det.head_report()[:4])
        rows.append(f"| {gl:g} | {len(kept)} | {nonzero} | {auroc:.3f} | {top} | {time.perf_counter() - t:.0f} |")
        print(rows[-1], flush=True)
    cmd = "python experiments/sparse_path.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `{cmd.strip()}`: store {store} "
        f"({len(dm.head_set)} heads offered), test split = held-out family {held_out} "
        f"({len(y)} rows), {max_epochs} epochs x 200 FISTA steps.", "",
        "| group_lasso | heads selected (> 5% of the largest norm) | heads non-zero | held-out AUROC | strongest heads | fit s |",
        "|---|---|---|---|---|---|", *rows, ""])
    if out:
        atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
