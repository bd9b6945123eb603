"""`python -m lit_sahs tune`: an Optuna study over detector settings, every trial an MLflow run.

A trial picks a detector family, a number of heads `k` and the family's hyper-parameters, then
runs the folds of its `objective` (`lit_sahs.folds`): `sources` (default: one harmful and one
benign source held out per fold, the closest the store gets to prompts a guard has never seen),
`families` (one attack family held out per fold) or `both`. Each fold fits on the rest and scores
the held-out rows, which it never saw (with `ranking: per_fold` the heads are also ranked without
them). The trial's value is the mean held-out AUROC; the mean TPR at 1% FPR is recorded beside
it. After each fold the running mean goes to the pruner.

The search space and the objective's definition are stored in the study, so a worker with other
settings is refused rather than mixing incomparable trials. Workers share a study through any
SQLAlchemy storage (SQLite by default, PostgreSQL across machines); each trial is a child of the
study's MLflow parent run whoever ran it. With `refit: true` the best settings are refitted on all
families and logged (`refit-trial-<n>`, artifact `detector/`), ready for `lit_sahs register --study`.
Details: docs/tune_and_registry.md.

Modules: `config` (the options), `space` (the search space), `objective` (a trial), `study`
(create/join the study, run the trials), `refit` (refit, plots, baselines).
"""
from __future__ import annotations

import json
import logging
import warnings

from lit_sahs.interrupts import quiet_interrupt_tracebacks
from lit_sahs.tune.config import TuneConfig, parse_config

# the rest is imported on first use (PEP 562), so `tune --help` does not load torch, Lightning or Optuna
_LAZY = {"Objective": "objective", "score_fold": "objective", "refit_best": "refit", "DEFAULT_SPACE": "space",
         "Dim": "space", "SearchSpace": "space", "open_study": "study", "run_tune": "study"}

__all__ = ["DEFAULT_SPACE", "Dim", "Objective", "SearchSpace", "TuneConfig", "main", "open_study", "parse_config",
           "refit_best", "run_tune", "score_fold"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"lit_sahs.tune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lit_sahs.tune' has no attribute {name!r}")


def main(argv: list[str]) -> int:
    cfg = parse_config(argv)  # before the study's imports: --help and a bad option need none of them
    from lit_sahs.tune.study import run_tune

    _quiet()
    result = run_tune(cfg)
    print(_summary(result))
    print(json.dumps(result, default=float))
    return 0


def _quiet() -> None:
    import optuna

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    quiet_interrupt_tracebacks("optuna")  # Ctrl+C: the CLI's one line, not the stopped trial's traceback
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _summary(result: dict) -> str:
    lines = [f"study {result['study']} at {result['storage']}: trials {result['trials']} "
             f"({result['ran_here']} run by this worker); held out: {', '.join(result['families'])}"]
    best = result.get("best")
    if best:
        lines.append(f"best trial {best['trial']}: mean held-out AUROC {best['value']:.4f}, mean TPR@1%FPR "
                     f"{(best.get('mean_tpr_at_1fpr') or float('nan')):.4f}, params {best['params']}")
    if result.get("trials_table"):
        lines.append(f"every trial, best first: {result['trials_table']}")
    refit = result.get("refit")
    if refit:
        lines.append(f"refit run {refit['run_id']}: model {refit.get('model')}, detector {refit['detector']} "
                     f"(local copy {refit['local_detector']}); register it with "
                     f"`python -m lit_sahs register --detector {refit['detector']} --name <name> --alias champion`")
    return "\n".join(lines)
