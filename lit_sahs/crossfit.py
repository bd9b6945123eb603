"""Thresholds that keep their false-positive rate on prompts from collections the detector never read.

The usual threshold is calibrated on the validation benign rows of the training sources: it flags
``target_fpr`` of prompts like those, and a larger share of benign prompts from anywhere else (their
scores sit higher). Cross-fitting estimates what an unseen source looks like with models that did not
see it: the training sources are split into source folds (``folds.source_holdouts``: one harmful and
one benign source out at a time), the detector is fitted again on each fold's remaining sources (same
family, hyper-parameters, head count, features; heads located inside the fold when the fit locates
them) and scores the benign rows of the sources it left out. The threshold is the one that flags
``target_fpr`` of these out-of-source benign scores, every source weighing the same, and it is
applied to the detector fitted on all the sources (the cross-fitting trade: each score comes from a
slightly different model than the one shipped).

    cf = crossfit_threshold(Folds("stores/guard-smollm2"), "logistic", {}, k=8, target_fpr=0.05)
    cf.threshold, cf.per_source        # the threshold; each source's own FPR at it

``python -m lit_sahs calibrate`` applies it to a detector artifact; ``evaluate --protocol sources
--crossfit true`` measures, per held-out source, the benign FPR it predicts against the one observed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lit_sahs.data.holdout import Holdout
from lit_sahs.errors import LitSahsError
from lit_sahs.folds import Folds, fit_fold, source_holdouts

METHOD = "crossfit_sources"


@dataclass
class CrossFitThreshold:
    """A threshold cross-fitted over source folds. `per_source`: each benign source's rows and the
    share of them flagged at `threshold` (scored by the fold fit that left the source out)."""

    threshold: float
    target_fpr: float
    folds: list[str]
    per_source: dict[str, dict] = field(default_factory=dict)

    def metadata(self) -> dict:
        """What an artifact records about its threshold (JSON-safe)."""
        return {"method": METHOD, "target_fpr": self.target_fpr, "threshold": self.threshold,
                "folds": list(self.folds), "per_source": {s: dict(v) for s, v in self.per_source.items()}}


def weighted_threshold(scores: dict[str, np.ndarray], target_fpr: float) -> float:
    """The threshold (flag = score >= t) that flags at most `target_fpr` of the benign scores when
    every source weighs the same, halfway between the highest score left unflagged and the next
    higher one (as ``detectors.metrics.calibrate_threshold`` does for one pool)."""
    if not 0.0 <= target_fpr < 1.0:
        raise LitSahsError(f"target_fpr must lie in [0, 1), got {target_fpr}")
    scores = {s: np.asarray(v, dtype=np.float64) for s, v in scores.items() if len(v)}
    if not scores:
        raise LitSahsError("cannot cross-fit a threshold: no benign rows were scored out of their source")
    values = np.concatenate(list(scores.values()))
    if not np.isfinite(values).all():
        raise LitSahsError("cannot cross-fit a threshold: a fold detector scored NaN or infinity")
    weights = np.concatenate([np.full(len(v), 1.0 / (len(scores) * len(v))) for v in scores.values()])
    distinct = np.unique(values)[::-1]  # highest first
    flagged_weight = np.array([weights[values == v].sum() for v in distinct]).cumsum()
    allowed = int(np.searchsorted(flagged_weight, target_fpr + 1e-12, side="right"))  # groups that may be flagged
    if allowed >= len(distinct):
        return float(np.nextafter(distinct[-1], -np.inf))  # the budget flags every benign score
    v = float(distinct[allowed])  # the highest score that must stay unflagged
    upper = float(distinct[allowed - 1]) if allowed else 1.0
    t = (v + upper) / 2.0
    return t if t > v else math.nextafter(v, math.inf)


def crossfit_threshold(folds: Folds, family: str, hparams: Optional[dict], k: int,
                       held_out: Holdout = Holdout(), target_fpr: float = 0.05, pairing: str = "round_robin",
                       min_rows: int = 10, max_epochs: Optional[int] = None, features: Optional[str] = None,
                       all_heads: bool = False, progress: bool = False) -> CrossFitThreshold:
    """Cross-fit the threshold of a `family` detector on the sources of `folds` that `held_out` leaves
    for training (an outer fold's held-out sources and families stay out of every inner fit)."""
    from tqdm.auto import tqdm

    rows = [r for r in folds.index if str(r.get("source", "")) not in held_out.sources
            and r.get("attack_family", "plain") not in held_out.families]
    try:
        inner, _ = source_holdouts(rows, pairing, min_rows)
    except LitSahsError as e:
        raise LitSahsError(f"cannot cross-fit the threshold over the training sources: {e}") from None
    scores: dict[str, list[np.ndarray]] = {}
    for hold in tqdm(inner, desc="cross-fitting the threshold", unit="fold", disable=not progress, leave=False):
        fit = fit_fold(folds, family, hparams, k, Holdout(held_out.families, held_out.sources + hold.sources),
                       max_epochs=max_epochs, target_fpr=target_fpr, features=features, all_heads=all_heads)
        test = fit.datamodule.split_rows("test")
        s = np.asarray(fit.scores("test"), dtype=np.float64)
        for src in hold.sources:
            mask = np.array([str(r.get("source", "")) == src and int(r["label"]) == 0
                             and r.get("attack_family", "plain") not in held_out.families for r in test])
            if mask.any():
                scores.setdefault(src, []).append(s[mask])
    pooled = {src: np.concatenate(v) for src, v in scores.items()}
    t = weighted_threshold(pooled, target_fpr)
    per_source = {src: {"rows": int(len(v)), "fpr": float((v >= t).mean())} for src, v in sorted(pooled.items())}
    return CrossFitThreshold(t, float(target_fpr), [h.name for h in inner], per_source)
