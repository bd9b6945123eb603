"""After the trials: the best trial refitted on all families and logged (safetensors + JSON and its
MLflow pyfunc model, in the refit run that ``register --study`` links the version to; a local copy too), the study's plots and trials table, and the baselines scored on the same folds."""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from lit_sahs.errors import LitSahsError
from lit_sahs.folds import Folds
from lit_sahs.tracking import REFIT_ATTR, Tracker, first_line
from lit_sahs.tune.config import TuneConfig
from lit_sahs.tune.objective import score_fold
from lit_sahs.tune.space import SearchSpace
from lit_sahs.detectors.metrics import AUROC, TPR_AT_1FPR

log = logging.getLogger(__name__)


def log_baselines(folds: Folds, holdouts: list, cfg: TuneConfig, tracker: Tracker, parent: str) -> None:
    """The same folds scored by text / residual baselines: the numbers a detector must beat."""
    from lit_sahs.baselines import baseline_scores
    from lit_sahs.detectors import compute_report
    from lit_sahs.detectors.metrics import SCORE_COLUMNS

    per: dict[str, dict[str, float]] = {}
    metrics = {}
    try:
        for hold in holdouts:
            fam = hold.name
            sp = folds.split(held_out=hold)
            for name, s in baseline_scores(folds.store, sp["train"], sp["test"], cfg.baselines, seed=cfg.seed).items():
                rep = compute_report(s, folds.labels[sp["test"]])["overall"]
                per.setdefault(name, {})[fam] = float(rep[AUROC])
                metrics.update({f"baseline/{name}/{fam}/{c}": rep[c] for c in SCORE_COLUMNS})
    except LitSahsError as e:
        log.warning("baselines skipped: %s", e)
        return
    for name, d in per.items():
        metrics[f"baseline/{name}/mean_held_out_auroc"] = float(np.mean(list(d.values())))
    tracker.log(parent, metrics=metrics)


def log_plots(study, tracker: Tracker, parent: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with tempfile.TemporaryDirectory() as tmp:
        plots = {"optimization_history.png": ovm.plot_optimization_history,
                 "param_importances.png": ovm.plot_param_importances,
                 "intermediate_values.png": ovm.plot_intermediate_values}
        for name, fn in plots.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(Path(tmp, name), dpi=110)
                plt.close(fig)
            except Exception as e:  # noqa: BLE001 - e.g. importances need >= 2 completed trials
                log.warning("plot %s skipped: %s", name, first_line(e))
        try:
            df = study.trials_dataframe()
            df.to_csv(Path(tmp, "trials.csv"), index=False)
        except Exception as e:  # noqa: BLE001
            log.warning("trials table skipped: %s", first_line(e))
        tracker.client.log_artifacts(parent, tmp, artifact_path="study")


def refit_best(cfg: TuneConfig, study, space: SearchSpace, folds: Folds, tracker: Tracker, parent: str) -> dict:
    """Refit the best trial's settings on all families; log the detector (safetensors + JSON) and its
    pyfunc model in a child run of the study and keep a local copy."""
    from lit_sahs.artifact import save_detector
    from lit_sahs.mlflow_model import log_detector_and_model

    best = study.best_trial
    family, k, hparams, features = SearchSpace.from_params(best.params, space)
    run = tracker.create_run(f"refit-trial-{best.number}", {"lit_sahs.kind": "refit",
                                                             "optuna.study_name": cfg.study_name,
                                                             "optuna.trial_number": best.number}, parent=parent)
    try:
        r = score_fold(folds, None, family, k, hparams, cfg, features)
        det, test = r.detector, r.metrics
        out = Path(cfg.output_dir) / cfg.study_name
        with tempfile.TemporaryDirectory() as tmp:
            art = save_detector(det, Path(tmp) / "detector")
            if folds.per_fold:
                folds.ranking_for().save(Path(tmp) / "ranking.json")
            summary = {"study": cfg.study_name, "trial": best.number, "value": best.value, "params": best.params,
                       "detector": family, "k": k, "hparams": hparams, "features": features,
                       "head_set": det.head_set.to_list(),
                       "held_out_auroc": best.user_attrs.get("held_out_auroc"),
                       TPR_AT_1FPR: best.user_attrs.get(TPR_AT_1FPR),
                       "mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr"),
                       "refit_test": {AUROC: test[AUROC], TPR_AT_1FPR: test[TPR_AT_1FPR], "n": r.n_test,
                                      "split": f"random {cfg.test_fraction} of base prompts (in distribution)"},
                       "threshold": float(det.threshold), "mlflow_run_id": run,
                       "detector_uri": f"runs:/{run}/detector", "model_uri": f"runs:/{run}/model"}
            Path(tmp, "best.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
            model_uri = log_detector_and_model(tracker.client, run, det, art)  # runs:/<run>/detector and /model
            for extra in ("best.json", "ranking.json"):
                if Path(tmp, extra).exists():
                    tracker.client.log_artifact(run, str(Path(tmp, extra)))
            save_detector(det, out / "detector", overwrite=True)
            (out / "best.json").write_text(Path(tmp, "best.json").read_text())
        tracker.log(run, params={"detector": family, "k": k, "features": features or "none",
                                 **{f"{family}.{h}": v for h, v in hparams.items()},
                                 "head_set": det.head_set.spec()},
                    metrics={"mean_held_out_auroc": best.value,
                             "mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr"),
                             **{f"held_out/{f}/auroc": v for f, v in (best.user_attrs.get("held_out_auroc") or {}).items()},
                             **{f"held_out/{f}/{TPR_AT_1FPR}": v for f, v in (best.user_attrs.get(TPR_AT_1FPR) or {}).items()},
                             f"refit_test/{AUROC}": test[AUROC], f"refit_test/{TPR_AT_1FPR}": test[TPR_AT_1FPR],
                             "threshold": float(det.threshold)})
        tracker.end(run)
    except BaseException:
        tracker.end(run, "FAILED")
        raise
    info = {"trial": best.number, "run_id": run, "detector": f"runs:/{run}/detector", "model": model_uri,
            "local_detector": str(out / "detector"), f"refit_test_{AUROC}": test[AUROC],
            f"refit_test_{TPR_AT_1FPR}": test[TPR_AT_1FPR], "head_set": det.head_set.to_list(), "features": features}
    study.set_user_attr(REFIT_ATTR, info)
    tracker.log(parent, tags={"best_refit_run_id": run})
    return info

