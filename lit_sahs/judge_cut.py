"""The judge band's cut, calibrated on cross-fitted benign scores the way the detector's threshold is.

Inside a band [lo, hi] of detector scores the target's own verdict decides (``self_judge.JudgeRule``):
a prompt is flagged when the judge's log-odds of "unsafe" reach the cut. Where "unsafe" begins differs
by target (Qwen2.5-Coder-1.5B leans to "unsafe" for every prompt, harmless ones included), so the cut is
fitted, never assumed. The rule it is fitted to keep is the threshold's: the two-stage decision flags at
most ``target_fpr`` of the benign prompts of sources the detector never read. On the benign rows that
cross-fitting scored with fits that left their source out (``crossfit.CrossFitThreshold.benign``), rows
outside the band keep the detector's decision at the shipped threshold, rows inside get the judge's
log-odds, every source weighs the same, and the cut is the lowest that keeps that weighted share within
the budget. Harmful rows are not needed: a lower cut can only flag more of them, so the lowest cut
within the budget catches the most.

    record = calibrate_judge(det, cf, store, (0.3, 0.9), judge_fn)   # det.judge = record, saved with it

``python -m lit_sahs calibrate --judge_band LO,HI`` runs it; the judge's log-odds come from the store
when it was extracted with ``--judge true``, else from a judge prefill over the band's benign rows.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from lit_sahs.checks import probability, probability_band
from lit_sahs.data.extra_features import JUDGE_EXTRA
from lit_sahs.detectors.metrics import budget_threshold
from lit_sahs.errors import LitSahsError
from lit_sahs.self_judge import JudgeRule, band_decisions, stored_rule

METHOD = "crossfit_sources"


def fit_judge_cut(benign: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, band: tuple[float, float],
                  target_fpr: float) -> dict:
    """The judge calibration record for `band`. benign: source -> (detector scores, the judge's log-odds
    for the rows inside the band; any value elsewhere). The record: band, cut, target_fpr, threshold,
    the weighted benign FPR of the two-stage rule (``fpr``) and of the detector alone (``fpr_detector``),
    the share of benign rows judged, and each source's figures."""
    lo, hi = probability_band(band, "judge band")
    target_fpr = probability(target_fpr, "target_fpr")
    benign = {s: (np.asarray(v[0], dtype=np.float64), np.asarray(v[1], dtype=np.float64))
              for s, v in benign.items() if len(v[0])}
    if not benign:
        raise LitSahsError("cannot calibrate the judge cut: no benign rows were scored")
    fixed, values, weights = 0.0, [], []
    for src, (s, j) in benign.items():
        if len(j) != len(s):
            raise LitSahsError(f"source {src}: {len(j)} judge values for {len(s)} scores")
        w = 1.0 / (len(benign) * len(s))
        inside = (s >= lo) & (s <= hi)
        fixed += w * float(((s >= threshold) & ~inside).sum())
        values.append(j[inside])
        weights.append(np.full(int(inside.sum()), w))
    values, weights = np.concatenate(values), np.concatenate(weights)
    n = sum(len(s) for s, _ in benign.values())
    if not len(values):
        raise LitSahsError(f"the band {lo:g},{hi:g} holds none of the {n} cross-fitted benign scores: "
                           "widen it, or leave the judge out")
    if not np.isfinite(values).all():
        raise LitSahsError("cannot calibrate the judge cut: a judge log-odds is NaN or infinity")
    cut = budget_threshold(values, weights, target_fpr - fixed)
    rule = JudgeRule((lo, hi), cut)
    per_source = {}
    for src, (s, j) in sorted(benign.items()):
        flagged, judged, _ = band_decisions(s, s >= threshold, rule, lambda rows, j=j: j[rows])
        per_source[src] = {"rows": int(len(s)), "judged": int(judged.sum()), "fpr": float(flagged.mean()),
                           "fpr_detector": float((s >= threshold).mean())}
    mean = lambda key: float(np.mean([v[key] for v in per_source.values()]))  # noqa: E731 - sources weigh the same
    return {"method": METHOD, "band": [lo, hi], "cut": float(cut), "target_fpr": target_fpr,
            "threshold": float(threshold), "fpr": mean("fpr"), "fpr_detector": mean("fpr_detector"),
            "judged": float(len(values) / n), "per_source": per_source}


def store_logodds(store, ids: Sequence[str]) -> np.ndarray:
    """The judge's log-odds of rows `ids` from a store extracted with ``--judge true`` (float64)."""
    if JUDGE_EXTRA not in store.extra_names():
        raise LitSahsError(f"store {store.path} has no {JUDGE_EXTRA} extra: extract it with --judge true")
    return store.read_extra(JUDGE_EXTRA, rows=store.positions(ids)).astype(np.float64).reshape(-1)


def held_out_two_stage(record: dict, scores: np.ndarray, labels: np.ndarray, logodds: np.ndarray) -> dict:
    """The two-stage rule of `record` on scored rows with their judge log-odds: benign FPR and harmful
    TPR with and without the judge, and the share judged."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    alone = scores >= record["threshold"]
    flagged, judged, _ = band_decisions(scores, alone, stored_rule(record), lambda r: np.asarray(logodds)[r])

    def rate(f, label):
        return float(f[labels == label].mean()) if (labels == label).any() else float("nan")

    return {"band": list(record["band"]), "cut": float(record["cut"]), "promised_fpr": float(record["fpr"]),
            "judged": float(judged.mean()), "benign_fpr": rate(flagged, 0), "harmful_tpr": rate(flagged, 1),
            "benign_fpr_detector": rate(alone, 0), "harmful_tpr_detector": rate(alone, 1)}


def calibrate_judge(det, cf, store, band: tuple[float, float],
                    judge_fn: Optional[Callable[[Sequence], np.ndarray]] = None, batch_size: int = 8,
                    progress: bool = False) -> dict:
    """Fit `det`'s judge cut for `band` on the benign rows `cf` (a ``CrossFitThreshold`` of `det`'s
    recipe over `store`'s sources) scored out of source, at `det`'s threshold; give `det` the record.
    The log-odds: `store`'s judge extra when it has one, else ``judge_fn(texts)`` (the judge prefill
    over a batch of prompt texts), run on the rows inside the band only."""
    from tqdm.auto import tqdm

    lo, hi = probability_band(band, "judge band")
    if not cf.benign:
        raise LitSahsError("cannot calibrate the judge cut: the cross-fit kept no benign rows")
    wanted = sorted({i for ids, s in cf.benign.values() for i, v in zip(ids, s) if lo <= v <= hi})
    try:
        position = dict(zip(wanted, store.positions(wanted)))
    except LitSahsError as e:
        raise LitSahsError(f"cross-fitted {e}: give the store the detector was cross-fitted on") from None
    logodds: dict[str, float] = {}
    if wanted and JUDGE_EXTRA in store.extra_names():
        logodds = dict(zip(wanted, store_logodds(store, wanted).tolist()))
    elif wanted:
        if judge_fn is None:
            raise LitSahsError(f"store {store.path} has no {JUDGE_EXTRA} extra and no target was given to run the "
                               "judge prefill")
        index = store.index()
        for start in tqdm(range(0, len(wanted), batch_size), desc="judging the band's benign rows", unit="batch",
                          disable=not progress, leave=False):
            chunk = wanted[start:start + batch_size]
            values = np.asarray(judge_fn([index[position[i]]["text"] for i in chunk]), dtype=np.float64).reshape(-1)
            if len(values) != len(chunk):
                raise LitSahsError(f"the judge gave {len(values)} answers for {len(chunk)} prompts")
            logodds.update(zip(chunk, values.tolist()))
    benign = {src: (s, np.array([logodds.get(i, np.nan) for i in ids])) for src, (ids, s) in cf.benign.items()}
    record = fit_judge_cut(benign, float(det.threshold), (lo, hi), cf.target_fpr)
    det.judge = record
    return record


def live_judge(det, device: str = "auto") -> Callable[[Sequence], np.ndarray]:
    """texts -> the judge prefill's log-odds on the target `det` was made for, loaded at the first call
    (never, when the store already holds the log-odds); `det` itself is left as it is."""
    loaded = {}

    def judge(texts: Sequence) -> np.ndarray:
        from lit_sahs.devices import resolve_device
        from lit_sahs.self_judge import judge_logodds
        from lit_sahs.targets import load_target

        if "target" not in loaded:
            target = load_target(det.fingerprint.name, device=resolve_device(device))
            det.check_target(target.fingerprint)  # the judge must be the target the detector reads
            loaded["target"] = target
        return judge_logodds(loaded["target"], texts).numpy()

    return judge


def split_two_stage(record: dict, scores: np.ndarray, rows: Sequence[dict], store) -> Optional[dict]:
    """``held_out_two_stage`` on one split of `store` (rows with their detector `scores`), the judge's
    log-odds read from the store; None when the store does not hold them."""
    if JUDGE_EXTRA not in store.extra_names():
        return None
    return held_out_two_stage(record, scores, np.array([int(r["label"]) for r in rows]),
                              store_logodds(store, [r["id"] for r in rows]))
