"""Tracking and storage: the one module that knows MLflow and Optuna URIs.

Where runs go (default: a SQLite database inside mlruns/, since the model registry needs a
database backend, artifacts under mlruns/artifacts; any tracking URI — a server, PostgreSQL —
replaces it), password redaction for every message that shows a URI, a short connection probe
so an unreachable server is one clear error, the Optuna RDB storage opener, an MLflow client
wrapper without global state (`Tracker`), the Lightning logger and artifact logging.
`registry` and `tune` depend on this module, never on each other.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from lit_sahs.errors import LitSahsError
from lit_sahs.redact import redact

DEFAULT_DIR = Path("mlruns")
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_DIR}/mlflow.db"
DEFAULT_STORAGE = f"sqlite:///{DEFAULT_DIR}/optuna.db"  # Optuna studies
REFIT_ATTR = "lit_sahs.best_refit"  # study user attribute: the refit detector of a tune study


@dataclass
class MLflowSettings:
    """Where a run is tracked.

    Args:
        experiment: MLflow experiment name
        tracking_uri: MLflow tracking URI (default: SQLite in mlruns/, or MLFLOW_TRACKING_URI)
    """

    experiment: str = "lit_sahs"
    tracking_uri: Optional[str] = None


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


def absolute_uri(tracking_uri: Optional[str]) -> str:
    """The MLflow tracking URI to use, with a relative SQLite path made absolute: MLflow caches one store
    per URI string, so a relative path would keep pointing at the folder of the first use."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith(":memory:"):
            uri = "sqlite:///" + str(Path(path).resolve())
    return uri


def first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def probe_database(url: str, what: str) -> None:
    """Connect once to a server database URL (PostgreSQL, MySQL, SQL Server) with a short timeout, so an
    unreachable server is one clear error at once (MLflow alone retries for about a minute and a half)."""
    if not url.split(":", 1)[0].startswith(("postgresql", "mysql", "mssql")):
        return
    import sqlalchemy
    import sqlalchemy.exc
    from sqlalchemy.pool import NullPool

    engine = None
    try:
        args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
        engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=NullPool)
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as e:
        raise LitSahsError(redact(f"cannot reach {what} {url}: {first_line(e)}; check the URL, that the server "
                                  "is running and accepts this user", url)) from None
    except ModuleNotFoundError as e:
        raise LitSahsError(redact(f"{what} {url} needs the database driver {e.name!r}: pip install "
                                  f"{_driver_package(e.name)}", url)) from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as e:
        # ValueError: a URL SQLAlchemy cannot split (an unencoded '@', ':' or '/' in the password)
        raise LitSahsError(redact(f"{what} {url} is not a usable database URL: {first_line(e)}{_ENCODE_HINT}",
                                  url)) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        # e.g. the driver refusing the DSN ("invalid connection option") when a query password holds '&' or '='
        raise LitSahsError(redact(f"{what} {url} failed: {first_line(e)}{_ENCODE_HINT}", url)) from None
    finally:
        if engine is not None:
            engine.dispose()


_ENCODE_HINT = ("; if the password holds '@', ':', '/', '?', '&', '=', '{' or '}', percent-encode them "
                "(urllib.parse.quote(password, safe=''))")


def _driver_package(module: Optional[str]) -> str:
    name = str(module)
    return "psycopg2-binary" if "psycopg2" in name else "psycopg[binary]" if "psycopg" in name else name


def open_storage(url: str, heartbeat_interval: Optional[int] = 60):
    """Optuna RDBStorage for `url` (tables created on first use); any failure is one LitSahsError."""
    import optuna
    import sqlalchemy.exc

    if not url or "://" not in url:
        raise LitSahsError(redact(f"storage {url!r} is not a database URL: use sqlite:///path.db or "
                                  "postgresql+psycopg2://user:password@host:port/db", url))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:" and url.startswith("sqlite:///"):
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LitSahsError(redact(f"cannot create the folder of storage {url}: {e}", url)) from None
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs = {"heartbeat_interval": int(heartbeat_interval), "grace_period": 3 * int(heartbeat_interval)}
    last: Optional[BaseException] = None
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e  # two workers creating the tables of a fresh database at once: the loser retries
            time.sleep(0.5 + attempt)
        except sqlalchemy.exc.OperationalError as e:
            raise LitSahsError(redact(f"cannot reach the study storage {url}: {first_line(e)}; check the URL, "
                                      "that the server is running and accepts this user", url)) from None
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError, IndexError, KeyError) as e:
            # IndexError/KeyError: Optuna fills `{...}` in the URL as a template, so a brace in a password breaks it
            raise LitSahsError(redact(f"storage {url} is not a usable SQLAlchemy URL: {first_line(e)}{_ENCODE_HINT}",
                                      url)) from None
        except ModuleNotFoundError as e:
            raise LitSahsError(redact(f"storage {url} needs the database driver {e.name!r}: pip install "
                                      f"{_driver_package(e.name)}", url)) from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise LitSahsError(redact(f"study storage {url} failed: {first_line(e)}", url)) from None
    raise LitSahsError(redact(f"study storage {url} could not be initialised: {first_line(last)}", url))


def mlflow_client(tracking_uri: Optional[str] = None):
    """An MlflowClient for the tracking URI (and MLFLOW_REGISTRY_URI when set), probed first."""
    from mlflow import MlflowClient

    uri = absolute_uri(tracking_uri)
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    probe_database(uri, "the MLflow tracking store")
    if registry != uri:
        probe_database(registry, "the MLflow model registry")
    with first_use_lock(uri):  # the client opens (and on first use creates) the database
        return MlflowClient(tracking_uri=uri, registry_uri=registry)


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local SQLite database while MLflow opens it: two processes
    that open a new database at once (two tune workers started together) would both run MLflow's
    table creation and migrations, and the second would fail half-way. Other URIs: no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if fcntl is None or not path or path.startswith(":memory:"):
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:  # a read-only folder: nobody can create the database there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def no_artifact_progress_bar() -> Iterator[None]:
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def study_refit(study: str, storage: Optional[str] = None) -> dict:
    """The refit record (REFIT_ATTR) that `tune` stored in a study."""
    storage = storage or DEFAULT_STORAGE
    st = open_storage(storage, heartbeat_interval=None)
    try:
        sid = st.get_study_id_from_name(study)
    except KeyError:
        names = sorted(s.study_name for s in st.get_all_studies())
        raise LitSahsError(redact(f"no study {study!r} in {storage} (studies: {names or 'none'})", storage)) from None
    info = st.get_study_user_attrs(sid).get(REFIT_ATTR)
    if not info:
        raise LitSahsError(f"study {study!r} has no refit detector yet: run `python -m lit_sahs tune ... --refit true`")
    return info


class Tracker:
    """MLflow through a client (no global active run: trials of one process never share state)."""

    def __init__(self, tracking_uri: Optional[str], experiment: str):
        import mlflow
        from mlflow import MlflowClient

        self.uri = absolute_uri(tracking_uri)
        probe_database(self.uri, "the MLflow tracking store")
        try:
            with first_use_lock(self.uri):
                self.client = MlflowClient(self.uri, self.uri)
                exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(experiment,
                                                           artifact_location=artifact_location(experiment, self.uri))
                except mlflow.exceptions.MlflowException:  # another worker created it first
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
        except LitSahsError:
            raise
        except Exception as e:  # noqa: BLE001 - MlflowException, SQLAlchemy errors, connection errors
            raise LitSahsError(redact(f"cannot use the MLflow tracking store {self.uri}: {first_line(e)}", self.uri)) from None
        self.experiment_id = exp_id

    def create_run(self, name: str, tags: dict, parent: Optional[str] = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, params: Optional[dict] = None, metrics: Optional[dict] = None,
            step: int = 0, tags: Optional[dict] = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()
              if v is not None and math.isfinite(float(v))]
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), 1), 900):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(run_id, metrics=ms[i:i + 900], params=ps if i == 0 else [],
                                  tags=ts if i == 0 else [])

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


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


def mlflow_error() -> type[BaseException]:
    """MLflow's exception type (``except mlflow_error():``), imported only when one is being matched."""
    from mlflow.exceptions import MlflowException

    return MlflowException


def download_artifacts(source: str, dst: str | Path, tracking_uri: Optional[str] = None) -> Path:
    """Download an MLflow artifact URI (runs:/, models:/ download URI, file:, s3: ...) into `dst`."""
    import mlflow

    with no_artifact_progress_bar():
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                        tracking_uri=absolute_uri(tracking_uri)))


class RunLog:
    """What a command outside a Lightning Trainer logs to its MLflow run (``start_run``'s value), so
    commands never import mlflow themselves."""

    def __init__(self, run):
        self.run = run
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        import mlflow

        mlflow.log_params(params)

    def log_metric(self, key: str, value: float, step: Optional[int] = None) -> None:
        import mlflow

        mlflow.log_metric(key, value, step=step)

    def log_metrics(self, metrics: dict) -> None:
        import mlflow

        mlflow.log_metrics(metrics)

    def log_artifact(self, path: str | Path) -> None:
        import mlflow

        mlflow.log_artifact(str(path))


@contextlib.contextmanager
def start_run(experiment: str, tracking_uri: Optional[str] = None, run_name: Optional[str] = None) -> Iterator[RunLog]:
    """An MLflow run for commands outside a Lightning Trainer (evaluate, locate): ``with start_run(...) as run:
    run.log_params(...)``; the run ends FINISHED, or FAILED when the block raises."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    with first_use_lock(uri):
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifact_location(experiment, uri))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        yield RunLog(run)
