"""TuneConfig: the one declaration of `tune`'s options. The command line, YAML configs (`--config`),
`--print_config`, the help text and the defaults are all generated from this dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

from lit_sahs.errors import LitSahsError
from lit_sahs.choices import Pairing
from lit_sahs.tracking import DEFAULT_STORAGE
from lit_sahs.tune.space import DEFAULT_SPACE

PROG = "python -m lit_sahs tune"


@dataclass
class TuneConfig:
    """Optuna study over detector family, head count and regularisation; objective: mean held-out
    AUROC over folds that keep prompt sources (default) and/or attack families out of training.

    Args:
        store: activation store directory
        objective: sources (each fold holds out one harmful and one benign source: prompts unlike any
            seen), families (each fold holds out one attack family) or both
        ranking: 'per_fold' (rank heads inside each fold on its training rows) or a HeadRanking JSON
        families: with objective families/both: families held out one at a time ([] = every family with
            both classes and >= min_rows rows)
        pairing: with objective sources/both: round_robin (every source held out once) or all_pairs
        sources: with objective sources/both: only these sources ([] = all)
        min_rows: smallest fold used
        study_name: Optuna study name (workers join by name)
        storage: SQLAlchemy URL of the study: sqlite:///file.db, postgresql+psycopg2://...
        n_trials: trials THIS worker runs (0: only refit)
        study_trials: stop once the study holds this many finished trials, whoever ran them
        timeout: seconds this worker may optimise
        seed: data split seed; also seeds the sampler of the creating worker
        max_epochs: epochs per fit: a number, one per detector family, or null for each family's own default
        batch_size: training batch size
        val_fraction: share of base prompts in the validation split (threshold calibration)
        test_fraction: random test share of the refit (an in-distribution sanity number)
        target_fpr: false-positive rate the threshold is calibrated to on validation benign prompts
        baselines: baselines scored on the same folds, logged to the parent run for comparison
        space: search space (see docs/tune_and_registry.md)
        sampler: {name: tpe|random, n_startup_trials: N}
        pruner: {name: median|percentile|hyperband|threshold|none, ...its arguments}
        heartbeat_interval: seconds between a running trial's heartbeats (null: off)
        plots: log the study plots (optimisation history, importances) to the parent run at the end
        refit: refit and log the best trial's detector after optimising
        output_dir: local copy of the refit: <output_dir>/<study>/
        tracking_uri: MLflow tracking URI (default sqlite in mlruns/)
        experiment: MLflow experiment
    """

    store: str
    objective: Literal["sources", "families", "both"] = "sources"
    ranking: str = "per_fold"
    families: list[str] = field(default_factory=list)
    pairing: Pairing = "round_robin"
    sources: list[str] = field(default_factory=list)
    min_rows: int = 40
    study_name: str = "lit_sahs"
    storage: str = DEFAULT_STORAGE
    n_trials: int = 20
    study_trials: Optional[int] = None
    timeout: Optional[float] = None
    seed: int = 0
    max_epochs: Union[int, dict[str, int], None] = None
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

    def check(self) -> None:
        if self.n_trials < 0:
            raise LitSahsError(f"n_trials must be >= 0, got {self.n_trials}")
        epochs = self.max_epochs.values() if isinstance(self.max_epochs, dict) else [self.max_epochs]
        if any(e is not None and int(e) < 1 for e in epochs) or self.batch_size < 1:
            raise LitSahsError(f"max_epochs and batch_size must be >= 1, got {self.max_epochs}, {self.batch_size}")
        if not self.study_name.strip():
            raise LitSahsError("study_name is empty: name the study")
        if self.study_trials is not None and self.study_trials < 1:
            raise LitSahsError(f"study_trials must be >= 1, got {self.study_trials}")

    def epochs(self, family: str) -> Optional[int]:
        """Epochs for a `family` fit: max_epochs, or the family's own `trainer_defaults`."""
        given = self.max_epochs.get(family) if isinstance(self.max_epochs, dict) else self.max_epochs
        if given is not None:
            return int(given)
        from lit_sahs.families import family_class
        from lit_sahs.engine import family_defaults

        return family_defaults(family_class(family)).get("max_epochs")

    def epochs_record(self) -> Union[int, dict]:
        """max_epochs as the study records it: null resolved to every family's default."""
        from lit_sahs.families import trainable_families

        return self.max_epochs if self.max_epochs is not None else {f: self.epochs(f) for f in trainable_families()}


def parse_config(argv: Sequence[str]) -> TuneConfig:
    from lit_sahs.commands import parse_command

    return TuneConfig(**parse_command(TuneConfig, argv, PROG))
