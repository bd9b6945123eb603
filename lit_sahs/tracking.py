"""MLflow tracking: where runs go, the Lightning logger, artifacts.

Default store: a SQLite database inside mlruns/ (the model registry needs a database backend),
artifacts under mlruns/artifacts. Any tracking URI (a server, PostgreSQL) replaces it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

DEFAULT_DIR = Path("mlruns")
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_DIR}/mlflow.db"


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(experiment: str, uri: str) -> Optional[str]:
    """Local artifact root for the local default; servers choose their own."""
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (DEFAULT_DIR / "artifacts" / experiment).resolve().as_uri()
    return None


def make_logger(experiment: str = "lit_sahs", tracking_uri: Optional[str] = None, run_name: Optional[str] = None,
                tags: Optional[dict] = None):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = resolve_tracking_uri(tracking_uri)
    return MLFlowLogger(experiment_name=experiment, tracking_uri=uri, run_name=run_name, tags=tags,
                        artifact_location=artifact_location(experiment, uri))


def log_artifacts(logger, paths: Iterable[str | Path], artifact_path: Optional[str] = None) -> None:
    """Attach files or directories to the logger's MLflow run (no-op for other loggers)."""
    run_id = getattr(logger, "run_id", None)
    if run_id is None:
        return
    client = logger.experiment
    for p in paths:
        p = Path(p)
        if p.is_dir():
            sub = f"{artifact_path}/{p.name}" if artifact_path else p.name  # keep the directory's name
            client.log_artifacts(run_id, str(p), artifact_path=sub)
        elif p.exists():
            client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def start_run(experiment: str, tracking_uri: Optional[str] = None, run_name: Optional[str] = None):
    """An mlflow run context for commands outside a Lightning Trainer (evaluate, locate)."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_location(experiment, uri))
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name)
