"""PostgreSQL for real: a local server from Debian's packages (scripts/postgres.sh), one Optuna study
run by two worker processes, MLflow with a PostgreSQL backend store and registry.

Where no server can be started the tests skip and say why; in CI (CI=true) they fail instead."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from synthetic import make_store

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "postgres.sh"


def _unavailable(reason: str):
    msg = f"no local PostgreSQL server could be started: {reason.strip()[-1500:]}"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (CI=true: the PostgreSQL tests must run; see scripts/postgres.sh)", pytrace=False)
    pytest.skip(msg)


class Server:
    def __init__(self, url: str):
        self.url = url  # postgresql://lit_sahs:pw@127.0.0.1:port/lit_sahs

    def database(self, prefix: str) -> str:
        """A fresh, empty database; returns its URL (postgresql://...)."""
        import psycopg2

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def postgres():
    try:
        import psycopg2  # noqa: F401
    except ImportError as e:
        _unavailable(f"the psycopg2 driver is missing ({e}): pip install psycopg2-binary")
    # not under pytest's tmp: those folders are private to root and the server runs as `postgres`
    data = tempfile.mkdtemp(prefix="lit_sahs-pg-")
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start", data], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(data, ignore_errors=True)
        _unavailable(repr(e))
    if proc.returncode != 0 or not proc.stdout.strip():
        shutil.rmtree(data, ignore_errors=True)
        _unavailable(proc.stderr or proc.stdout or f"scripts/postgres.sh exited {proc.returncode}")
    server = Server(proc.stdout.strip().splitlines()[-1])
    try:
        yield server
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", data], capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_without_losing_or_duplicating_trials(postgres, tmp_path):
    import mlflow
    import optuna

    n = 3  # trials per worker
    make_store(tmp_path / "store", n_base=40)
    study_url = postgres.database("optuna").replace("postgresql://", "postgresql+psycopg2://", 1)
    tracking = postgres.database("mlflow")
    # make both schemas once, as an operator would before starting a fleet of workers
    mlflow.MlflowClient(tracking).search_experiments()
    cfg = {
        "store": str(tmp_path / "store"), "objective": "families", "ranking": "per_fold", "families": [], "min_rows": 20,
        "study_name": "shared", "storage": study_url, "n_trials": n, "seed": 0,
        "max_epochs": {"logistic": 2, "sparse": 3}, "batch_size": 64,
        "space": {"detector": ["logistic", "sparse"], "k": {"low": 1, "high": 6},
                  "logistic.l2": {"low": 1e-4, "high": 1.0, "log": True},
                  "sparse.group_lasso": {"low": 1e-3, "high": 0.05, "log": True}},
        "sampler": {"name": "tpe", "n_startup_trials": 3}, "pruner": {"name": "median", "n_startup_trials": 2},
        "heartbeat_interval": 10, "refit": False, "plots": False, "baselines": [],
        "tracking_uri": tracking, "experiment": "tune",
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-m", "lit_sahs", "tune", "--config", str(path)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["ran_here"] for o in outs) == [n, n]
    assert sorted(o["created"] for o in outs) == [False, True]  # one created the study, the other joined it
    assert outs[0]["parent_run_id"] == outs[1]["parent_run_id"]

    study = optuna.load_study(study_name="shared", storage=study_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 2 * n and sorted(numbers) == list(range(2 * n))  # none lost, none duplicated
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers ran trials
    run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert len(set(run_ids)) == 2 * n

    # every trial is one MLflow run in PostgreSQL, nested under the study's single parent run
    parent = study.user_attrs["lit_sahs.mlflow"]["parent_run_id"]
    assert parent == outs[0]["parent_run_id"]
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["tune"])
    assert list(runs[runs["tags.lit_sahs.kind"] == "study"]["run_id"]) == [parent]
    trials = runs[runs["tags.lit_sahs.kind"] == "trial"]
    assert (trials["tags.mlflow.parentRunId"] == parent).all()
    assert sorted(trials["tags.optuna.trial_number"].astype(int)) == list(range(2 * n))
    assert set(trials["run_id"]) == set(run_ids)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    done = trials.set_index("run_id").loc[[t.user_attrs["mlflow_run_id"] for t in complete]]
    assert list(done["metrics.mean_held_out_auroc"].round(6)) == [round(t.value, 6) for t in complete]


def test_mlflow_run_and_registry_on_a_postgres_backend(postgres, tmp_path, monkeypatch):
    import mlflow
    import torch

    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.registry import register_detector
    from synthetic import FP

    monkeypatch.chdir(tmp_path)  # the default artifact root of a database store is ./mlruns
    tracking = postgres.database("mlflow")
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("pg-check")  # not an experiment id another test left active
    with mlflow.start_run(run_name="pg") as run:
        mlflow.log_param("store", "synthetic")
        mlflow.log_metric("auroc", 0.75, step=2)
        (tmp_path / "note.txt").write_text("logged through PostgreSQL")
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    got = mlflow.get_run(run.info.run_id)
    assert got.data.params == {"store": "synthetic"} and got.data.metrics == {"auroc": 0.75}
    assert got.info.status == "FINISHED"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["note.txt"]

    det = LogisticDetector()
    det.bind([(2, 1)], FP.geometry, FP, torch.zeros(1, 8), torch.ones(1, 8))
    art = save_detector(det, tmp_path / "det")
    out = register_detector(str(art), "pg-guard", alias="champion", tracking_uri=tracking)
    assert out["version"] == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    assert load_detector("models:/pg-guard@champion").head_set.to_list() == [[2, 1]]


def test_no_server_skips_locally_but_fails_in_ci(monkeypatch):
    from _pytest.outcomes import Failed, Skipped

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match="no local PostgreSQL server could be started: initdb missing"):
        _unavailable("initdb missing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="CI=true"):
        _unavailable("initdb missing")
