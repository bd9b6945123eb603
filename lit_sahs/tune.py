"""`python -m lit_sahs tune`: an Optuna study over detector settings, every trial an MLflow run.

Objective
---------
Leave-one-attack-family-out: for each family F of ``families`` a detector is fitted on every
other family (train split; threshold calibrated on the val split) and scored on all rows of F,
which it never saw. The trial's value is the mean held-out AUROC over the folds; the mean
TPR at 1% FPR (the guard's operating point; AUROC alone flatters) is stored beside it as a
trial user attribute and an MLflow metric. After each fold the running mean held-out AUROC is
reported to Optuna as the intermediate value (step = fold index, the folds always run in the
same order), so the pruner stops trials that are already behind after one or two folds.

Heads: ``ranking: per_fold`` (default) ranks every head inside each fold on its training
families only (``locate``), so the held-out family never influences which heads are chosen;
a HeadRanking JSON path uses that one ranking for every fold. ``k`` takes the top k.

Search space (``space``): ``detector`` (families), ``k`` and ``<family>.<hyper-parameter>``
entries, each a list (categorical), ``{low, high[, log, step]}`` (int when both bounds are
ints) or a fixed scalar. It is stored in the study (user attribute ``lit_sahs.search_space``)
with the objective's definition (``lit_sahs.objective``): a worker whose settings differ is
refused instead of mixing incomparable trials into one study.

Storage and workers: ``storage`` is any SQLAlchemy URL (default a SQLite file; PostgreSQL for
workers on several machines). Every worker runs the same command; the first creates the study
and its MLflow parent run (id kept in ``lit_sahs.mlflow``), the others join it, and each trial
is a child run (tag ``mlflow.parentRunId``) whichever worker ran it. Heartbeats mark a killed
worker's trial FAIL so it does not stay RUNNING forever.

Refit: with ``refit: true`` the best trial's settings are refitted on all families (train/val
split; the test split, a random ``test_fraction`` of base prompts, gives an in-distribution
sanity number), logged as a child run ``refit-trial-<n>`` (artifact ``detector/``, safetensors
+ JSON) and copied to ``<output_dir>/<study>/detector``; the study's plots (optimisation
history, parameter importances, intermediate values) and a trials table go to the parent run.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np

from lit_sahs.errors import LitSahsError

log = logging.getLogger(__name__)

SPACE_ATTR = "lit_sahs.search_space"
OBJECTIVE_ATTR = "lit_sahs.objective"
MLFLOW_ATTR = "lit_sahs.mlflow"
REFIT_ATTR = "lit_sahs.best_refit"
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
JOIN_WAIT_S = 30.0

DEFAULT_SPACE: dict[str, Any] = {
    "detector": ["logistic", "mlp", "sparse"],
    "k": {"low": 1, "high": 32, "log": True},
    "logistic.l2": {"low": 1e-5, "high": 1.0, "log": True},
    "mlp.hidden": {"low": 16, "high": 256, "log": True},
    "mlp.lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "mlp.weight_decay": {"low": 1e-5, "high": 1e-1, "log": True},
    "sparse.group_lasso": {"low": 1e-3, "high": 0.3, "log": True},
}


# ---------------------------------------------------------------- command line

def tune_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="python -m lit_sahs tune",
                       description="Optuna study over detector family, head count and regularisation; objective: "
                                   "mean held-out-family AUROC (leave one attack family out).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--store", required=True, help="activation store directory")
    p.add_argument("--ranking", default="per_fold",
                   help="'per_fold' (rank heads inside each fold on its training families) or a HeadRanking JSON")
    p.add_argument("--families", type=list[str], default=[],
                   help="families held out one at a time ([] = every family with both classes and >= min_rows rows)")
    p.add_argument("--min_rows", type=int, default=40, help="smallest family used as a fold when families is []")
    p.add_argument("--study_name", default="lit_sahs", help="Optuna study name (workers join by name)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="SQLAlchemy URL: sqlite:///file.db, postgresql+psycopg2://...")
    p.add_argument("--n_trials", type=int, default=20, help="trials THIS worker runs (0: only refit)")
    p.add_argument("--study_trials", type=Optional[int], default=None,
                   help="stop once the study holds this many finished trials, whoever ran them")
    p.add_argument("--timeout", type=Optional[float], default=None, help="seconds this worker may optimise")
    p.add_argument("--seed", type=int, default=0, help="data split seed; also seeds the sampler of the creating worker")
    p.add_argument("--max_epochs", type=Union[int, dict[str, int]], default={"logistic": 5, "mlp": 40, "sparse": 5},
                   help="epochs per fit: a number, or one per detector family")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument("--test_fraction", type=float, default=0.2, help="random test share of the refit (sanity number)")
    p.add_argument("--target_fpr", type=float, default=0.05, help="threshold calibration on val")
    p.add_argument("--baselines", type=list[str], default=["tfidf"],
                   help="baselines scored on the same folds, logged to the parent run for comparison")
    p.add_argument("--space", type=dict, default=DEFAULT_SPACE, help="search space (see docs/tune_and_registry.md)")
    p.add_argument("--sampler", type=dict, default={"name": "tpe", "n_startup_trials": 8},
                   help="{name: tpe|random, n_startup_trials: N}")
    p.add_argument("--pruner", type=dict, default={"name": "median", "n_startup_trials": 5, "n_warmup_steps": 0},
                   help="{name: median|percentile|hyperband|threshold|none, ...its arguments}")
    p.add_argument("--heartbeat_interval", type=Optional[int], default=60,
                   help="seconds between a running trial's heartbeats (null: off)")
    p.add_argument("--plots", type=bool, default=True,
                   help="log the study plots (optimisation history, importances) to the parent run at the end")
    p.add_argument("--refit", type=bool, default=True, help="refit and log the best trial's detector after optimising")
    p.add_argument("--output_dir", default="artifacts/tune", help="local copy of the refit: <output_dir>/<study>/")
    p.add_argument("--tracking_uri", type=Optional[str], default=None, help="MLflow tracking URI (default sqlite in mlruns/)")
    p.add_argument("--experiment", default="tune", help="MLflow experiment")
    return p


def main(argv: list[str]) -> int:
    args = tune_parser().parse_args(argv)
    cfg = TuneConfig.from_namespace(args)
    _quiet()
    result = run_tune(cfg)
    print(_summary(result))
    print(json.dumps(result, default=float))
    return 0


# ---------------------------------------------------------------- configuration

@dataclass
class TuneConfig:
    store: str
    ranking: str = "per_fold"
    families: list[str] = field(default_factory=list)
    min_rows: int = 40
    study_name: str = "lit_sahs"
    storage: str = DEFAULT_STORAGE
    n_trials: int = 20
    study_trials: Optional[int] = None
    timeout: Optional[float] = None
    seed: int = 0
    max_epochs: Union[int, dict] = field(default_factory=lambda: {"logistic": 5, "mlp": 40, "sparse": 5})
    batch_size: int = 64
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    target_fpr: float = 0.05
    baselines: list[str] = field(default_factory=lambda: ["tfidf"])
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))
    sampler: dict = field(default_factory=lambda: {"name": "tpe", "n_startup_trials": 8})
    pruner: dict = field(default_factory=lambda: {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 0})
    heartbeat_interval: Optional[int] = 60
    plots: bool = True
    refit: bool = True
    output_dir: str = "artifacts/tune"
    tracking_uri: Optional[str] = None
    experiment: str = "tune"

    @classmethod
    def from_namespace(cls, ns) -> "TuneConfig":
        d = {k: v for k, v in vars(ns).items() if k in cls.__dataclass_fields__}
        for key in ("families", "baselines"):
            if isinstance(d.get(key), str):
                d[key] = [x.strip() for x in d[key].split(",") if x.strip()]
        return cls(**d)

    def check(self) -> None:
        if self.n_trials < 0:
            raise LitSahsError(f"n_trials must be >= 0, got {self.n_trials}")
        epochs = self.max_epochs.values() if isinstance(self.max_epochs, dict) else [self.max_epochs]
        if any(int(e) < 1 for e in epochs) or self.batch_size < 1:
            raise LitSahsError(f"max_epochs and batch_size must be >= 1, got {self.max_epochs}, {self.batch_size}")
        if not self.study_name.strip():
            raise LitSahsError("study_name is empty: name the study")
        if self.study_trials is not None and self.study_trials < 1:
            raise LitSahsError(f"study_trials must be >= 1, got {self.study_trials}")


# ---------------------------------------------------------------- search space

@dataclass(frozen=True)
class Dim:
    name: str
    kind: str  # categorical | int | float | fixed
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None
    value: Any = None

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        if self.kind == "fixed":
            return {"value": self.value}
        d = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step) if self.step else 1)
        if self.kind == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)
        return self.value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dim(name: str, spec: Any) -> Dim:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise LitSahsError(f"search space entry {name!r} is an empty list: give at least one choice")
        for c in spec:
            if not isinstance(c, (str, int, float, bool)) and c is not None:
                raise LitSahsError(f"search space entry {name!r}: choices must be strings or numbers, got {c!r}")
        return Dim(name, "categorical", choices=tuple(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step", "type"}
        if unknown or "low" not in spec or "high" not in spec:
            raise LitSahsError(f"search space entry {name!r} must be {{low, high[, log, step, type]}}, got {spec}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise LitSahsError(f"search space entry {name!r}: low and high must be numbers, got {low!r}, {high!r}")
        kind = spec.get("type") or ("int" if _is_int(low) and _is_int(high) else "float")
        if kind not in ("int", "float"):
            raise LitSahsError(f"search space entry {name!r}: type must be int or float, got {kind!r}")
        log_ = bool(spec.get("log", False))
        if not low < high:
            raise LitSahsError(f"search space entry {name!r}: low ({low}) must be below high ({high})")
        if log_ and low <= 0:
            raise LitSahsError(f"search space entry {name!r}: a log scale needs low > 0, got {low}")
        if log_ and spec.get("step") is not None:
            raise LitSahsError(f"search space entry {name!r}: log and step cannot be combined")
        if kind == "int":
            low, high = int(low), int(high)
        else:
            low, high = float(low), float(high)
        return Dim(name, kind, low=low, high=high, log=log_, step=spec.get("step"))
    if isinstance(spec, (str, int, float, bool)) or spec is None:
        return Dim(name, "fixed", value=spec)
    raise LitSahsError(f"search space entry {name!r}: use a list, {{low, high}} or a fixed value, got {spec!r}")


@dataclass
class SearchSpace:
    detectors: Dim
    k: Dim
    params: dict[str, dict[str, Dim]]  # family -> hparam -> Dim

    @classmethod
    def parse(cls, space: dict, max_heads: int) -> "SearchSpace":
        from lit_sahs.detectors import DETECTORS

        if not isinstance(space, dict) or not space:
            raise LitSahsError("the search space is empty: give at least 'detector' and 'k'")
        space = dict(space)
        det = _dim("detector", space.pop("detector", list(DETECTORS)))
        if det.kind == "fixed":
            det = Dim("detector", "categorical", choices=(det.value,))
        if det.kind != "categorical":
            raise LitSahsError("search space 'detector' must be a list of detector families")
        unknown = [d for d in det.choices if d not in DETECTORS]
        if unknown:
            raise LitSahsError(f"search space 'detector' names unknown families {unknown}: use {sorted(DETECTORS)}")
        if "k" not in space:
            raise LitSahsError("the search space needs 'k' (number of heads from the ranking), e.g. {low: 1, high: 32}")
        k = _dim("k", space.pop("k"))
        ks = list(k.choices) if k.kind == "categorical" else [k.value] if k.kind == "fixed" else [k.low, k.high]
        if k.kind == "float" or not all(_is_int(v) for v in ks):
            raise LitSahsError(f"search space 'k' must be integers, got {k.to_dict()}")
        if min(ks) < 1 or max(ks) > max_heads:
            raise LitSahsError(f"search space 'k' must lie in 1..{max_heads} (the ranked heads), got {k.to_dict()}")
        params: dict[str, dict[str, Dim]] = {d: {} for d in det.choices}
        for key, spec in space.items():
            fam, _, hp = str(key).partition(".")
            if not hp:
                raise LitSahsError(f"search space entry {key!r}: name detector hyper-parameters '<family>.<name>', "
                                   f"e.g. 'logistic.l2'")
            if fam not in DETECTORS:
                raise LitSahsError(f"search space entry {key!r}: unknown detector family {fam!r}; use {sorted(DETECTORS)}")
            allowed = [n for n in inspect.signature(DETECTORS[fam].__init__).parameters if n != "self"]
            if hp not in allowed:
                raise LitSahsError(f"search space entry {key!r}: {DETECTORS[fam].__name__} has no hyper-parameter {hp!r}; "
                                   f"it takes {allowed}")
            if fam in params:
                params[fam][hp] = _dim(key, spec)
        return cls(det, k, params)

    def to_dict(self) -> dict:
        """Canonical JSON-able form: what the study records and compares."""
        out = {"detector": self.detectors.to_dict(), "k": self.k.to_dict()}
        for fam in sorted(self.params):
            for hp in sorted(self.params[fam]):
                out[f"{fam}.{hp}"] = self.params[fam][hp].to_dict()
        return json.loads(json.dumps(out))

    def sample(self, trial) -> tuple[str, int, dict]:
        fam = self.detectors.suggest(trial)
        k = int(self.k.suggest(trial))
        hparams = {hp: d.suggest(trial) for hp, d in self.params.get(fam, {}).items()}
        return fam, k, hparams

    @staticmethod
    def from_params(params: dict, space: "SearchSpace") -> tuple[str, int, dict]:
        """(family, k, hparams) of a finished trial: its sampled params plus the space's fixed values."""
        fam = params.get("detector", space.detectors.choices[0])
        k = int(params.get("k", space.k.value if space.k.kind == "fixed" else 0))
        hparams = {}
        for hp, d in space.params.get(fam, {}).items():
            hparams[hp] = params.get(f"{fam}.{hp}", d.value)
        return fam, k, hparams


def _diff(recorded: dict, now: dict) -> list[str]:
    keys = sorted(set(recorded) | set(now))
    return [k for k in keys if recorded.get(k) != now.get(k)]


# ---------------------------------------------------------------- storage

# ---------------------------------------------------------------- folds and data

@dataclass
class Folds:
    store_path: str
    families: list[str]
    ranking: str  # per_fold | path
    seed: int
    val_fraction: float
    test_fraction: float
    _rankings: dict = field(default_factory=dict)

    def __post_init__(self):
        from lit_sahs.data.store import ActivationStore

        self.store = ActivationStore.open(self.store_path)
        self.index = self.store.index()
        if not self.index:
            raise LitSahsError(f"activation store {self.store_path} holds no rows: run `python -m lit_sahs extract` first")
        self.labels = np.array([int(r["label"]) for r in self.index])
        self.family_of = np.array([r.get("attack_family", "plain") for r in self.index])
        self.geometry = self.store.geometry
        self.fingerprint = self.store.fingerprint

    def choose_families(self, wanted: list[str], min_rows: int) -> list[str]:
        from lit_sahs.evaluate import eligible_families

        fams, skipped = eligible_families(self.index, min_rows=1 if wanted else min_rows)
        if wanted:
            bad = {f: skipped.get(f, "no rows") for f in wanted if f not in fams}
            if bad:
                raise LitSahsError(f"families {bad} cannot be held out (a fold needs both classes); "
                                   f"usable: {fams}")
            fams = list(dict.fromkeys(wanted))
        if len(fams) < 2:
            raise LitSahsError(f"leave-one-family-out needs two attack families with both classes and >= {min_rows} rows; "
                               f"{self.store_path} has {fams} (skipped: {skipped}): extract with more attacks "
                               "or list families explicitly")
        return fams

    def ranking_for(self, fold: Optional[str]):
        """HeadRanking used for fold `fold` (None: the refit on all families)."""
        from lit_sahs.locate import HeadRanking, locate

        if fold in self._rankings:
            return self._rankings[fold]
        if self.ranking == "per_fold":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = locate(self.store, held_out_families=[fold] if fold else [], val_fraction=self.val_fraction,
                           test_fraction=self.test_fraction, seed=self.seed)
        else:
            r = HeadRanking.load(self.ranking)
            r.fingerprint.check(self.fingerprint, f"head ranking {self.ranking}")
        self._rankings[fold] = r
        return r

    def ranking_id(self) -> str:
        if self.ranking == "per_fold":
            return "per_fold"
        p = Path(self.ranking)
        if not p.is_file():
            raise LitSahsError(f"no head ranking at {p}: run `python -m lit_sahs locate` first or use ranking: per_fold")
        return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    def max_heads(self) -> int:
        if self.ranking == "per_fold":
            return self.geometry.num_layers * self.geometry.num_heads
        return len(self.ranking_for(None).scores)

    def datamodule(self, heads, held_out: Optional[str], batch_size: int):
        from lit_sahs.data.datamodules import CachedActivationDataModule

        return CachedActivationDataModule(self.store_path, heads=heads, held_out_families=[held_out] if held_out else [],
                                          val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                                          batch_size=batch_size, seed=self.seed)


class _Diverged(Exception):
    """A detector produced non-finite scores: the trial fails, the study goes on."""


def _build_detector(family: str, hparams: dict, target_fpr: float):
    from lit_sahs.detectors import detector_class

    cls = detector_class(family)
    args = dict(hparams)
    if "target_fpr" in inspect.signature(cls.__init__).parameters:
        args.setdefault("target_fpr", target_fpr)
    return cls(**args)


def epochs_for(max_epochs: int | dict, family: str) -> int:
    if isinstance(max_epochs, dict):
        if family not in max_epochs:
            raise LitSahsError(f"max_epochs gives no value for detector family {family!r}: {max_epochs}")
        return int(max_epochs[family])
    return int(max_epochs)


def fit_quietly(det, dm, max_epochs: int):
    """Fit on the DataModule's train split; validate (and calibrate the threshold) once, after the last
    epoch: per-epoch validation would cost more than the training of these small detectors."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=max_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(det, datamodule=dm)
    v = trainer.callback_metrics.get("val/auroc")
    return det, (float(v) if v is not None else float("nan"))


def fit_fold(folds: Folds, fold: Optional[str], family: str, k: int, hparams: dict, cfg: TuneConfig) -> dict:
    """Fit one detector on the fold's top-k heads (fold None: all families, random test split) and score
    the fold's test rows: the held-out family, never seen in training, threshold calibration or ranking."""
    from lit_sahs.detectors import compute_report
    from lit_sahs.evaluate import detector_scores

    heads = folds.ranking_for(fold).top_k(k)
    dm = folds.datamodule(heads, fold, cfg.batch_size)
    det, val_auroc = fit_quietly(_build_detector(family, hparams, cfg.target_fpr), dm,
                                 epochs_for(cfg.max_epochs, family))
    rows = dm.splits["test"]
    scores = detector_scores(det, dm.store.read(det.head_set, rows=rows))
    if not np.isfinite(scores).all():
        raise _Diverged(f"{family} detector with {hparams} produced non-finite scores")
    rep = compute_report(scores, folds.labels[rows], threshold=float(det.threshold))["overall"]
    return {"detector": det, "auroc": float(rep["auroc"]), "tpr_at_1fpr": float(rep["tpr_at_1fpr"]),
            "tpr_at_5fpr": float(rep["tpr_at_5fpr"]), "fpr_at_threshold": float(rep["fpr"]),
            "tpr_at_threshold": float(rep["tpr"]), "val_auroc": val_auroc, "n_test": int(len(rows))}


# ---------------------------------------------------------------- MLflow

# ---------------------------------------------------------------- the study

def _make_sampler(spec: dict, seed: Optional[int]):
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


def _make_pruner(spec: dict):
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


def _objective_spec(cfg: TuneConfig, folds: Folds, families: list[str]) -> dict:
    fp = folds.fingerprint
    return {
        "metric": "mean held-out-family AUROC (leave one attack family out)",
        "direction": "maximize",
        "target": {"name": fp.name, "weights_hash": fp.weights_hash, "geometry": list(fp.geometry.shape)},
        "store_rows": len(folds.index),
        "families": families,
        "ranking": folds.ranking_id(),
        "max_epochs": cfg.max_epochs,
        "batch_size": cfg.batch_size,
        "val_fraction": cfg.val_fraction,
        "target_fpr": cfg.target_fpr,
        "seed": cfg.seed,
    }


def _study_attrs(storage, study_id: int) -> dict:
    return storage.get_study_user_attrs(study_id)


def open_study(cfg: TuneConfig, storage, space: dict, objective: dict, tracker: Tracker):
    """Create the study (and its MLflow parent run) or join it; refuse a study whose search space or
    objective differ. Returns (study, parent_run_id, created)."""
    import optuna

    pruner = _make_pruner(cfg.pruner)
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
                                        sampler=_make_sampler(cfg.sampler, cfg.seed), pruner=pruner)
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
                              sampler=_make_sampler(cfg.sampler, None), pruner=pruner)
    attrs = _study_attrs(storage, study._study_id)
    deadline = time.monotonic() + JOIN_WAIT_S
    while MLFLOW_ATTR not in attrs and not study.trials and time.monotonic() < deadline:
        time.sleep(0.5)  # the creating worker is still writing the study's records
        attrs = _study_attrs(storage, study._study_id)
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


class Objective:
    def __init__(self, cfg: TuneConfig, folds: Folds, families: list[str], space: SearchSpace, tracker: Tracker,
                 parent: str):
        self.cfg, self.folds, self.families, self.space = cfg, folds, families, space
        self.tracker, self.parent = tracker, parent
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.started = 0  # trials this worker ran

    def __call__(self, trial) -> float:
        import optuna

        self.started += 1
        family, k, hparams = self.space.sample(trial)
        run = self.tracker.create_run(f"trial-{trial.number}", {"lit_sahs.kind": "trial",
                                                                "optuna.study_name": self.cfg.study_name,
                                                                "optuna.trial_number": trial.number,
                                                                "lit_sahs.worker": self.worker}, parent=self.parent)
        trial.set_user_attr("mlflow_run_id", run)
        trial.set_user_attr("worker", self.worker)
        self.tracker.log(run, params={"detector": family, "k": k, **{f"{family}.{h}": v for h, v in hparams.items()}})
        aurocs: dict[str, float] = {}
        tprs: dict[str, float] = {}
        status = "FAILED"
        try:
            for step, fam in enumerate(self.families):
                r = fit_fold(self.folds, fam, family, k, hparams, self.cfg)
                aurocs[fam], tprs[fam] = r["auroc"], r["tpr_at_1fpr"]
                running = float(np.mean(list(aurocs.values())))
                self.tracker.log(run, metrics={f"held_out/{fam}/auroc": r["auroc"],
                                               f"held_out/{fam}/tpr_at_1fpr": r["tpr_at_1fpr"],
                                               f"held_out/{fam}/tpr_at_5fpr": r["tpr_at_5fpr"],
                                               f"held_out/{fam}/fpr_at_threshold": r["fpr_at_threshold"],
                                               f"val/{fam}/auroc": r["val_auroc"]})
                self.tracker.log(run, metrics={"running_mean_held_out_auroc": running}, step=step)
                trial.set_user_attr("held_out_auroc", dict(aurocs))
                trial.set_user_attr("tpr_at_1fpr", dict(tprs))
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
        except _Diverged as e:
            self.tracker.log(run, tags={"optuna.state": "FAIL", "error": str(e)[:500]})
            raise
        finally:
            self.tracker.end(run, status)


def _quiet() -> None:
    import optuna

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_tune(cfg: TuneConfig) -> dict:
    """Create or join the study, run this worker's trials, refit the best. Returns a summary dict."""
    import optuna

    cfg.check()
    folds = Folds(cfg.store, [], cfg.ranking, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    families = folds.choose_families(list(cfg.families), cfg.min_rows)
    folds.families = families
    space = SearchSpace.parse(cfg.space, folds.max_heads())
    space_dict = space.to_dict()
    objective = _objective_spec(cfg, folds, families)
    storage = open_storage(cfg.storage, cfg.heartbeat_interval)
    tracker = Tracker(cfg.tracking_uri, cfg.experiment)
    study, parent, created = open_study(cfg, storage, space_dict, objective, tracker)
    if created and cfg.baselines:
        _log_baselines(folds, families, cfg, tracker, parent)

    callbacks = []
    if cfg.study_trials:
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        callbacks.append(MaxTrialsCallback(cfg.study_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    objective_fn = Objective(cfg, folds, families, space, tracker, parent)
    if cfg.n_trials:
        if cfg.study_trials and _finished(study) >= cfg.study_trials:
            log.warning("study %s already holds %d finished trials", cfg.study_name, _finished(study))
        else:
            study.optimize(objective_fn, n_trials=cfg.n_trials,
                           timeout=cfg.timeout, callbacks=callbacks, catch=(_Diverged,), gc_after_trial=True)
    states = _counts(study)
    result: dict[str, Any] = {"study": cfg.study_name, "storage": redact(cfg.storage), "created": created,
                              "families": families, "trials": states, "ran_here": objective_fn.started,
                              "parent_run_id": parent, "tracking_uri": redact(tracker.uri)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    tracker.log(parent, metrics={f"trials_{k.lower()}": v for k, v in states.items()})
    if not complete:
        result["best"] = None
        log.warning("no trial of study %s completed: nothing to refit", cfg.study_name)
        return result
    best = study.best_trial
    result["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                      "mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr"),
                      "held_out_auroc": best.user_attrs.get("held_out_auroc"),
                      "tpr_at_1fpr": best.user_attrs.get("tpr_at_1fpr"),
                      "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}
    tracker.log(parent, metrics={"best_value": best.value,
                                 "best_mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr")},
                tags={"best_trial": best.number})
    if cfg.plots:
        _log_plots(study, tracker, parent)
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


def _log_baselines(folds: Folds, families: list[str], cfg: TuneConfig, tracker: Tracker, parent: str) -> None:
    """The same folds scored by text / residual baselines: the numbers a detector must beat."""
    from lit_sahs.baselines import baseline_scores
    from lit_sahs.detectors import compute_report

    from lit_sahs.data.protocol import split_rows

    per: dict[str, dict[str, float]] = {}
    metrics = {}
    try:
        for fam in families:
            sp = split_rows(folds.index, held_out_families=[fam], val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.seed)
            for name, s in baseline_scores(folds.store, sp["train"], sp["test"], cfg.baselines, seed=cfg.seed).items():
                rep = compute_report(s, folds.labels[sp["test"]])["overall"]
                per.setdefault(name, {})[fam] = float(rep["auroc"])
                metrics[f"baseline/{name}/{fam}/auroc"] = rep["auroc"]
                metrics[f"baseline/{name}/{fam}/tpr_at_1fpr"] = rep["tpr_at_1fpr"]
    except LitSahsError as e:
        log.warning("baselines skipped: %s", e)
        return
    for name, d in per.items():
        metrics[f"baseline/{name}/mean_held_out_auroc"] = float(np.mean(list(d.values())))
    tracker.log(parent, metrics=metrics)


def _log_plots(study, tracker: Tracker, parent: str) -> None:
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
                log.warning("plot %s skipped: %s", name, _first_line(e))
        try:
            df = study.trials_dataframe()
            df.to_csv(Path(tmp, "trials.csv"), index=False)
        except Exception as e:  # noqa: BLE001
            log.warning("trials table skipped: %s", _first_line(e))
        tracker.client.log_artifacts(parent, tmp, artifact_path="study")


def refit_best(cfg: TuneConfig, study, space: SearchSpace, folds: Folds, tracker: Tracker, parent: str) -> dict:
    """Refit the best trial's settings on all families; log the detector (safetensors + JSON) as a
    child run of the study and keep a local copy."""
    from lit_sahs.detectors import save_detector

    best = study.best_trial
    family, k, hparams = SearchSpace.from_params(best.params, space)
    run = tracker.create_run(f"refit-trial-{best.number}", {"lit_sahs.kind": "refit",
                                                             "optuna.study_name": cfg.study_name,
                                                             "optuna.trial_number": best.number}, parent=parent)
    try:
        r = fit_fold(folds, None, family, k, hparams, cfg)
        det = r["detector"]
        out = Path(cfg.output_dir) / cfg.study_name
        with tempfile.TemporaryDirectory() as tmp:
            art = save_detector(det, Path(tmp) / "detector")
            if cfg.ranking == "per_fold":
                folds.ranking_for(None).save(Path(tmp) / "ranking.json")
            summary = {"study": cfg.study_name, "trial": best.number, "value": best.value, "params": best.params,
                       "detector": family, "k": k, "hparams": hparams, "head_set": det.head_set.to_list(),
                       "held_out_auroc": best.user_attrs.get("held_out_auroc"),
                       "tpr_at_1fpr": best.user_attrs.get("tpr_at_1fpr"),
                       "mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr"),
                       "refit_test": {"auroc": r["auroc"], "tpr_at_1fpr": r["tpr_at_1fpr"], "n": r["n_test"],
                                      "split": f"random {cfg.test_fraction} of base prompts (in distribution)"},
                       "threshold": float(det.threshold), "mlflow_run_id": run,
                       "detector_uri": f"runs:/{run}/detector"}
            Path(tmp, "best.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
            tracker.client.log_artifacts(run, str(art), artifact_path="detector")
            for extra in ("best.json", "ranking.json"):
                if Path(tmp, extra).exists():
                    tracker.client.log_artifact(run, str(Path(tmp, extra)))
            save_detector(det, out / "detector", overwrite=True)
            (out / "best.json").write_text(Path(tmp, "best.json").read_text())
        tracker.log(run, params={"detector": family, "k": k, **{f"{family}.{h}": v for h, v in hparams.items()},
                                 "head_set": ",".join(f"{l}.{h}" for l, h in det.head_set)},
                    metrics={"mean_held_out_auroc": best.value,
                             "mean_tpr_at_1fpr": best.user_attrs.get("mean_tpr_at_1fpr"),
                             **{f"held_out/{f}/auroc": v for f, v in (best.user_attrs.get("held_out_auroc") or {}).items()},
                             **{f"held_out/{f}/tpr_at_1fpr": v for f, v in (best.user_attrs.get("tpr_at_1fpr") or {}).items()},
                             "refit_test/auroc": r["auroc"], "refit_test/tpr_at_1fpr": r["tpr_at_1fpr"],
                             "threshold": float(det.threshold)})
        tracker.end(run)
    except BaseException:
        tracker.end(run, "FAILED")
        raise
    info = {"trial": best.number, "run_id": run, "detector": f"runs:/{run}/detector",
            "local_detector": str(out / "detector"), "refit_test_auroc": r["auroc"],
            "refit_test_tpr_at_1fpr": r["tpr_at_1fpr"], "head_set": det.head_set.to_list()}
    study.set_user_attr(REFIT_ATTR, info)
    tracker.log(parent, tags={"best_refit_run_id": run})
    return info


def _summary(result: dict) -> str:
    lines = [f"study {result['study']} at {result['storage']}: trials {result['trials']} "
             f"({result['ran_here']} run by this worker); held out: {', '.join(result['families'])}"]
    best = result.get("best")
    if best:
        lines.append(f"best trial {best['trial']}: mean held-out AUROC {best['value']:.4f}, mean TPR@1%FPR "
                     f"{(best.get('mean_tpr_at_1fpr') or float('nan')):.4f}, params {best['params']}")
    refit = result.get("refit")
    if refit:
        lines.append(f"refit detector: {refit['detector']} (local copy {refit['local_detector']}); register it with "
                     f"`python -m lit_sahs register --detector {refit['detector']} --name <name> --alias champion`")
    return "\n".join(lines)
