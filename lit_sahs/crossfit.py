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

``CrossFitCalibration`` (a callback: ``trainer.callbacks`` in a fit config) gives a detector the
cross-fitted threshold before it is tested and exported; ``python -m lit_sahs calibrate`` applies
it to a detector artifact; ``evaluate --protocol sources --crossfit true`` measures, per held-out
source, the benign FPR it promises against the one observed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import numpy as np

from lit_sahs.checks import answer_tpr_arg, probability, probability_band
from lit_sahs.choices import Pairing
from lit_sahs.data.holdout import Holdout
from lit_sahs.detectors.metrics import weighted_threshold
from lit_sahs.errors import LitSahsError
from lit_sahs.family import ModelFamily
from lit_sahs.folds import PER_FOLD, Folds, fit_fold, source_holdouts

METHOD = "crossfit_sources"


@dataclass
class CrossFitThreshold:
    """A threshold cross-fitted over source folds. `per_source`: each benign source's rows and the
    share of them flagged at `threshold` (scored by the fold fit that left the source out). `benign`:
    each source's (row ids, out-of-source scores), what the judge band's cut is fitted on
    (``lit_sahs.judge_cut``); `harmful`: each harmful source's out-of-source scores, what the answer side's
    cut is fitted on (``lit_sahs.answer_cut``); both kept in memory only."""

    threshold: float
    target_fpr: float
    folds: list[str]
    per_source: dict[str, dict] = field(default_factory=dict)
    benign: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict, repr=False)
    harmful: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for the answer cut (answer_cut)

    def answer_cut(self, answer_tpr: float) -> dict:
        """The answer side's cut placed on these out-of-source harmful scores (``answer_cut.fit_answer_cut``),
        with the benign share below it per source."""
        from lit_sahs.answer_cut import fit_answer_cut

        return fit_answer_cut(self.harmful, answer_tpr, {src: v for src, (_, v) in self.benign.items()})

    def metadata(self) -> dict:
        """What an artifact records about its threshold (JSON-safe)."""
        return {"method": METHOD, "target_fpr": self.target_fpr, "threshold": self.threshold,
                "folds": list(self.folds), "per_source": {s: dict(v) for s, v in self.per_source.items()}}


def inner_source_folds(folds: Folds, held_out: Holdout = Holdout(), pairing: str = "round_robin",
                       min_rows: int = 10) -> list[Holdout]:
    """The source folds of the rows `held_out` leaves (its sources and attack families out of every fold)."""
    return source_holdouts([r for r, keep in zip(folds.index, held_out.keeps(folds.index)) if keep], pairing, min_rows)[0]


def left_out_fit(folds: Folds, fold: Holdout, held_out: Holdout, family: str, hparams: Optional[dict], k: int,
                 **fit_args):
    """(fit, its test rows, mask of those rows from `fold`'s sources outside `held_out`'s families): a detector
    fitted without `fold`'s sources (and without `held_out`), and which of its test rows it never saw the like of."""
    fit = fit_fold(folds, family, hparams, k, Holdout(held_out.families, held_out.sources + fold.sources), **fit_args)
    test = fit.datamodule.split_rows("test")
    mine = np.array([str(r.get("source", "")) in fold.sources and r.get("attack_family", "plain") not in held_out.families
                     for r in test], dtype=bool)
    return fit, test, mine


def crossfit_threshold(folds: Folds, family: str, hparams: Optional[dict], k: int,
                       held_out: Holdout = Holdout(), target_fpr: float = 0.05, pairing: str = "round_robin",
                       min_rows: int = 10, max_epochs: Optional[int] = None, features: Optional[str] = None,
                       all_heads: bool = False, progress: bool = False) -> CrossFitThreshold:
    """Cross-fit the threshold of a `family` detector on the sources of `folds` that `held_out` leaves
    for training (an outer fold's held-out sources and families stay out of every inner fit)."""
    from tqdm.auto import tqdm

    try:
        inner = inner_source_folds(folds, held_out, pairing, min_rows)
    except LitSahsError as e:
        raise LitSahsError(f"cannot cross-fit the threshold over the training sources: {e}") from None
    scores: dict[str, list[np.ndarray]] = {}
    harmful: dict[str, list[np.ndarray]] = {}
    ids: dict[str, list[str]] = {}
    for hold in tqdm(inner, desc="cross-fitting the threshold", unit="fold", disable=not progress, leave=False):
        fit, test, _ = left_out_fit(folds, hold, held_out, family, hparams, k, max_epochs=max_epochs,
                                    target_fpr=target_fpr, features=features, all_heads=all_heads)
        s = np.asarray(fit.scores("test"), dtype=np.float64)
        label = np.array([int(r["label"]) for r in test])
        for src in hold.sources:
            mine = np.array([str(r.get("source", "")) == src and r.get("attack_family", "plain") not in held_out.families
                             for r in test], dtype=bool)
            mask = mine & (label == 0)
            if mask.any():
                scores.setdefault(src, []).append(s[mask])
                ids.setdefault(src, []).extend(str(r["id"]) for r, m in zip(test, mask) if m)
            if (mine & (label == 1)).any():
                harmful.setdefault(src, []).append(s[mine & (label == 1)])
    pooled = {src: np.concatenate(v) for src, v in scores.items()}
    t = weighted_threshold(pooled, target_fpr)
    per_source = {src: {"rows": int(len(v)), "fpr": float((v >= t).mean())} for src, v in sorted(pooled.items())}
    return CrossFitThreshold(t, float(target_fpr), [h.name for h in inner], per_source,
                             {src: (ids[src], v) for src, v in pooled.items()},
                             {src: np.concatenate(v) for src, v in sorted(harmful.items())})


def crossfit_detector(det: ModelFamily, folds: Folds, held_out: Holdout = Holdout(), target_fpr: Optional[float] = None,
                      pairing: Pairing = "round_robin", min_rows: int = 10, max_epochs: Optional[int] = None,
                      progress: bool = False) -> CrossFitThreshold:
    """Cross-fit `det`'s own recipe (family, hyper-parameters, head count, extra features) over the
    sources of `folds`, then give `det` the threshold and its calibration record."""
    if not det.reads_store:
        raise LitSahsError(f"a {det.family} detector does not train on a store: only families that do can be "
                           "cross-fitted over its sources")
    if not folds.fingerprint.matches(det.fingerprint):
        raise LitSahsError(f"store {folds.store_path} was extracted from {folds.fingerprint.name}, the detector "
                           f"reads {det.fingerprint.name}: give the store it was trained on")
    hparams = det.artifact_metadata()["hparams"]
    target_fpr = probability(hparams.get("target_fpr", 0.05) if target_fpr is None else target_fpr, "target_fpr")
    g = folds.geometry
    cf = crossfit_threshold(folds, det.family, hparams, len(det.head_set), held_out, target_fpr, pairing, min_rows,
                            max_epochs, features=det.feature_spec.request(det.head_set),
                            all_heads=len(det.head_set) == g.num_layers * g.num_heads, progress=progress)
    det.threshold.fill_(cf.threshold)
    det.calibration = cf.metadata()
    det.judge = None  # a judge cut fitted at the old threshold no longer keeps its FPR (lit_sahs.judge_cut)
    return cf


class CrossFitCalibration(L.Callback):
    """Give the fitted detector the threshold cross-fitted over its store's training sources, before
    the test report and the export read it (after the best checkpoint is restored). The sources the
    DataModule holds out stay out of every inner fit, so the test report still describes unseen ones;
    so do its validation-only sources (``val_sources``: never trained on, by the fit or by an inner fit).

    In a fit config::

        trainer:
          callbacks:
            - class_path: lit_sahs.crossfit.CrossFitCalibration

    Args:
        pairing: inner source folds: round_robin (every source left out once) or all_pairs
        min_rows: smallest inner fold used
        max_epochs: epochs per inner fit (default: the outer fit's)
        relocate: with a ranking, locate the heads again inside each inner fold (else its top-k)
        target_fpr: share of an unseen source's benign prompts to flag (default: the detector's own)
        judge_band: [LO, HI]: also fit the cut of the judge's second stage for this band of scores on
            the same out-of-source benign rows (``lit_sahs.judge_cut``; the store's judge extra, else
            a judge prefill on the target), shipped with the detector
        answer_tpr: also place the answer side's cut so that this share of the out-of-source harmful
            rows stays at or above it (``lit_sahs.answer_cut``), shipped with the detector: its guards
            answer the prompts below it without refusal openings
        answer_direction: the refusal direction shipped with that cut: a file (``python -m lit_sahs direction``),
            or ``from_store``: fitted on the store's training rows, its layer picked by effect on the target
            (``refusal_direction.select_layer``; loads the target)
    """

    def __init__(self, pairing: Pairing = "round_robin", min_rows: int = 10, max_epochs: Optional[int] = None,
                 relocate: bool = True, target_fpr: Optional[float] = None,
                 judge_band: Optional[list[float]] = None, answer_tpr: Optional[float] = None,
                 answer_direction: Optional[str] = None):
        self.pairing, self.min_rows, self.max_epochs = pairing, min_rows, max_epochs
        self.relocate, self.target_fpr = relocate, target_fpr
        self.judge_band = probability_band(judge_band, "judge_band")
        if answer_tpr is not None:
            answer_tpr_arg(answer_tpr, "answer_tpr")
        if answer_direction is not None and answer_tpr is None:
            raise LitSahsError("answer_direction acts on the prompts below the answer cut: set answer_tpr too")
        self.answer_tpr, self.answer_direction = answer_tpr, answer_direction
        self.result: Optional[CrossFitThreshold] = None
        self.judge: Optional[dict] = None
        self.answer: Optional[dict] = None
        self.direction = None  # the loaded answer_direction, shipped with the cut

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_sahs.data.datamodules import CachedActivationDataModule

        dm = trainer.datamodule
        if trainer.fast_dev_run:
            return  # a debugging run: one batch, nothing worth calibrating
        if not isinstance(dm, CachedActivationDataModule):
            raise LitSahsError("CrossFitCalibration re-fits the detector on the sources of an activation store: "
                               "use it with lit_sahs.data.datamodules.CachedActivationDataModule")
        held = Holdout(dm.holdout.families, tuple(dm.holdout.sources) + tuple(dm.val_sources))
        direction = None
        if self.answer_direction is not None:  # a file is checked before the fold fits
            from lit_sahs.answer_cut import shipped_direction

            direction = shipped_direction(self.answer_direction, pl_module, dm.store, held, str(pl_module.device),
                                          "answer_direction")
        g = dm.geometry
        if dm.ranking_path and self.relocate:
            ranking, heads = PER_FOLD, None
        elif dm.ranking_path:
            ranking, heads = dm.ranking_path, None
        else:  # explicit heads (every head included)
            ranking, heads = None, dm.head_set.spec() if len(dm.head_set) < g.num_layers * g.num_heads else None
        folds = Folds(dm.store_path, ranking=ranking, heads=heads, seed=dm.seed, val_fraction=dm.val_fraction,
                      test_fraction=dm.test_fraction)
        self.result = crossfit_detector(pl_module, folds, held, self.target_fpr, self.pairing, self.min_rows,
                                        self.max_epochs or trainer.max_epochs, progress=True)
        ps = ", ".join(f"{s} {v['fpr']:.2f}" for s, v in self.result.per_source.items())
        print(f"threshold cross-fitted over {len(self.result.folds)} source folds: {self.result.threshold:.4f} "
              f"(target FPR {self.result.target_fpr:.0%}; each left-out benign source flagged at it: {ps})")
        if self.judge_band is not None:
            from lit_sahs.judge_cut import calibrate_judge, live_judge

            self.judge = calibrate_judge(pl_module, self.result, folds.store, self.judge_band,
                                         live_judge(pl_module, str(pl_module.device)), progress=True)
            print(f"judge cut for the band {self.judge_band[0]:g}-{self.judge_band[1]:g}: {self.judge['cut']:.3f} "
                  f"log-odds ({self.judge['judged']:.0%} of cross-fitted benign rows judged; benign FPR "
                  f"{self.judge['fpr_detector']:.3f} detector alone, {self.judge['fpr']:.3f} with the judge)")
        if self.answer_tpr is not None:
            self.answer = self.result.answer_cut(self.answer_tpr)
            self.direction = direction
            print(f"answer cut: {self.answer['answer_below']:.4g} (out-of-source harmful rows kept above it "
                  f"{self.answer['kept']:.2f}, benign rows below it {self.answer.get('answered', float('nan')):.2f})")
        self._apply(pl_module)  # a fit that is not tested (no output_dir) ends with them too

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)  # the best checkpoint restored its own (validation) threshold

    def _apply(self, pl_module: L.LightningModule) -> None:
        if self.result is not None:
            pl_module.threshold.fill_(self.result.threshold)
            pl_module.calibration = self.result.metadata()
            pl_module.judge = self.judge
            if self.answer is not None:
                pl_module.answer, pl_module.answer_direction = self.answer, self.direction
