"""Detection metrics: the operating-point numbers a deployment cares about, next to AUROC.

AUROC hides what matters for a guard: how many attacks are caught while almost no benign
prompt is refused. So every report carries TPR at 1% and 5% FPR and FPR at 95% TPR, and
accuracy / F1 / TPR / FPR at the detector's own calibrated threshold.

Scores are probabilities (or any monotone score for the rank metrics); labels are 1 for
malicious, 0 for benign. A metric that a single-class set cannot define (AUROC of a group
with no benign prompts, TPR of a group with no malicious ones) is NaN, never a crash and
never a misleading 0.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from lit_sahs.errors import LitSahsError

NAN = float("nan")


# --------------------------------------------------------------------------- functional


def _check(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    preds = torch.as_tensor(preds).detach().flatten().to(torch.float64)
    target = torch.as_tensor(target).detach().flatten()
    if preds.shape != target.shape:
        raise LitSahsError(f"scores have {preds.numel()} values but labels have {target.numel()}: pass one label per score")
    if torch.isnan(preds).any():
        raise LitSahsError("scores contain NaN: check the detector input for NaN activations")
    if target.numel() and not bool(((target == 0) | (target == 1)).all()):
        raise LitSahsError("labels must be 0 (benign) or 1 (malicious)")
    return preds, target.to(torch.long)


def _one_class(target: Tensor) -> bool:
    """True when `target` lacks malicious or benign rows: rank metrics and operating points are undefined."""
    n_pos = int(target.sum())
    return n_pos == 0 or n_pos == target.numel()


def _counts(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(true positives, false positives) flagged at every distinct threshold, highest first (float64)."""
    order = torch.argsort(preds, descending=True, stable=True)
    p, t = preds[order], target[order]
    tps = torch.cumsum(t, 0).to(torch.float64)
    fps = torch.cumsum(1 - t, 0).to(torch.float64)
    # keep only the last index of each run of tied scores: a threshold cannot split ties
    last = torch.ones_like(p, dtype=torch.bool)
    last[:-1] = p[1:] != p[:-1]
    return tps[last], fps[last]


def _roc_points(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(fpr, tpr) at every distinct threshold, flagging `score >= threshold`, starting at (0, 0)."""
    tps, fps = _counts(preds, target)
    zero = torch.zeros(1, dtype=torch.float64)
    n_pos, n_neg = float(target.sum()), float((1 - target).sum())
    return torch.cat([zero, fps / n_neg]), torch.cat([zero, tps / n_pos])


def tpr_at_fpr(preds: Tensor, target: Tensor, max_fpr: float) -> float:
    """Highest TPR over thresholds whose FPR is at most `max_fpr` (NaN without both classes).

    Not torchmetrics' BinarySensitivityAtSpecificity: it compares float32 specificities with the
    bound, so an operating point exactly at the budget (3 false positives in 343 at 3/343) can be
    missed and the TPR reported as 0 instead of 1 (5 of 1,140 such cases in a sweep); here the
    ROC points are float64 and the bound has a tolerance."""
    preds, target = _check(preds, target)
    if _one_class(target):
        return NAN
    fpr, tpr = _roc_points(preds, target)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def fpr_at_tpr(preds: Tensor, target: Tensor, min_tpr: float) -> float:
    """Lowest FPR over thresholds whose TPR is at least `min_tpr` (NaN without both classes)."""
    preds, target = _check(preds, target)
    if _one_class(target):
        return NAN
    fpr, tpr = _roc_points(preds, target)
    return float(fpr[tpr >= min_tpr - 1e-12].min())


def _at_threshold(preds: Tensor, target: Tensor, threshold: float) -> dict[str, float]:
    flags = (preds >= threshold).long()
    tp = int(((flags == 1) & (target == 1)).sum())
    fp = int(((flags == 1) & (target == 0)).sum())
    fn = int(((flags == 0) & (target == 1)).sum())
    tn = int(((flags == 0) & (target == 0)).sum())
    n = tp + fp + fn + tn
    return {
        "accuracy": (tp + tn) / n if n else NAN,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else NAN,
        "tpr": tp / (tp + fn) if tp + fn else NAN,
        "fpr": fp / (fp + tn) if fp + tn else NAN,
    }


def calibrate_threshold(benign_scores: Tensor, target_fpr: float) -> float:
    """A probability threshold that flags at most `target_fpr` of `benign_scores` (flag = score >= t).

    It sits halfway between the highest benign score that must stay unflagged and the next
    higher distinct benign score, so it flags as many as the budget allows without splitting ties.
    """
    s = torch.as_tensor(benign_scores).detach().flatten().to(torch.float64)
    if s.numel() == 0:
        raise LitSahsError("cannot calibrate the threshold: the validation split has no benign samples; add benign prompts to it")
    if not 0.0 <= target_fpr < 1.0:
        raise LitSahsError(f"target_fpr must lie in [0, 1), got {target_fpr}")
    s, _ = torch.sort(s, descending=True)
    allowed = int(math.floor(target_fpr * s.numel() + 1e-9))
    v = s[allowed]  # the highest benign score that must not be flagged
    above = s[s > v]
    upper = float(above.min()) if above.numel() else 1.0
    t = (float(v) + upper) / 2.0
    if t <= float(v):  # v == 1.0 or no representable midpoint
        t = math.nextafter(float(v), math.inf)
    return t


def weighted_threshold(scores: dict, target_fpr: float, ceiling: Optional[float] = 1.0) -> float:
    """The threshold (flag = score >= t) that flags at most `target_fpr` of the benign scores when
    every source weighs the same, halfway between the highest score left unflagged and the next
    higher one (as ``detectors.metrics.calibrate_threshold`` does for one pool). `ceiling`: the
    highest score possible (1.0 for probabilities; None for unbounded scores such as log-odds)."""
    if not 0.0 <= target_fpr < 1.0:
        raise LitSahsError(f"target_fpr must lie in [0, 1), got {target_fpr}")
    scores = {s: np.asarray(torch.as_tensor(v).detach().cpu().double()) for s, v in scores.items() if len(v)}
    if not scores:
        raise LitSahsError("cannot calibrate a threshold: no benign rows were scored")
    values = np.concatenate(list(scores.values()))
    if not np.isfinite(values).all():
        raise LitSahsError("cannot calibrate a threshold: a benign score is NaN or infinity")
    weights = np.concatenate([np.full(len(v), 1.0 / (len(scores) * len(v))) for v in scores.values()])
    return budget_threshold(values, weights, target_fpr, ceiling=ceiling)


def keep_share_threshold(scores: dict, share: float) -> float:
    """The highest value that keeps at least `share` of the (harmful) scores at or above it when every
    source weighs the same: the rule of SafeVLM's ``lora_tpr`` gate and of a guard's ``answer_below``
    (``lit_sahs.answer_cut``). ``budget_threshold`` on the negated scores (at most 1 - share of the
    weight may fall below), so it sits halfway between two scores, or halfway to 0 when all are kept."""
    if not 0.0 < share <= 1.0:
        raise LitSahsError(f"the share of harmful rows to keep must lie in (0, 1], got {share}")
    scores = {s: np.asarray(torch.as_tensor(v).detach().cpu().double()) for s, v in scores.items() if len(v)}
    if not scores:
        raise LitSahsError("cannot place the cut: no harmful rows were scored")
    values = -np.concatenate(list(scores.values()))
    if not np.isfinite(values).all():
        raise LitSahsError("cannot place the cut: a harmful score is NaN or infinity")
    weights = np.concatenate([np.full(len(v), 1.0 / (len(scores) * len(v))) for v in scores.values()])
    # rows with -score >= t fall below the cut (score <= -t); the first score kept is just above -t
    return math.nextafter(-budget_threshold(values, weights, 1.0 - float(share), ceiling=0.0), math.inf)


def budget_threshold(values: np.ndarray, weights: np.ndarray, budget: float, ceiling: Optional[float] = None) -> float:
    """The lowest threshold t (flag = value >= t) whose flagged `weights` sum to at most `budget`,
    halfway between the highest value left unflagged and the next higher one, or just above the
    highest (halfway to `ceiling` when given) when nothing may be flagged; a tie is never split."""
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    distinct = np.unique(values)[::-1]  # highest first
    flagged_weight = np.array([weights[values == v].sum() for v in distinct]).cumsum()
    allowed = int(np.searchsorted(flagged_weight, budget + 1e-12, side="right"))  # groups that may be flagged
    if allowed >= len(distinct):
        return float(np.nextafter(distinct[-1], -np.inf))  # the budget flags every value
    v = float(distinct[allowed])  # the highest value that must stay unflagged
    upper = float(distinct[allowed - 1]) if allowed else ceiling
    if upper is None:
        return math.nextafter(v, math.inf)
    t = (v + upper) / 2.0
    return t if t > v else math.nextafter(v, math.inf)


def compute_report(
    scores: Tensor | Sequence[float],
    labels: Tensor | Sequence[int],
    groups: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> dict[str, dict[str, float | int]]:
    """Metrics overall and per group (e.g. per attack or source) on arbitrary labelled data.

    Returns {"overall": {...}, "<group>": {...}}; each entry holds n, n_malicious, n_benign and
    auroc, auprc, tpr_at_1fpr, tpr_at_5fpr, fpr_at_95tpr, accuracy, f1, tpr, fpr (the last four
    at `threshold`). Undefined values (a single-class group) are NaN.
    """
    preds, target = _check(torch.as_tensor(scores), torch.as_tensor(labels))
    if preds.numel() == 0:
        raise LitSahsError("compute_report got no scores: the evaluation data is empty")
    out: dict[str, dict[str, Any]] = {"overall": _report_one(preds, target, threshold)}
    if groups is not None:
        groups = list(groups)
        if len(groups) != preds.numel():
            raise LitSahsError(f"{len(groups)} group names for {preds.numel()} scores: pass one group per score")
        for name in sorted(set(groups), key=str):
            if name == "overall":
                raise LitSahsError("a group may not be called 'overall': rename it")
            mask = torch.tensor([g == name for g in groups], dtype=torch.bool)
            out[str(name)] = _report_one(preds[mask], target[mask], threshold)
    return out


def _report_one(preds: Tensor, target: Tensor, threshold: float) -> dict[str, float | int]:
    n_pos = int(target.sum())
    n = int(target.numel())
    rep: dict[str, float | int] = {"n": n, "n_malicious": n_pos, "n_benign": n - n_pos}
    coll = detection_metrics(threshold)
    coll.update(preds, target)
    rep.update({k: float(v) for k, v in coll.compute().items()})
    return rep


# --------------------------------------------------------------------------- modular


class _ScoreMetric(Metric):
    """Keeps every (score, label) pair (a `cat` state, gathered across processes)."""

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # torchmetrics rejects unknown keyword arguments here
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = _check(preds, target)
        self.preds.append(preds.to(self.device))
        self.target.append(target.to(self.device))

    def _cat(self) -> tuple[Tensor, Tensor]:
        if len(self.preds) == 0:  # a list of batches, or under DDP the gathered tensor
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        return dim_zero_cat(self.preds), dim_zero_cat(self.target)


class ScoreCollector(_ScoreMetric):
    """compute() -> every (score, label) seen, gathered across processes."""

    def compute(self) -> tuple[Tensor, Tensor]:
        return self._cat()


class _OperatingPoint(_ScoreMetric):
    """A rate at the best threshold whose other rate stays within `bound` (see the subclasses)."""

    def __init__(self, bound: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(bound) <= 1.0:
            raise LitSahsError(f"{type(self).__name__} bound must lie in [0, 1], got {bound}")
        self.bound = float(bound)


class TPRAtFPR(_OperatingPoint):
    """True-positive rate at the best threshold whose false-positive rate is at most `bound`."""

    higher_is_better = True

    def __init__(self, max_fpr: float, **kwargs: Any) -> None:
        super().__init__(max_fpr, **kwargs)

    def compute(self) -> Tensor:
        return torch.tensor(tpr_at_fpr(*self._cat(), self.bound), dtype=torch.float64)


class FPRAtTPR(_OperatingPoint):
    """False-positive rate at the best threshold whose true-positive rate is at least `bound`."""

    higher_is_better = False

    def __init__(self, min_tpr: float, **kwargs: Any) -> None:
        super().__init__(min_tpr, **kwargs)

    def compute(self) -> Tensor:
        return torch.tensor(fpr_at_tpr(*self._cat(), self.bound), dtype=torch.float64)


class AtThreshold(_ScoreMetric):
    """accuracy, f1, tpr or fpr with flag = score >= `threshold`.

    The threshold is read at compute time, so a detector can recalibrate it at the end of a
    validation epoch and report the epoch's numbers at the threshold it will deploy with.
    """

    KINDS = ("accuracy", "f1", "tpr", "fpr")

    def __init__(self, kind: str, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in self.KINDS:
            raise LitSahsError(f"unknown thresholded metric {kind!r}: use one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.threshold = float(threshold)

    def compute(self) -> Tensor:
        preds, target = self._cat()
        return torch.tensor(_at_threshold(preds, target, self.threshold)[self.kind], dtype=torch.float64)


def auroc(preds: Tensor, target: Tensor) -> float:
    """Area under the ROC curve in float64, ties counted half (NaN without both classes)."""
    preds, target = _check(preds, target)
    if _one_class(target):
        return NAN
    fpr, tpr = _roc_points(preds, target)
    return float(torch.trapezoid(tpr, fpr))


def average_precision(preds: Tensor, target: Tensor) -> float:
    """Step-wise area under the precision-recall curve (sum of recall steps x precision), float64."""
    preds, target = _check(preds, target)
    if _one_class(target):
        return NAN
    tps, fps = _counts(preds, target)
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), tps / float(target.sum())])
    precision = tps / (tps + fps)
    return float(((recall[1:] - recall[:-1]) * precision).sum())


class _RankMetric(_ScoreMetric):
    """AUROC / average precision over every (score, label) seen, NaN with one class.

    Not torchmetrics' BinaryAUROC: it runs in float32 and reads any score outside [0, 1] as a
    logit and squashes it with a sigmoid, so raw scores (a harm-direction projection of ~10^4,
    a prompt NLL) saturate to tied 1.0s and rank at chance; here every score ranks as given."""

    higher_is_better = True
    fn: Any = None

    def compute(self) -> Tensor:
        return torch.tensor(type(self).fn(*self._cat()), dtype=torch.float64)


class _DefinedAUROC(_RankMetric):
    fn = staticmethod(auroc)


class _DefinedAP(_RankMetric):
    fn = staticmethod(average_precision)


# The report's columns, defined once: every report (the Lightning loops' logged metrics,
# compute_report behind fit / evaluate / screen / tune) is this collection computed on a set of
# (score, label) pairs. Adding a metric to every report is one entry here.
METRIC_FACTORIES: dict[str, Any] = {
    "auroc": lambda threshold: _DefinedAUROC(),
    "auprc": lambda threshold: _DefinedAP(),
    "tpr_at_1fpr": lambda threshold: TPRAtFPR(0.01),
    "tpr_at_5fpr": lambda threshold: TPRAtFPR(0.05),
    "fpr_at_95tpr": lambda threshold: FPRAtTPR(0.95),
    "accuracy": lambda threshold: AtThreshold("accuracy", threshold),
    "f1": lambda threshold: AtThreshold("f1", threshold),
    "tpr": lambda threshold: AtThreshold("tpr", threshold),
    "fpr": lambda threshold: AtThreshold("fpr", threshold),
}
# the names other modules use (each one a key of METRIC_FACTORIES: a typo is an import error, not a KeyError)
AUROC, TPR_AT_1FPR, TPR_AT_5FPR, FPR = "auroc", "tpr_at_1fpr", "tpr_at_5fpr", "fpr"
assert {AUROC, TPR_AT_1FPR, TPR_AT_5FPR, FPR} <= set(METRIC_FACTORIES)
METRIC_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "tpr_at_1fpr": "TPR@1%FPR", "tpr_at_5fpr": "TPR@5%FPR",
                 "fpr_at_95tpr": "FPR@95%TPR", "accuracy": "accuracy", "f1": "F1", "tpr": "TPR", "fpr": "benign FPR"}
assert set(METRIC_LABELS) == set(METRIC_FACTORIES)
COUNT_COLUMNS = ("n", "n_malicious", "n_benign")
# threshold-free columns (rank metrics and operating points) and those at the calibrated threshold
SCORE_COLUMNS = tuple(k for k in METRIC_FACTORIES if k not in AtThreshold.KINDS)
THRESHOLD_COLUMNS = tuple(k for k in METRIC_FACTORIES if k in AtThreshold.KINDS)


def detection_metrics(threshold: float = 0.5, prefix: str | None = None) -> MetricCollection:
    """Every report column (METRIC_FACTORIES) as one torchmetrics collection."""
    return MetricCollection({name: make(threshold) for name, make in METRIC_FACTORIES.items()},
                            prefix=prefix, compute_groups=False)


def set_threshold(collection: MetricCollection, threshold: float) -> None:
    """Point every thresholded metric of `collection` at `threshold` (read at compute time)."""
    for m in collection.values():
        if isinstance(m, AtThreshold):
            m.threshold = float(threshold)


# the columns screen and score_file report: the row counts, the threshold-free metrics, the rates at
# the threshold and the share of rows flagged (derived from the counts and rates, see summary_metrics)
SUMMARY_COLUMNS = COUNT_COLUMNS + SCORE_COLUMNS + THRESHOLD_COLUMNS + ("flagged_share",)


def summary_metrics(metrics: dict) -> dict:
    """One group of compute_report cut to SUMMARY_COLUMNS, NaN (undefined: AUROC of a one-class
    group, TPR without malicious rows, FPR without benign ones) as None for JSON. ``flagged_share``:
    the share of all the group's rows flagged at the threshold, malicious and benign together."""
    m = dict(metrics)
    if "flagged_share" not in m and all(k in m for k in ("n", "n_malicious", "n_benign", "tpr", "fpr")):
        flagged = sum(round(float(m[rate]) * m[count]) for rate, count in (("tpr", "n_malicious"), ("fpr", "n_benign"))
                      if m[count])
        m["flagged_share"] = flagged / m["n"] if m["n"] else float("nan")
    return {k: (None if isinstance(m[k], float) and math.isnan(m[k]) else m[k]) for k in SUMMARY_COLUMNS if k in m}
