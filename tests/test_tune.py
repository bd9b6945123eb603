"""`python -m lit_sahs tune` on a synthetic store with a SQLite study and MLflow store."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lit_sahs.errors import LitSahsError
from synthetic import FAMILIES, SIGNAL_HEADS, make_store

ROOT = Path(__file__).parents[1]


@pytest.fixture
def workdir(mlflow_workdir):
    make_store(mlflow_workdir / "store")  # optuna/, mlruns/ and artifacts/ land beside it
    return mlflow_workdir


def config(workdir: Path, **over) -> Path:
    cfg = {
        "store": str(workdir / "store"),
        "objective": "families",
        "ranking": "per_fold",
        "families": [],
        "min_rows": 20,
        "study_name": "syn",
        "storage": f"sqlite:///{workdir}/optuna/studies.db",
        "n_trials": 4,
        "seed": 0,
        "max_epochs": {"logistic": 3, "mlp": 6, "sparse": 6},
        "batch_size": 64,
        "space": {"detector": ["logistic", "mlp", "sparse"], "k": {"low": 1, "high": 6},
                  "logistic.l2": {"low": 1e-4, "high": 1.0, "log": True},
                  "mlp.hidden": {"low": 8, "high": 32, "log": True},
                  "mlp.lr": {"low": 1e-3, "high": 3e-2, "log": True},
                  "sparse.group_lasso": {"low": 1e-3, "high": 0.05, "log": True}},
        "sampler": {"name": "tpe", "n_startup_trials": 3},
        "pruner": {"name": "median", "n_startup_trials": 2},
        "heartbeat_interval": None,
        "refit": True,
        "output_dir": str(workdir / "artifacts" / "tune"),
        "tracking_uri": f"sqlite:///{workdir}/mlruns/mlflow.db",
        "experiment": "tune",
    }
    cfg.update(over)
    path = workdir / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_study(workdir, name="syn"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/optuna/studies.db")


def test_study_nests_trials_in_mlflow_refits_and_registers(workdir, cli):
    import mlflow

    code, out, err = cli(["tune", "--config", str(config(workdir))])
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["families"] == sorted(FAMILIES)
    study = load_study(workdir)
    assert len(study.trials) == 4 and sorted(t.number for t in study.trials) == list(range(4))
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    best = study.best_trial
    assert best.value > 0.95  # the planted heads carry to every held-out family
    assert set(best.user_attrs["held_out_auroc"]) == set(FAMILIES)
    assert 0.0 <= best.user_attrs["mean_tpr_at_1fpr"] <= 1.0
    assert best.intermediate_values and max(best.intermediate_values) == len(FAMILIES) - 1
    attrs = study.user_attrs
    assert attrs["lit_sahs.search_space"]["k"] == {"type": "int", "low": 1, "high": 6, "log": False}
    assert attrs["lit_sahs.objective"]["families"] == sorted(FAMILIES)
    parent = attrs["lit_sahs.mlflow"]["parent_run_id"]

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tune"])
    children = runs[runs["tags.mlflow.parentRunId"] == parent]
    trials = children[children["tags.lit_sahs.kind"] == "trial"]
    assert sorted(trials["tags.optuna.trial_number"].astype(int)) == list(range(4))
    assert set(trials["run_id"]) == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    done = trials[trials["tags.optuna.state"] == "COMPLETE"]
    assert (done["metrics.mean_held_out_auroc"] > 0).all() and "metrics.mean_tpr_at_1fpr" in runs.columns
    assert "params.detector" in runs.columns and "params.k" in runs.columns
    refit = children[children["tags.lit_sahs.kind"] == "refit"]
    assert len(refit) == 1
    client = mlflow.MlflowClient()
    refit_id = refit["run_id"].iloc[0]
    assert {a.path for a in client.list_artifacts(refit_id, "detector")} == {"detector/detector.json",
                                                                                "detector/detector.safetensors"}
    plots = {a.path for a in client.list_artifacts(parent, "study")}
    assert {"study/optimization_history.png", "study/trials.csv", "study/intermediate_values.png",
            "study/trials.md"} <= plots
    # every trial in the local table, best first, with the settings that produced it
    table = (workdir / "artifacts" / "tune" / "syn" / "trials.md").read_text().splitlines()
    body = [l.split(" | ") for l in table if l.startswith("| ") and l[2].isdigit()]
    assert sorted(int(r[0][2:]) for r in body) == list(range(4)) and result["trials_table"].endswith("trials.md")
    assert int(body[0][0][2:]) == best.number and float(body[0][2]) == pytest.approx(best.value, abs=5e-4)
    assert f"k {best.params['k']}" in body[0][-1]
    if sum(t.state.name == "COMPLETE" for t in study.trials) >= 2:
        assert "study/param_importances.png" in plots
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["best_value"] == pytest.approx(best.value)
    assert "baseline/tfidf/mean_held_out_auroc" in parent_run.data.metrics
    assert result["refit"]["detector"] == f"runs:/{refit_id}/detector"
    assert result["refit"]["model"] == f"runs:/{refit_id}/model"
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(refit_id, "model")}

    # the refit detector: local copy and the run's artifact load alike; register the study's refit
    from lit_sahs.artifact import load_detector

    local = load_detector(workdir / "artifacts" / "tune" / "syn" / "detector")
    assert {tuple(h) for h in local.head_set.to_list()} & set(SIGNAL_HEADS)
    code, out, err = cli(["register", "--study", "syn", "--storage", f"sqlite:///{workdir}/optuna/studies.db",
                          "--name", "syn-guard", "--alias", "champion",
                          "--tracking_uri", f"sqlite:///{workdir}/mlruns/mlflow.db"])
    assert code == 0, err[-2000:]
    reg = json.loads(out.strip().splitlines()[-1])
    # the version is the refit run's pyfunc model, linked to that run and its metrics
    assert reg["source"] == f"runs:/{refit_id}/model" and reg["version"] == 1 and reg["run_id"] == refit_id
    mv = client.get_model_version("syn-guard", "1")
    assert mv.run_id == refit_id
    assert client.get_run(mv.run_id).data.metrics["mean_held_out_auroc"] == pytest.approx(best.value)
    assert float(reg["tags"]["metric.mean_held_out_auroc"]) == pytest.approx(best.value, abs=1e-5)
    assert reg["tags"]["optuna.study"] == "syn"
    reg_det = load_detector("models:/syn-guard@champion")  # default tracking URI: mlruns/ in the cwd
    from lit_sahs.evaluate import detector_scores

    x = np.random.default_rng(0).standard_normal((16, len(local.head_set), 8)).astype(np.float32)
    assert np.allclose(detector_scores(reg_det, x), detector_scores(local, x))

    # a second worker run joins the same study and parent run; n_trials 0 only refits
    code, out, err = cli(["tune", "--config", str(config(workdir, n_trials=1, refit=False))])
    assert code == 0, err[-2000:]
    again = json.loads(out.strip().splitlines()[-1])
    assert again["created"] is False and again["parent_run_id"] == parent and again["ran_here"] == 1
    assert len(load_study(workdir).trials) == 5


def test_pruned_trials_are_recorded(workdir, cli):
    import mlflow

    cfg = config(workdir, n_trials=2, pruner={"name": "threshold", "lower": 1.01},
                 space={"detector": ["logistic"], "k": {"low": 1, "high": 4}})
    code, out, err = cli(["tune", "--config", str(cfg)])
    assert code == 0, err[-2000:]
    study = load_study(workdir)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [0] for t in study.trials)  # stopped after the first fold
    assert json.loads(out.strip().splitlines()[-1])["best"] is None
    table = (workdir / "artifacts" / "tune" / "syn" / "trials.md").read_text()
    assert table.count("| pruned |") == 2  # a study with nothing complete still lists what it ran
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tune"])
    trials = runs[runs["tags.lit_sahs.kind"] == "trial"]
    assert set(trials["status"]) == {"KILLED"} and set(trials["tags.optuna.state"]) == {"PRUNED"}


def test_changed_search_space_or_objective_is_refused(workdir, cli):
    code, _, err = cli(["tune", "--config", str(config(workdir, n_trials=1, refit=False))])
    assert code == 0, err[-2000:]
    space = yaml.safe_load((workdir / "tune.yaml").read_text())["space"]
    space["k"] = {"low": 1, "high": 8}
    code, _, err = cli(["tune", "--config", str(config(workdir, n_trials=1, refit=False, space=space))])
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error:") and "search space" in last and "k" in last
    code, _, err = cli(["tune", "--config", str(config(workdir, n_trials=1, refit=False, families=["dan", "plain"]))])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "objective" in last and "families" in last
    assert len(load_study(workdir).trials) == 1  # nothing ran against the mismatched settings


@pytest.mark.parametrize("storage, expect", [
    ("postgresql+psycopg2://lit:s3cret-pw@127.0.0.1:1/optuna", "cannot reach the study storage"),
    ("sqlite:////proc/no/such/dir/optuna.db", "storage"),
    ("nosuchdb://host/db", "not a usable"),
    ("optuna.db", "not a database URL"),
])
def test_bad_storage_is_one_clear_error(workdir, cli, storage, expect):
    code, _, err = cli(["tune", "--config", str(config(workdir)), "--storage", storage])
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error:") and expect in lines[-1], err[-2000:]
    assert "s3cret-pw" not in err  # passwords never reach messages


def test_unreachable_tracking_store_is_one_error_and_creates_no_study(workdir, cli):
    import optuna

    code, _, err = cli(["tune", "--config", str(config(workdir)),
                        "--tracking_uri", "postgresql://lit:s3cret-pw@127.0.0.1:1/mlflow"])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "cannot reach the MLflow tracking store" in last and "s3cret-pw" not in err
    assert optuna.study.get_all_study_names(f"sqlite:///{workdir}/optuna/studies.db") == []


@pytest.mark.parametrize("space, expect", [
    ({"detector": ["logistic"], "k": {"low": 1, "high": 4}, "logistic.nosuch": {"low": 0.1, "high": 1.0}}, "nosuch"),
    ({"detector": ["logistic"], "k": {"low": 1, "high": 999}}, "1..12"),
    ({"detector": ["forest"], "k": {"low": 1, "high": 4}}, "forest"),
    ({"detector": ["logistic"]}, "'k'"),
    ({"detector": ["mlp"], "k": 2, "mlp.lr": {"low": 0.0, "high": 0.1, "log": True}}, "log scale"),
    ({"detector": ["logistic"], "k": 2, "features": ["none", "mean"]}, "--pool mean"),  # a store without pools
])
def test_bad_search_space_is_refused_before_the_study(workdir, cli, space, expect):
    code, _, err = cli(["tune", "--config", str(config(workdir, space=space))])
    assert code == 2 and expect in err.strip().splitlines()[-1], err[-2000:]
    assert not (workdir / "optuna" / "studies.db").exists()


def test_search_space_parsing():
    from lit_sahs.tune import SearchSpace

    s = SearchSpace.parse({"detector": ["mlp", "logistic"], "k": [2, 4], "mlp.hidden": {"low": 8, "high": 64, "log": True},
                           "mlp.lr": {"low": 1e-4, "high": 1e-2}, "mlp.num_layers": 2,
                           "logistic.optimizer": ["lbfgs", "adam"]}, max_heads=10)
    d = s.to_dict()
    assert d["mlp.hidden"] == {"type": "int", "low": 8, "high": 64, "log": True}
    assert d["mlp.lr"]["type"] == "float" and d["mlp.num_layers"] == {"value": 2}
    assert d["k"] == {"choices": [2, 4]}
    fam, k, hp, feats = SearchSpace.from_params({"detector": "mlp", "k": 4, "mlp.hidden": 16, "mlp.lr": 1e-3}, s)
    assert (fam, k, hp, feats) == ("mlp", 4, {"hidden": 16, "lr": 1e-3, "num_layers": 2}, None)
    assert "features" not in d  # a space without features keeps the dict older studies recorded
    f = SearchSpace.parse({"detector": ["logistic"], "k": 2, "features": ["none", "resid,refusal"]}, max_heads=10)
    assert f.feature_specs() == [None, "resid,refusal"] and f.to_dict()["features"] == {"choices": ["none", "resid,refusal"]}
    assert SearchSpace.from_params({"features": "resid,refusal"}, f)[3] == "resid,refusal"
    # what issue 21 added is searchable: the heads pooled over the prompt and the low-FPR objective
    p = SearchSpace.parse({"detector": ["logistic"], "k": 2, "features": ["none", "mean", "mean,max"],
                           "logistic.low_fpr_weight": [0.0, 1.0]}, max_heads=10)
    assert p.feature_specs() == [None, "mean", "mean,max"]
    assert SearchSpace.from_params({"detector": "logistic", "k": 2, "features": "mean", "logistic.low_fpr_weight": 1.0},
                                   p)[2:] == ({"low_fpr_weight": 1.0}, "mean")
    with pytest.raises(LitSahsError, match="feature specs"):
        SearchSpace.parse({"detector": ["logistic"], "k": 2, "features": {"low": 1, "high": 2}}, max_heads=10)
    with pytest.raises(LitSahsError, match="low"):
        SearchSpace.parse({"k": {"low": 5, "high": 2}}, max_heads=10)


def test_repo_config_parses(capsys):
    from lit_sahs.tune import SearchSpace, parse_config

    cfg = parse_config(["--config", str(ROOT / "configs" / "tune.yaml")])
    assert cfg.n_trials == 20 and cfg.store == "stores/quickstart-smollm2" and cfg.ranking == "per_fold"
    space = SearchSpace.parse(cfg.space, max_heads=270).to_dict()
    assert space["detector"] == {"choices": ["logistic", "mlp", "sparse"]}
    assert {"logistic.l2", "mlp.hidden", "mlp.lr", "sparse.group_lasso"} <= set(space)


def test_the_recorded_tune_study_config_parses():
    """experiments/results/tune-guard2000-smollm2/tune.yaml: the study docs/results.md reports."""
    from lit_sahs.tune import SearchSpace, parse_config

    cfg = parse_config(["--config", str(ROOT / "experiments" / "results" / "tune-guard2000-smollm2" / "tune.yaml")])
    assert cfg.objective == "sources" and cfg.n_trials == 12 and cfg.store == "stores/guard2000-smollm2"
    space = SearchSpace.parse(cfg.space, max_heads=270)
    assert space.feature_specs() == [None, "mean", "max", "mean,max", "resid,refusal"]
    assert "logistic.low_fpr_weight" in space.to_dict()


def test_the_recorded_attnpool_study_config_parses():
    """experiments/results/tune-attnpool-qwen2.5-coder-1.5b/tune.yaml: the attention-pooling study docs/results.md reports."""
    from lit_sahs.tune import SearchSpace, parse_config

    cfg = parse_config(["--config", str(ROOT / "experiments" / "results" / "tune-attnpool-qwen2.5-coder-1.5b" / "tune.yaml")])
    assert cfg.objective == "sources" and cfg.n_trials == 16 and cfg.store == "stores/guard-tokens-judge-qwen2.5-coder-1.5b"
    space = SearchSpace.parse(cfg.space, max_heads=32)
    assert space.feature_specs() == ["tokens", "tokens,judge"] and "attnpool.queries" in space.to_dict()


@pytest.mark.parametrize("size", ["1000", "2000"])
def test_the_recorded_larger_store_study_configs_parse(size):
    """experiments/results/tune-guard{1000,2000}-qwen2.5-coder-1.5b/tune-wide.yaml: the studies docs/results.md reports."""
    from lit_sahs.tune import SearchSpace, parse_config

    path = ROOT / "experiments" / "results" / f"tune-guard{size}-qwen2.5-coder-1.5b" / "tune-wide.yaml"
    cfg = parse_config(["--config", str(path)])
    assert cfg.objective == "sources" and cfg.n_trials == 40 and cfg.store == f"stores/guard{size}-qwen2.5-coder-1.5b"
    assert cfg.study_name == f"guard{size}-qwen2.5-coder-1.5b-wide"
    space = SearchSpace.parse(cfg.space, max_heads=336)
    assert space.feature_specs() == [None, "mean", "max", "mean,max", "resid,refusal"]
    assert {"logistic.low_fpr_weight", "mlp.hidden"} <= set(space.to_dict())
