"""The source-level generalisation report: how a detector does on prompt collections it never saw.

Holding out an attack *template* while the harmful and benign *sources* stay the same flatters a
detector (0.99 everywhere); a deployed guard meets requests unlike its training data. Each fold
here keeps one harmful and one benign source out of training, head ranking and threshold
calibration (`folds.source_holdouts`), fits the detector through the Engine, and scores the held-out
rows with the detector and every baseline trained on the same rows, each thresholded at its own
calibration on the training sources' validation benign prompts. Per fold and on average: AUROC,
TPR at 1% and 5% FPR, and the false-positive rate on the held-out benign source at the threshold.

    python -m lit_sahs evaluate --store stores/quickstart-smollm2 --protocol sources --top_k 8

Features beyond heads (``lit_sahs.data.extra_features``): on a store that records them, the same
folds also fit the detector on the heads plus residual layers and/or the refusal probability
(``heads_resid``, ``heads_refusal``, ``heads_resid_refusal``) and the sparse group-lasso selector over
every head, every residual layer and the refusal probability (``sparse_all``); the baselines add the
harm direction, the multi-layer residual probe and the refusal probability alone. On a store extracted
with ``--judge``, the target's own verdict is a baseline alone (``judge``), a feature beside the heads
(``heads_judge``) and a group of ``sparse_all``. On a store that records heads at every prompt token
(``extract --token_heads``), ``heads_attnpool`` fits the attention-pooling family on the fold's top-k of
those heads (ranked on the fold's training rows).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lit_sahs.baselines import BASELINES
from lit_sahs.data.extra_features import (JUDGE_EXTRA, REFUSAL_EXTRA, RESIDUAL_EXTRA, TOKEN_HEADS_EXTRA, pool_extra,
                                          store_token_heads)
from lit_sahs.errors import LitSahsError
from lit_sahs.folds import PER_FOLD, Folds, fit_fold
from lit_sahs.detectors.metrics import AUROC, FPR, METRIC_LABELS, TPR_AT_1FPR, TPR_AT_5FPR

# detector fits beside the heads on a store with the extra features: method name -> features
# (names are valid MLflow metric key parts: no '+' or parentheses)
FEATURE_SETS = {"heads_resid": "resid", "heads_refusal": "refusal", "heads_resid_refusal": "resid,refusal"}
# on a store extracted with --pool: the same heads read at the first-token position and pooled
# over the prompt's own tokens (lit_sahs.data.extra_features)
POOLED_SETS = {"heads_mean": "mean", "heads_max": "max", "heads_mean_max": "mean,max"}
# on a store extracted with --judge: the heads beside the target's own verdict (a second prefill)
JUDGE_SETS = {"heads_judge": "judge"}
SPARSE_ALL = "sparse_all"
SPARSE_ALL_ARGS = {"group_lasso": 0.02}
# on a store extracted with --token_heads: the attention-pooling family over the heads at every token
ATTNPOOL = "heads_attnpool"

# the columns of the table: threshold-free operating points, and the held-out benign source's FPR
COLUMNS = (AUROC, TPR_AT_1FPR, TPR_AT_5FPR, FPR)
LABELS = {c: METRIC_LABELS[c] for c in COLUMNS}


def source_protocol(store: str, top_k: int = 8, detector: str = "logistic", detector_args: Optional[dict] = None,
                    pairing: str = "round_robin", sources: Sequence[str] = (), min_rows: int = 20,
                    max_epochs: Optional[int] = None, baselines: Sequence[str] = BASELINES, seed: int = 0,
                    ranking: Optional[str] = PER_FOLD, heads: Optional[str] = None, progress: bool = True,
                    feature_sets: Optional[dict] = None, sparse_all: Optional[bool] = None,
                    crossfit: bool = False, target_fpr: float = 0.05, extra_rows: bool = True,
                    features: Optional[str] = None, judge_band: Optional[tuple[float, float]] = None,
                    answer_tpr: Optional[float] = None) -> dict:
    """Fit and score every source fold. Returns {"folds": [{"holdout", "n_malicious", "n_benign",
    "methods": {method: {column: value}}}], "mean": {method: {column: mean}}, "skipped": {fold: reason}}.
    `feature_sets` ({method: 'resid,refusal'}; None: FEATURE_SETS when the store records the extra
    features, else none; the pooled-head rows POOLED_SETS where it records the pools, JUDGE_SETS where
    it records the judge) and `sparse_all`
    (None: likewise) add detector fits on the same folds; `extra_rows` False leaves out the
    FEATURE_SETS and sparse_all defaults (sparse_all costs minutes a fold), not the pooled rows.
    `crossfit`: also cross-fit the detector's threshold over each fold's training sources
    (``lit_sahs.crossfit``) and report the held-out benign FPR and harmful TPR at both thresholds
    (``folds[i]["calibration"]``, ``"calibration"`` for the means); every threshold targets `target_fpr`.
    `features`: what the `heads` row's detector reads after its heads (e.g. 'tokens' for attnpool).
    `judge_band` (with `crossfit`, on a store extracted with --judge): also fit the judge's cut for that
    band on each fold's cross-fitted benign rows (``lit_sahs.judge_cut``) and report the two-stage rule's
    held-out benign FPR and harmful TPR beside the cross-fitted threshold's. `answer_tpr` (with
    `crossfit`): also place the answer side's cut on each fold's cross-fitted harmful rows
    (``lit_sahs.answer_cut``) and report the share of held-out harmful prompts it keeps above it (the
    promise: `answer_tpr`) and of held-out benign ones below it, beside the cross-fit's prediction."""
    from tqdm import tqdm

    from lit_sahs.evaluate import split_reports

    folds = Folds(store, ranking=ranking, heads=heads, seed=seed)
    if judge_band is not None and not (crossfit and JUDGE_EXTRA in set(folds.store.extra_names())):
        raise LitSahsError("a judge band is calibrated on cross-fitted benign scores with the judge's log-odds: "
                           "use --crossfit true on a store extracted with --judge true")
    if answer_tpr is not None and not crossfit:
        raise LitSahsError("the answer cut is placed on cross-fitted harmful scores: use --crossfit true")
    holdouts, skipped = folds.source_holdouts(pairing, min_rows, sources)
    stored = set(folds.store.extra_names())
    has_extras = {RESIDUAL_EXTRA, REFUSAL_EXTRA} <= stored
    if feature_sets is None:
        feature_sets = dict(FEATURE_SETS) if has_extras and extra_rows else {}
        feature_sets.update({m: f for m, f in POOLED_SETS.items()
                             if all(pool_extra(p) in stored for p in f.split(","))})
        if JUDGE_EXTRA in stored:
            feature_sets.update(JUDGE_SETS)
    else:
        feature_sets = dict(feature_sets)
    sparse_all = has_extras and extra_rows if sparse_all is None else sparse_all
    token_heads = store_token_heads(folds.store) if TOKEN_HEADS_EXTRA in stored else ()
    out = []
    for hold in tqdm(holdouts, desc="source folds", disable=not progress):
        fit = fit_fold(folds, detector, detector_args, top_k, hold, max_epochs=max_epochs, target_fpr=target_fpr,
                       features=features)
        reports, _, labels, thresholds = split_reports(fit.detector, fit.datamodule, "test", baselines)
        calibration = _calibration(folds, fit, detector, detector_args, top_k, hold, labels, target_fpr,
                                   max_epochs, features, judge_band, answer_tpr) if crossfit else None
        extra_fits = {m: fit_fold(folds, detector, detector_args, top_k, hold, max_epochs=max_epochs, features=f)
                      for m, f in feature_sets.items()}
        if sparse_all:
            # the sparse family's own epochs (5 x 200 FISTA steps, warm-started): the evaluate command's
            # max_epochs (30) is sized for the logistic detector, and 6000 steps over every head cost minutes a fold
            everything = ",".join(["resid,refusal"] * has_extras + ["judge"] * (JUDGE_EXTRA in stored))
            extra_fits[SPARSE_ALL] = fit_fold(folds, "sparse", SPARSE_ALL_ARGS, top_k, hold, all_heads=True,
                                              features=everything or None)
        if token_heads and detector != "attnpool":  # the fold's best heads among those recorded at every token
            extra_fits[ATTNPOOL] = fit_fold(folds, "attnpool", None, top_k, hold, target_fpr=target_fpr,
                                            features="tokens")
        for m, f in extra_fits.items():
            reports[m], thresholds[m] = _fit_report(f, labels)
        out.append({"holdout": list(hold.sources), "n_malicious": int(labels.sum()),
                    "n_benign": int((labels == 0).sum()), "thresholds": thresholds,
                    "head_set": fit.detector.head_set.to_list(),
                    "methods": {m: {c: float(rep["overall"][c]) for c in COLUMNS} for m, rep in reports.items()}})
        if calibration is not None:
            out[-1]["calibration"] = calibration
        if sparse_all:
            out[-1]["sparse_selected"] = [r["name"] for r in extra_fits[SPARSE_ALL].detector.head_report()
                                          if r["selected"]]
    methods = list(out[0]["methods"])
    mean = {m: {c: float(np.nanmean([f["methods"][m][c] for f in out])) for c in COLUMNS} for m in methods}
    result = {"protocol": "sources", "pairing": pairing, "detector": detector, "top_k": top_k, "folds": out,
              "mean": mean, "skipped": skipped, "relocate": folds.per_fold, "target_fpr": target_fpr,
              **({"judge_band": list(judge_band)} if judge_band is not None else {}),
              **({"answer_tpr": float(answer_tpr)} if answer_tpr is not None else {})}
    if crossfit:
        keys = CALIBRATION + (JUDGE_CALIBRATION if judge_band is not None else ()) + \
            (ANSWER_CALIBRATION if answer_tpr is not None else ())
        result["calibration"] = {k: float(np.nanmean([f["calibration"][k] for f in out])) for k in keys}
    return result


# held-out benign FPR and harmful TPR at the validation threshold and at the cross-fitted one
CALIBRATION = ("fpr_validation", "fpr_crossfit", "tpr_validation", "tpr_crossfit")
# and with the judge deciding a band of scores at a cut fitted on the same cross-fitted benign rows
JUDGE_CALIBRATION = ("fpr_judge", "tpr_judge", "judged")
# and the answer side's cut: held-out harmful kept above it, held-out benign below it (and its prediction)
ANSWER_CALIBRATION = ("answer_kept", "answer_answered", "answer_answered_predicted")


def _calibration(folds, fit, detector, detector_args, top_k, hold, labels, target_fpr, max_epochs,
                 features=None, judge_band=None, answer_tpr=None) -> dict:
    """The fold detector's held-out benign FPR and harmful TPR at its validation threshold, at the
    threshold cross-fitted over the fold's training sources and, with `judge_band`, with the judge
    deciding that band at a cut fitted on the same cross-fitted benign rows."""
    from lit_sahs.crossfit import crossfit_threshold
    from lit_sahs.judge_cut import fit_judge_cut, held_out_two_stage, store_logodds

    cf = crossfit_threshold(folds, detector, detector_args, top_k, hold, target_fpr=target_fpr, max_epochs=max_epochs,
                            features=features)
    scores = np.asarray(fit.scores("test"), dtype=np.float64)
    benign, harmful = scores[labels == 0], scores[labels == 1]
    out = {"threshold_validation": float(fit.detector.threshold), "threshold_crossfit": cf.threshold,
           "inner_folds": cf.folds, "per_source": cf.per_source}
    for name, t in (("validation", out["threshold_validation"]), ("crossfit", cf.threshold)):
        out[f"fpr_{name}"] = float((benign >= t).mean()) if len(benign) else float("nan")
        out[f"tpr_{name}"] = float((harmful >= t).mean()) if len(harmful) else float("nan")
    if judge_band is not None:  # one read of the store's log-odds for the inner benign rows and the test rows
        test_ids = [r["id"] for r in fit.datamodule.split_rows("test")]
        inner = [i for ids, _ in cf.benign.values() for i in ids]
        logodds = store_logodds(folds.store, inner + test_ids)
        parts = np.split(logodds[:len(inner)], np.cumsum([len(ids) for ids, _ in cf.benign.values()])[:-1])
        record = fit_judge_cut({src: (s, lo) for (src, (_, s)), lo in zip(cf.benign.items(), parts)},
                               cf.threshold, judge_band, target_fpr)
        test = held_out_two_stage(record, scores, labels, logodds[len(inner):])
        out.update({"judge_cut": record["cut"], "fpr_judge": test["benign_fpr"], "tpr_judge": test["harmful_tpr"],
                    "judged": test["judged"]})
    if answer_tpr is not None:
        cut = cf.answer_cut(answer_tpr)
        nan = float("nan")
        out.update({"answer_below": cut["answer_below"],
                    "answer_kept": float((harmful >= cut["answer_below"]).mean()) if len(harmful) else nan,
                    "answer_answered": float((benign < cut["answer_below"]).mean()) if len(benign) else nan,
                    "answer_answered_predicted": cut.get("answered", nan)})
    return out


def _fit_report(fit, labels: np.ndarray) -> tuple[dict, float]:
    """A fold fit's test report at its own calibrated threshold (the test rows are the fold's)."""
    from lit_sahs.detectors import compute_report

    index = fit.datamodule.split_rows("test")
    y = np.array([int(r["label"]) for r in index])
    assert np.array_equal(y, labels), "fold fits disagree on the test rows"
    thr = float(fit.detector.threshold)
    return compute_report(fit.scores("test"), y, [str(r.get("attack_family", "")) for r in index], thr), thr


def _cell(v: float) -> str:
    return "—" if v != v else f"{v:.3f}"


def format_source_tables(result: dict) -> str:
    """Markdown: the mean over folds per method, then AUROC and TPR@1%FPR per fold and method."""
    methods = list(result["mean"])
    lines = [f"Mean over {len(result['folds'])} source folds (each holds out one harmful and one benign "
             "source; threshold calibrated on the training sources' validation benign prompts):", "",
             "| method | " + " | ".join(LABELS[c] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_cell(result["mean"][m][c]) for c in COLUMNS) + " |")
    for col in (AUROC, TPR_AT_1FPR, FPR):
        lines += ["", f"{LABELS[col]} per held-out pair (harmful + benign source):", "",
                  "| held out | n mal / ben | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for f in result["folds"]:
            cells = [_cell(f["methods"][m][col]) for m in methods]
            lines.append(f"| {' + '.join(f['holdout'])} | {f['n_malicious']} / {f['n_benign']} | "
                         + " | ".join(cells) + " |")
    kept = [(f["holdout"], f["sparse_selected"]) for f in result["folds"] if "sparse_selected" in f]
    if kept:
        judge = " and the judge" if "judge" in result["mean"] else ""
        lines += ["", f"Groups the sparse selector kept ({SPARSE_ALL}: every head, residual layer, the refusal "
                  f"probability{judge}), per fold:", ""]
        lines += [f"- {' + '.join(h)}: {', '.join(sel[:12])}" + (f" … ({len(sel)} in all)" if len(sel) > 12 else "")
                  for h, sel in kept]
    if "calibration" in result:
        m = result["calibration"]
        lines += ["", f"Threshold calibration of {result['detector']} (target: {result['target_fpr']:.0%} of benign "
                  "prompts flagged): on the validation benign rows of the training sources, or cross-fitted over "
                  "the training sources (each source scored by a fit that left it out); held-out benign FPR and "
                  "harmful TPR at each:", "",
                  "| held out | threshold val / cross-fit | benign FPR val | benign FPR cross-fit "
                  "| harmful TPR val | harmful TPR cross-fit |", "|---|---|---|---|---|---|"]
        for f in result["folds"]:
            c = f["calibration"]
            lines.append(f"| {' + '.join(f['holdout'])} | {c['threshold_validation']:.3f} / "
                         f"{c['threshold_crossfit']:.3f} | " + " | ".join(_cell(c[k]) for k in CALIBRATION) + " |")
        lines.append("| **mean** | | " + " | ".join(_cell(m[k]) for k in CALIBRATION) + " |")
        if "fpr_judge" in m:
            band = result.get("judge_band") or ["?", "?"]
            lines += ["", f"With the judge deciding detector scores in [{band[0]}, {band[1]}] at a cut fitted on the "
                      "same cross-fitted benign rows (the cross-fitted threshold outside the band):", "",
                      "| held out | judge cut (log-odds) | held-out rows judged | benign FPR | harmful TPR |",
                      "|---|---|---|---|---|"]
            for f in result["folds"]:
                c = f["calibration"]
                lines.append(f"| {' + '.join(f['holdout'])} | {c['judge_cut']:.2f} | {_cell(c['judged'])} | "
                             f"{_cell(c['fpr_judge'])} | {_cell(c['tpr_judge'])} |")
            lines.append(f"| **mean** | | {_cell(m['judged'])} | {_cell(m['fpr_judge'])} | {_cell(m['tpr_judge'])} |")
    if "answer_tpr" in result:
        m = result["calibration"]
        lines += ["", f"The answer side's cut (`calibrate --answer_tpr {result['answer_tpr']:g}`), placed on each fold's "
                  "cross-fitted harmful rows: held-out harmful prompts kept at or above it (the promise: "
                  f"{result['answer_tpr']:.0%}), held-out benign prompts below it (answered without refusal openings) "
                  "and the share the cross-fit predicted:", "",
                  "| held out | answer_below | harmful kept | benign answered | benign answered, predicted |",
                  "|---|---|---|---|---|"]
        for f in result["folds"]:
            c = f["calibration"]
            lines.append(f"| {' + '.join(f['holdout'])} | {c['answer_below']:.3g} | "
                         + " | ".join(_cell(c[k]) for k in ANSWER_CALIBRATION) + " |")
        lines.append("| **mean** | | " + " | ".join(_cell(m[k]) for k in ANSWER_CALIBRATION) + " |")
    if result["skipped"]:
        lines += ["", "Skipped folds: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines)
