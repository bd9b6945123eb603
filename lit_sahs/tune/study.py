"""The study: create or join it (refusing a changed search space or objective), run this worker's
trials, then hand the best to the refit. Workers share a study through its RDB storage."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from lit_sahs.errors import LitSahsError
from lit_sahs.folds import Folds
from lit_sahs.tracking import Tracker, open_storage, redact
from lit_sahs.tune.config import TuneConfig
from lit_sahs.tune.objective import Diverged, Objective
from lit_sahs.tune.space import SearchSpace
from lit_sahs.detectors.metrics import TPR_AT_1FPR

log = logging.getLogger(__name__)

SPACE_ATTR = "lit_sahs.search_space"
OBJECTIVE_ATTR = "lit_sahs.objective"
MLFLOW_ATTR = "lit_sahs.mlflow"
JOIN_WAIT_S = 30.0


def make_sampler(spec: dict, seed: Optional[int]):
    import optuna

    spec = dict(spec or {})
    name = spec.pop("name", "tpe")
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **spec)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    except TypeError as e:
        raise LitSahsError(f"sampler {name!r} does not take {spec}: {e}") from None
    raise LitSahsError(f"unknown sampler {name!r}: use tpe or random")


def make_pruner(spec: dict):
    import optuna

    spec = dict(spec or {})
    name = spec.pop("name", "median")
    kinds = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
             "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner}
    if name in ("none", None):
        return optuna.pruners.NopPruner()
    if name not in kinds:
        raise LitSahsError(f"unknown pruner {name!r}: use {', '.join(kinds)} or none")
    try:
        return kinds[name](**spec)
    except (TypeError, ValueError) as e:
        raise LitSahsError(f"pruner {name!r} does not accept {spec}: {e}") from None


METRICS = {"families": "mean held-out-family AUROC (leave one attack family out)",
           "sources": "mean held-out-source AUROC (one harmful and one benign source held out per fold)",
           "both": "mean held-out AUROC over source folds and attack-family folds"}


def objective_spec(cfg: TuneConfig, folds: Folds, holdouts: list) -> dict:
    """What a trial's value means; a study refuses workers whose spec differs."""
    fp = folds.fingerprint
    return {
        "metric": METRICS[cfg.objective],
        "objective": cfg.objective,
        "direction": "maximize",
        "target": {"name": fp.name, "weights_hash": fp.weights_hash, "geometry": list(fp.geometry.shape)},
        "store_rows": len(folds.index),
        "families": [h.name for h in holdouts],
        "ranking": ranking_id(folds),
        "max_epochs": cfg.epochs_record(),
        "batch_size": cfg.batch_size,
        "val_fraction": cfg.val_fraction,
        "target_fpr": cfg.target_fpr,
        "seed": cfg.seed,
    }


def ranking_id(folds: Folds) -> str:
    if folds.per_fold:
        return "per_fold"
    import hashlib
    from pathlib import Path

    p = Path(folds.ranking)
    if not p.is_file():
        raise LitSahsError(f"no head ranking at {p}: run `python -m lit_sahs locate` first or use ranking: per_fold")
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _diff(recorded: dict, now: dict) -> list[str]:
    keys = sorted(set(recorded) | set(now))
    return [k for k in keys if recorded.get(k) != now.get(k)]


def open_study(cfg: TuneConfig, storage, space: dict, objective: dict, tracker: Tracker):
    """Create the study (and its MLflow parent run) or join it; refuse a study whose search space or
    objective differ. Returns (study, parent_run_id, created)."""
    import optuna

    pruner = make_pruner(cfg.pruner)
    try:
        storage.get_study_id_from_name(cfg.study_name)
        existing = True
    except KeyError:
        existing = False
    if not existing:
        parent = tracker.create_run(cfg.study_name, {"lit_sahs.kind": "study", "optuna.study_name": cfg.study_name,
                                                     "optuna.storage": redact(cfg.storage)})
        study = None
        try:
            study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize",
                                        sampler=make_sampler(cfg.sampler, cfg.seed), pruner=pruner)
            study.set_user_attr(SPACE_ATTR, space)
            study.set_user_attr(OBJECTIVE_ATTR, objective)
            tracker.log(parent, params={"study_name": cfg.study_name, "storage": redact(cfg.storage),
                                        "objective": json.dumps(objective), "search_space": json.dumps(space),
                                        "pruner": json.dumps(cfg.pruner), "sampler": json.dumps(cfg.sampler)})
            study.set_user_attr(MLFLOW_ATTR, {"tracking_uri": redact(tracker.uri),
                                              "experiment_id": tracker.experiment_id, "parent_run_id": parent})
            return study, parent, True
        except optuna.exceptions.DuplicatedStudyError:  # another worker won the race: join its study
            tracker.client.delete_run(parent)
        except BaseException:  # nothing half-made: no study without its records, no orphan parent run
            with contextlib.suppress(Exception):
                if study is not None:
                    optuna.delete_study(study_name=cfg.study_name, storage=storage)
            with contextlib.suppress(Exception):
                tracker.client.delete_run(parent)
            raise
    study = optuna.load_study(study_name=cfg.study_name, storage=storage,
                              sampler=make_sampler(cfg.sampler, None), pruner=pruner)
    attrs = storage.get_study_user_attrs(study._study_id)
    deadline = time.monotonic() + JOIN_WAIT_S
    while MLFLOW_ATTR not in attrs and not study.trials and time.monotonic() < deadline:
        time.sleep(0.5)  # the creating worker is still writing the study's records
        attrs = storage.get_study_user_attrs(study._study_id)
    if SPACE_ATTR not in attrs or OBJECTIVE_ATTR not in attrs or MLFLOW_ATTR not in attrs:
        raise LitSahsError(f"study {cfg.study_name!r} in {redact(cfg.storage)} was not created by `lit_sahs tune` "
                           "(it records no search space): choose another study_name")
    changed = _diff(attrs[SPACE_ATTR], space)
    if changed:
        raise LitSahsError(f"the search space of study {cfg.study_name!r} changed ({', '.join(changed)}: recorded "
                           f"{ {k: attrs[SPACE_ATTR].get(k) for k in changed} }, now { {k: space.get(k) for k in changed} }): "
                           "trials of different spaces are not comparable; use a new study_name or the recorded space")
    changed = _diff(attrs[OBJECTIVE_ATTR], objective)
    if changed:
        raise LitSahsError(f"study {cfg.study_name!r} was created with another objective ({', '.join(changed)}: recorded "
                           f"{ {k: attrs[OBJECTIVE_ATTR].get(k) for k in changed} }, now "
                           f"{ {k: objective.get(k) for k in changed} }): use a new study_name or the recorded settings")
    parent = attrs[MLFLOW_ATTR]["parent_run_id"]
    try:
        tracker.experiment_id = tracker.client.get_run(parent).info.experiment_id  # trials go beside their parent
    except Exception:  # noqa: BLE001
        raise LitSahsError(f"study {cfg.study_name!r} logs to the MLflow parent run {parent} at "
                           f"{attrs[MLFLOW_ATTR].get('tracking_uri')}, which {redact(tracker.uri)} does not hold: "
                           "give every worker the same tracking_uri") from None
    return study, parent, False



def run_tune(cfg: TuneConfig) -> dict:
    """Create or join the study, run this worker's trials, refit the best. Returns a summary dict."""
    cfg.check()
    folds = Folds(cfg.store, cfg.ranking, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    holdouts = folds.holdouts(cfg.objective, cfg.families, cfg.min_rows, cfg.pairing, cfg.sources)
    space = SearchSpace.parse(cfg.space, folds.max_heads())
    from lit_sahs.data.extra_features import TOKEN_HEADS_EXTRA, FeatureSpec, store_token_heads

    from lit_sahs.heads import HeadSet

    # any head the store serves: `mean` pools the trial's heads, `tokens` reads them at every token
    probe = HeadSet(store_token_heads(folds.store)[:1] if TOKEN_HEADS_EXTRA in folds.store.extra_names() else [(0, 0)])
    for spec in space.feature_specs():  # a feature the store lacks: refused before any study exists
        FeatureSpec.for_store(folds.store, spec, heads=probe)
    objective = objective_spec(cfg, folds, holdouts)
    storage = open_storage(cfg.storage, cfg.heartbeat_interval)
    tracker = Tracker(cfg.tracking_uri, cfg.experiment)
    study, parent, created = open_study(cfg, storage, space.to_dict(), objective, tracker)
    try:
        return _optimise(cfg, study, parent, created, folds, holdouts, space, tracker)
    except BaseException as e:  # the parent run never stays RUNNING: KILLED on Ctrl+C, else FAILED
        with contextlib.suppress(Exception):
            tracker.end(parent, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


def _optimise(cfg: TuneConfig, study, parent: str, created: bool, folds: Folds, holdouts, space: SearchSpace,
              tracker: Tracker) -> dict:
    """This worker's trials, then the study's summary, plots and refit, logged to the parent run."""
    import optuna

    from lit_sahs.tune.refit import log_baselines, log_plots, refit_best
    from lit_sahs.tune.trials import write_trials

    if created and cfg.baselines:
        log_baselines(folds, holdouts, cfg, tracker, parent)

    callbacks = []
    if cfg.study_trials:
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        callbacks.append(MaxTrialsCallback(cfg.study_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    objective_fn = Objective(cfg, folds, holdouts, space, tracker, parent)
    if cfg.n_trials:
        if cfg.study_trials and _finished(study) >= cfg.study_trials:
            log.warning("study %s already holds %d finished trials", cfg.study_name, _finished(study))
        else:
            study.optimize(objective_fn, n_trials=cfg.n_trials, timeout=cfg.timeout, callbacks=callbacks,
                           catch=(Diverged,), gc_after_trial=True,
                           show_progress_bar=sys.stderr.isatty())  # Optuna's bar over this worker's trials
    states = _counts(study)
    result: dict[str, Any] = {"study": cfg.study_name, "storage": redact(cfg.storage), "created": created,
                              "objective": cfg.objective, "families": [h.name for h in holdouts], "trials": states, "ran_here": objective_fn.started,
                              "parent_run_id": parent, "tracking_uri": redact(tracker.uri)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    tracker.log(parent, metrics={f"trials_{k.lower()}": v for k, v in states.items()})
    table = write_trials(study, Path(cfg.output_dir) / cfg.study_name, cfg.objective)  # every trial, best first
    tracker.client.log_artifact(parent, str(table), artifact_path="study")
    result["trials_table"] = str(table)
    if not complete:
        result["best"] = None
        log.warning("no trial of study %s completed: nothing to refit", cfg.study_name)
        return result
    best = study.best_trial
    result["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                      "mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr"),
                      "held_out_auroc": best.user_attrs.get("held_out_auroc"),
                      TPR_AT_1FPR: best.user_attrs.get(TPR_AT_1FPR),
                      "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}
    tracker.log(parent, metrics={"best_value": best.value,
                                 "best_mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr")},
                tags={"best_trial": best.number})
    if cfg.plots:
        log_plots(study, tracker, parent)
    if cfg.refit:
        result["refit"] = refit_best(cfg, study, space, folds, tracker, parent)
    tracker.end(parent)
    return result


def _finished(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def _counts(study) -> dict:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out
