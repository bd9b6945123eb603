"""`python -m lit_sahs calibrate`: give a trained detector the threshold cross-fitted over the sources
of the store it was trained on (``lit_sahs.crossfit``), so that the false-positive rate it was
calibrated to holds better on benign prompts from collections it never read.

    python -m lit_sahs calibrate --detector artifacts/guard/detector --store stores/guard-smollm2

With ``--judge_band LO,HI`` it also fits the cut of the judge's second stage for that band on the same
out-of-source benign scores (``lit_sahs.judge_cut``): guard and screen then let the target's own verdict
decide the prompts whose score lies in the band, and the two stages together keep the target FPR.
"""
from __future__ import annotations

import json
from typing import Optional

from lit_sahs.choices import Pairing
from lit_sahs.commands import run_command
from lit_sahs.errors import LitSahsError


def calibrate_command(detector: str, store: str, out: Optional[str] = None, target_fpr: Optional[float] = None,
                      pairing: Pairing = "round_robin", min_rows: int = 10, max_epochs: Optional[int] = None,
                      relocate: bool = True, seed: int = 0, tracking_uri: Optional[str] = None,
                      judge_band: Optional[str] = None, batch_size: int = 8, device: str = "auto") -> int:
    """Cross-fit a detector's threshold over the sources of its store and write the detector with it.

    Args:
        detector: detector artifact dir, .ckpt or MLflow URI
        store: the activation store the detector was trained on (its sources are the folds)
        out: where to write the recalibrated detector (default: over --detector, a directory)
        target_fpr: share of benign prompts of an unseen source to flag (default: the detector's own)
        pairing: source folds: round_robin (every source left out once) or all_pairs
        min_rows: smallest source fold used
        max_epochs: epochs per fold fit (default: the family's own)
        relocate: locate the heads again inside each fold (else every fold uses the detector's heads)
        seed: split seed of the fold fits
        tracking_uri: MLflow tracking URI for models:/ and runs:/ detectors
        judge_band: LO,HI: also fit the judge's cut for this band of detector scores (the judge's
            log-odds come from the store's judge extra, else from a judge prefill on the target)
        batch_size: prompts per judge prefill
        device: where the target runs for the judge prefill: auto, cpu, cuda, cuda:N or mps
    """
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.crossfit import crossfit_detector
    from lit_sahs.folds import PER_FOLD, Folds
    from lit_sahs.model_uri import is_uri
    from lit_sahs.checks import at_least, probability_band
    from lit_sahs.outputs import check_outputs

    if out is None and (is_uri(detector) or str(detector).endswith(".ckpt")):
        raise LitSahsError("--out is needed when --detector is an MLflow URI or a checkpoint")
    check_outputs(dirs={"--out": out})
    band = probability_band(judge_band)  # a bad band fails before hours of fitting
    at_least({"--batch_size": batch_size}, 1)
    det = load_detector(detector, tracking_uri=tracking_uri)
    folds = Folds(store, ranking=PER_FOLD if relocate else None, heads=None if relocate else det.head_set.spec(),
                  seed=seed)
    before = float(det.threshold)
    cf = crossfit_detector(det, folds, target_fpr=target_fpr, pairing=pairing, min_rows=min_rows,
                           max_epochs=max_epochs, progress=True)
    judge = None if band is None else _calibrate_judge(det, cf, folds.store, band, batch_size, device)
    path = save_detector(det, out or detector, overwrite=True)
    print(json.dumps({"detector": str(path), "threshold_before": before, "threshold": cf.threshold,
                      "target_fpr": cf.target_fpr, "folds": cf.folds, "per_source": cf.per_source,
                      **({"judge": judge} if judge else {})}))
    return 0


def _calibrate_judge(det, cf, store, band, batch_size: int, device: str) -> dict:
    """Fit the judge cut; the target is loaded only when the store lacks the judge's log-odds."""
    import logging

    from lit_sahs.judge_cut import calibrate_judge, live_judge

    record = calibrate_judge(det, cf, store, band, live_judge(det, device), batch_size=batch_size, progress=True)
    if record["fpr"] > record["target_fpr"] + 1e-9:
        logging.getLogger("lit_sahs").warning(
            "the detector alone flags %.1f%% of the cross-fitted benign rows outside the band: no judge cut keeps "
            "the %.1f%% target; the cut passes every benign row inside it", 100 * record["fpr"],
            100 * record["target_fpr"])
    return record


def main(argv: list[str]) -> int:
    return run_command(calibrate_command, argv, prog="python -m lit_sahs calibrate")
