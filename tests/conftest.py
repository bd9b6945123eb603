import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests: 500 examples a test in CI (the CI environment sets CI=true), 60 in a local run;
# HYPOTHESIS_PROFILE=ci|dev chooses explicitly. No example database: nothing is written into the repo.
_PROPERTY = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=500, **_PROPERTY)
settings.register_profile("dev", max_examples=60, **_PROPERTY)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def _seed() -> None:
    import random

    import numpy
    import torch

    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _seeded_module():
    """torch seeds itself at random in every process: seed before a module's own fixtures (autouse runs first
    within its scope), so a module-scoped fixture that trains or samples gives the same result every run."""
    _seed()


@pytest.fixture(autouse=True)
def _seeded_test():
    """Every test starts from the same random state, whichever tests ran before it."""
    _seed()


@pytest.fixture(autouse=True)
def _mlflow_uri_restored():
    """mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ: without this, a test
    that points MLflow at its own database (a temporary PostgreSQL server, since stopped) would hand
    that URI to every later test that relies on the default."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged default target (dequantized once into the cache, then ~0.5 s a load)."""
    from lit_sahs.targets import load_target

    return load_target("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llava():
    from lit_sahs.targets import load_target

    return load_target("tiny-llava")


@pytest.fixture
def cli(capsys):
    """Run `python -m lit_sahs ...` in-process: (exit code, stdout, stderr)."""
    from lit_sahs.cli import main

    def run(argv):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory):
    """An MLflow SQLite database with its tables made once (creating them takes seconds); tests copy it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_workdir(tmp_path, monkeypatch, empty_mlflow_db):
    """A working directory whose default tracking URI (sqlite:///mlruns/mlflow.db) is a fresh copy
    of the empty database, with no tracking URI inherited from the environment."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return tmp_path
