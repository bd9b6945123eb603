"""`python -m lit_sahs calibrate`: give a trained detector the threshold cross-fitted over the sources
of the store it was trained on (``lit_sahs.crossfit``), so that the false-positive rate it was
calibrated to holds better on benign prompts from collections it never read.

    python -m lit_sahs calibrate --detector artifacts/guard/detector --store stores/guard-smollm2

With ``--judge_band LO,HI`` it also fits the cut of the judge's second stage for that band on the same
out-of-source benign scores (``lit_sahs.judge_cut``): guard and screen then let the target's own verdict
decide the prompts whose score lies in the band, and the two stages together keep the target FPR.

With ``--answer_tpr S`` it also ships the answer side's cut (``lit_sahs.answer_cut``): prompts scored
below it are answered for sure (no refusal openings; with ``--answer_direction F`` also the refusal
direction ablated), placed so that S of the harmful prompts of unseen sources stay above it. Their
scores are the cross-fitted ones of ``--store``, or the detector's own scores of ``--answer_sources``
(packaged sources or file:PATH the detector never trained on), scored inside each of ``--answer_attacks``
(wrapped prompts score lower than plain ones: a cut placed on plain prompts alone does not hold on wrapped
traffic): the way for a family that trains on no store (SafeVLM), which takes no ``--store``.

    python -m lit_sahs calibrate --detector artifacts/safevlm-stage2/detector --answer_tpr 0.9 \
        --answer_sources future_tense,rho_overrefusal --answer_attacks plain,pyrit \
        --answer_direction refusal-direction.safetensors
"""
from __future__ import annotations

import json
from typing import Optional

from lit_sahs.choices import Pairing
from lit_sahs.commands import run_command
from lit_sahs.errors import LitSahsError


def calibrate_command(detector: str, store: Optional[str] = None, out: Optional[str] = None,
                      target_fpr: Optional[float] = None, pairing: Pairing = "round_robin", min_rows: int = 10,
                      max_epochs: Optional[int] = None, relocate: bool = True, seed: int = 0,
                      tracking_uri: Optional[str] = None, judge_band: Optional[str] = None, batch_size: int = 8,
                      device: str = "auto", answer_tpr: Optional[float] = None, answer_sources: Optional[str] = None,
                      answer_limit: int = 200, answer_attacks: str = "plain", answer_direction: Optional[str] = None,
                      held_out_families: str = "",
                      held_out_sources: str = "") -> int:
    """Cross-fit a detector's threshold over the sources of its store, and/or place its answer side's cut,
    and write the detector with them.

    Args:
        detector: detector artifact dir, .ckpt or MLflow URI
        store: the activation store the detector was trained on (its sources are the folds); without it
            the threshold is left as it is
        out: where to write the recalibrated detector (default: over --detector, a directory)
        target_fpr: share of benign prompts of an unseen source to flag (default: the detector's own)
        pairing: source folds: round_robin (every source left out once) or all_pairs
        min_rows: smallest source fold used
        max_epochs: epochs per fold fit (default: the family's own)
        relocate: locate the heads again inside each fold (else every fold uses the detector's heads)
        seed: split seed of the fold fits (and of the --answer_limit draw)
        tracking_uri: MLflow tracking URI for models:/ and runs:/ detectors
        judge_band: LO,HI: also fit the judge's cut for this band of detector scores (the judge's
            log-odds come from the store's judge extra, else from a judge prefill on the target)
        batch_size: prompts per judge prefill or --answer_sources forward
        device: where the target runs for the judge prefill and --answer_sources: auto, cpu, cuda, cuda:N or mps
        answer_tpr: ship the answer side's cut: the highest score that keeps this share of the harmful prompts
            of unseen sources at or above it (prompts below it are answered without refusal openings)
        answer_sources: comma-separated sources (packaged names or file:PATH) the detector never trained on,
            whose harmful prompts it scores live for --answer_tpr (default: the store's cross-fitted scores)
        answer_limit: most prompts read from each of --answer_sources
        answer_attacks: comma-separated attacks (jailbreak templates, as ``extract --attacks``) each of
            --answer_sources' prompts is scored in; each (source, attack) weighs the same. Templates
            of families the detector trained on (never the family a report tests on) make the cut hold on
            wrapped traffic, whose harmful scores sit lower than plain prompts'
        answer_direction: a refusal direction file (``python -m lit_sahs direction``), or a detector artifact
            that ships one, to ship with the cut: guards ablate it while the prompts below the cut decode; ``from_store``: fitted here on --store's
            rows outside the held-out ones, its layer picked by effect on the target
        held_out_families: comma-separated attack families of the store left out of every fold (e.g. the
            family a report tests on)
        held_out_sources: comma-separated sources of the store left out of every fold
    """
    from lit_sahs.answer_cut import FROM_STORE, LIVE, fit_answer_cut, shipped_direction, summary
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.checks import at_least, probability_band
    from lit_sahs.model_uri import is_uri
    from lit_sahs.outputs import check_outputs
    from lit_sahs.data.holdout import Holdout

    if out is None and (is_uri(detector) or str(detector).endswith(".ckpt")):
        raise LitSahsError("--out is needed when --detector is an MLflow URI or a checkpoint")
    check_outputs(dirs={"--out": out})
    band = probability_band(judge_band)  # bad options fail before hours of fitting
    at_least({"--batch_size": batch_size, "--answer_limit": answer_limit}, 1)
    sources = [s.strip() for s in (answer_sources or "").split(",") if s.strip()]
    attacks = [a.strip() for a in (answer_attacks or "").split(",") if a.strip()] or ["plain"]
    if sources:
        from lit_sahs.data.attacks import get_attack

        for name in attacks:  # a typo fails before the detector and target load
            get_attack(name)
    _check_plan(store, band, answer_tpr, sources, answer_direction, held_out_families or held_out_sources)
    det = load_detector(detector, tracking_uri=tracking_uri)
    held = Holdout(families=held_out_families, sources=held_out_sources)
    direction = None
    if answer_direction:
        if answer_direction != FROM_STORE:  # a file (or a detector that ships one) is checked first: it costs nothing
            from lit_sahs.live_answer_cut import direction_of

            direction = direction_of(answer_direction, det, "--answer_direction")
        if answer_tpr is None and det.answer is None:  # before minutes of fold fits
            raise LitSahsError("--answer_direction acts on the prompts below the answer cut, and the detector has "
                               "none: calibrate with --answer_tpr too")
        direction = direction or shipped_direction(answer_direction, det, store, held, device)
    before, cf, judge = float(det.threshold), None, None
    if store is not None:
        cf, judge = _crossfit(det, store, held, band, target_fpr, pairing, min_rows, max_epochs, relocate, seed,
                              batch_size, device)
    if answer_tpr is not None:
        if sources:
            from lit_sahs.live_answer_cut import live_scores

            harmful, benign = live_scores(det, sources, answer_limit, attacks, seed, batch_size, device)
            det.answer = fit_answer_cut(harmful, answer_tpr, benign, method=LIVE)
        else:
            det.answer = cf.answer_cut(answer_tpr)
    if direction is not None:
        det.answer_direction = direction
    path = save_detector(det, out or detector, overwrite=True)
    report = {"detector": str(path), "threshold_before": before, "threshold": float(det.threshold)}
    if cf is not None:
        report.update(target_fpr=cf.target_fpr, folds=cf.folds, per_source=cf.per_source)
    print(json.dumps({**report, **({"judge": judge} if judge else {}),
                      **({"answer": summary(det.answer, det.answer_direction)} if det.answer else {})}))
    return 0


def _check_plan(store, band, answer_tpr, sources, answer_direction, held_out) -> None:
    """What the options ask for must be doable, before anything loads."""
    from lit_sahs.answer_cut import FROM_STORE

    if held_out and store is None:
        raise LitSahsError("--held_out_families / --held_out_sources leave store rows out of the folds: give --store")
    if sources and answer_tpr is None:
        raise LitSahsError("--answer_sources are scored for the answer cut: give --answer_tpr too")
    if store is None and answer_tpr is None and answer_direction is None:
        raise LitSahsError("nothing to calibrate: give --store (the threshold), --answer_tpr or --answer_direction")
    if band is not None and store is None:
        raise LitSahsError("--judge_band is fitted on the store's cross-fitted scores: give --store")
    if answer_direction == FROM_STORE and store is None:
        raise LitSahsError(f"--answer_direction {FROM_STORE} fits the direction on the training rows of a store: give --store")
    if answer_tpr is not None:
        from lit_sahs.checks import answer_tpr_arg

        answer_tpr_arg(answer_tpr)
        if store is None and not sources:
            raise LitSahsError("--answer_tpr needs harmful scores of sources the detector never read: give --store "
                               "(cross-fitted) or --answer_sources")


def _crossfit(det, store, held, band, target_fpr, pairing, min_rows, max_epochs, relocate, seed, batch_size, device):
    """The cross-fitted threshold (given to `det`) and, with a band, the judge cut; `held`'s rows stay out."""
    from lit_sahs.crossfit import crossfit_detector
    from lit_sahs.folds import PER_FOLD, Folds

    folds = Folds(store, ranking=PER_FOLD if relocate else None, heads=None if relocate else det.head_set.spec(),
                  seed=seed)
    held.keeps(folds.index)  # a held-out name no row carries is a typo: refused before the fits
    cf = crossfit_detector(det, folds, held, target_fpr=target_fpr, pairing=pairing, min_rows=min_rows,
                           max_epochs=max_epochs, progress=True)
    judge = None if band is None else _calibrate_judge(det, cf, folds.store, band, batch_size, device)
    return cf, judge


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
