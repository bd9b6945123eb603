"""A trial: fold by fold (held-out sources and/or attack families, `folds.Holdout`), reporting the
running mean held-out AUROC to Optuna after each fold so the pruner can stop a trial already behind."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lit_sahs.data.holdout import Holdout
from lit_sahs.folds import Folds, fit_fold
from lit_sahs.interrupts import interrupted
from lit_sahs.tracking import Tracker
from lit_sahs.tune.config import TuneConfig
from lit_sahs.tune.space import SearchSpace
from lit_sahs.detectors.metrics import AUROC, TPR_AT_1FPR


class Diverged(Exception):
    """A detector produced non-finite scores: the trial fails, the study goes on."""


@dataclass
class FoldScore:
    detector: object
    metrics: dict  # compute_report's columns on the test rows; threshold columns as <name>_at_threshold
    val_auroc: float
    n_test: int


def score_fold(folds: Folds, fold: Optional[Holdout | str], family: str, k: int, hparams: dict,
               cfg: TuneConfig, features: Optional[str] = None) -> FoldScore:
    """Fit on the fold's top-k heads (plus extra `features`) and score its test rows: the held-out rows
    of `fold`, never seen in training, threshold calibration or ranking (fold None: everything, a random
    test split)."""
    from lit_sahs.detectors import compute_report
    from lit_sahs.detectors.metrics import SCORE_COLUMNS, THRESHOLD_COLUMNS

    fit = fit_fold(folds, family, hparams, k, held_out=fold or (), max_epochs=cfg.epochs(family),
                   batch_size=cfg.batch_size, target_fpr=cfg.target_fpr, features=features)
    rows, scores = fit.rows("test"), fit.scores("test")
    if not np.isfinite(scores).all():
        raise Diverged(f"{family} detector with {hparams} produced non-finite scores")
    rep = compute_report(scores, folds.labels[rows], threshold=float(fit.detector.threshold))["overall"]
    metrics = {**{c: float(rep[c]) for c in SCORE_COLUMNS},
               **{f"{c}_at_threshold": float(rep[c]) for c in THRESHOLD_COLUMNS}}
    return FoldScore(fit.detector, metrics, float(fit.val_metrics.get("val/auroc", float("nan"))), int(len(rows)))


class Objective:
    def __init__(self, cfg: TuneConfig, folds: Folds, holdouts: list[Holdout], space: SearchSpace, tracker: Tracker,
                 parent: str):
        self.cfg, self.folds, self.holdouts, self.space = cfg, folds, holdouts, space
        self.tracker, self.parent = tracker, parent
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.started = 0  # trials this worker ran

    def __call__(self, trial) -> float:
        import optuna

        self.started += 1
        family, k, hparams, features = self.space.sample(trial)
        run = self.tracker.create_run(f"trial-{trial.number}", {"lit_sahs.kind": "trial",
                                                                "optuna.study_name": self.cfg.study_name,
                                                                "optuna.trial_number": trial.number,
                                                                "lit_sahs.worker": self.worker}, parent=self.parent)
        trial.set_user_attr("mlflow_run_id", run)
        trial.set_user_attr("worker", self.worker)
        self.tracker.log(run, params={"detector": family, "k": k, "features": features or "none",
                                      **{f"{family}.{h}": v for h, v in hparams.items()}})
        aurocs: dict[str, float] = {}
        tprs: dict[str, float] = {}
        status = "FAILED"
        try:
            for step, hold in enumerate(self.holdouts):
                fam = hold.name
                r = score_fold(self.folds, hold, family, k, hparams, self.cfg, features)
                aurocs[fam], tprs[fam] = r.metrics[AUROC], r.metrics[TPR_AT_1FPR]
                running = float(np.mean(list(aurocs.values())))
                self.tracker.log(run, metrics={**{f"held_out/{fam}/{m}": v for m, v in r.metrics.items()},
                                               f"val/{fam}/auroc": r.val_auroc})
                self.tracker.log(run, metrics={"running_mean_held_out_auroc": running}, step=step)
                trial.set_user_attr("held_out_auroc", dict(aurocs))
                trial.set_user_attr(TPR_AT_1FPR, dict(tprs))
                trial.report(running, step)
                if trial.should_prune():
                    status = "KILLED"
                    self.tracker.log(run, tags={"optuna.state": "PRUNED", "optuna.pruned_at_fold": fam})
                    raise optuna.TrialPruned(f"pruned after fold {fam} (running mean held-out AUROC {running:.4f})")
            value = float(np.mean(list(aurocs.values())))
            mean_tpr = float(np.mean(list(tprs.values())))
            trial.set_user_attr("mean_tpr_at_1fpr", mean_tpr)
            trial.set_user_attr("min_held_out_auroc", float(min(aurocs.values())))
            self.tracker.log(run, metrics={"mean_held_out_auroc": value, "mean_tpr_at_1fpr": mean_tpr,
                                           "min_held_out_auroc": float(min(aurocs.values()))},
                             tags={"optuna.state": "COMPLETE"})
            status = "FINISHED"
            return value
        except Diverged as e:
            self.tracker.log(run, tags={"optuna.state": "FAIL", "error": str(e)[:500]})
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            status = "KILLED"
            if isinstance(e, SystemExit) and interrupted():  # Lightning's exit after Ctrl+C in a fit: Optuna
                raise KeyboardInterrupt from None  # marks the trial failed on an interrupt, not on SystemExit
            raise
        finally:
            self.tracker.end(run, status)
