"""`python -m lit_sahs fit/locate/evaluate` end to end on a synthetic store (no target needed)."""
import json
from pathlib import Path

import pytest
import yaml

from synthetic import SIGNAL_HEADS, make_store


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mlruns/ and artifacts/ land here
    make_store(tmp_path / "store")
    return tmp_path


def write_config(workdir: Path, model: dict, data_extra: dict | None = None) -> Path:
    cfg = {
        "seed_everything": 0,
        "mlflow": {"experiment": "unit", "tracking_uri": f"sqlite:///{workdir}/mlruns/mlflow.db"},
        "output_dir": str(workdir / "out"),
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 8, "enable_progress_bar": False,
                    "default_root_dir": str(workdir / "root"), "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(workdir / "ckpt"), "monitor": "val/auroc",
                                                 "mode": "max", "filename": "best"}}]},
        "model": model,
        "data": {"class_path": "lit_sahs.data.datamodules.CachedActivationDataModule",
                 "init_args": {"store": str(workdir / "store"), "ranking": str(workdir / "store" / "ranking.json"),
                               "top_k": 2, "held_out": {"families": ["pliny"]}, "batch_size": 64, **(data_extra or {})}},
    }
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_locates_fits_tests_and_tracks(workdir, cli):
    cfg = write_config(workdir, {"class_path": "lit_sahs.detectors.LogisticDetector", "init_args": {"l2": 0.001}})
    code, out, err = cli(["fit", "--config", str(cfg)])
    assert code == 0, err[-2000:]
    ranking = json.loads((workdir / "store" / "ranking.json").read_text())
    assert {(s["layer"], s["head"]) for s in ranking["scores"][:2]} == set(SIGNAL_HEADS)
    assert (workdir / "store" / "heads.png").exists()
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert set(report) == {"heads", "tfidf", "text_embedding", "residual", "perplexity"}
    assert report["heads"]["overall"]["auroc"] > 0.95  # planted signal in the held-out family too
    assert set(report["heads"]) == {"overall", "pliny"}  # only the held-out family is tested
    assert "| pliny |" in out and "heads auroc" in out
    benign = json.loads((workdir / "out" / "benign_fpr.json").read_text())
    assert set(benign) == set(report)  # every method, each at its own calibrated threshold
    for method, by_source in benign.items():
        assert set(by_source) == {"src_a", "src_b"} and all(0 <= d["fpr"] <= 1 for d in by_source.values())
        assert sum(d["n"] for d in by_source.values()) == report[method]["overall"]["n_benign"]
        flagged = sum(d["flagged"] for d in by_source.values())  # the same threshold as report.json's fpr
        assert flagged / report[method]["overall"]["n_benign"] == pytest.approx(report[method]["overall"]["fpr"])
    # baselines are calibrated like the detector (5% of validation benign), not left at 0.5, which
    # flags about half of the synthetic store's benign rows (their NLLs are uniform on [0, 1))
    assert report["perplexity"]["overall"]["fpr"] < 0.25
    assert "by source" in (workdir / "out" / "report.md").read_text()
    from lit_sahs.artifact import load_detector

    exported = load_detector(workdir / "out" / "detector")  # a LightningCLI-built detector reloads
    assert exported.head_set is not None and len(exported.head_set) == 2
    assert (workdir / "out" / "roc.png").read_bytes()[:4] == b"\x89PNG"

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["unit"])
    assert len(runs) == 1
    run_ = runs.iloc[0]
    assert run_["metrics.val/auroc"] > 0.95
    assert "metrics.report/heads/pliny/auroc" in runs.columns
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_["run_id"])}
    assert {"detector", "model", "report.md", "roc.png", "ranking.json", "heads.png"} <= arts
    # lineage: the run is named after the config, its id and model URI are printed, and registering
    # runs:/<id>/detector makes a version of the run's pyfunc model, linked to the run and its metrics
    run_id = run_["run_id"]
    assert run_["tags.mlflow.runName"] == "fit-cfg"
    assert f"MLflow run: {run_id}" in out and f"runs:/{run_id}/model" in out
    code, out, err = cli(["register", "--detector", f"runs:/{run_id}/detector", "--name", "unit-guard",
                          "--alias", "champion", "--tracking_uri", f"sqlite:///{workdir}/mlruns/mlflow.db"])
    assert code == 0, err[-2000:]
    c = mlflow.MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    mv = c.get_model_version_by_alias("unit-guard", "champion")
    assert mv.run_id == run_id and mv.source == f"runs:/{run_id}/model"
    assert c.get_run(mv.run_id).data.metrics["val/auroc"] == pytest.approx(run_["metrics.val/auroc"])
    assert mlflow.get_experiment_by_name("registry") is None  # no run made for the files
    for uri in ("models:/unit-guard@champion", f"runs:/{run_id}/detector", f"runs:/{run_id}/model"):
        assert load_detector(uri, tracking_uri=f"sqlite:///{workdir}/mlruns/mlflow.db").head_set == exported.head_set


def test_sparse_detector_keeps_the_signal_heads(workdir, cli):
    cfg = write_config(workdir, {"class_path": "lit_sahs.detectors.SparseHeadDetector",
                                 "init_args": {"group_lasso": 0.05, "selection_threshold": 0.5}},
                       {"ranking": None, "all_heads": True})
    code, out, err = cli(["fit", "--config", str(cfg), "--trainer.max_epochs", "40"])
    assert code == 0, err[-2000:]
    heads = json.loads((workdir / "out" / "heads.json").read_text())
    kept = {(h["layer"], h["head"]) for h in heads if h.get("selected")}
    assert kept == set(SIGNAL_HEADS)
    assert {(h["layer"], h["head"]) for h in heads[:2]} == set(SIGNAL_HEADS)  # strongest first


def test_quickstart_config_parses(cli):
    code, out, err = cli(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"),
                          "--print_config"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["model"]["class_path"] == "lit_sahs.detectors.LogisticDetector"
    assert cfg["prepare"]["target"] == "smollm2-135m-instruct"
    assert cfg["data"]["init_args"]["held_out"]["families"] == ["dan"]
    # the shipped threshold is the cross-fitted one, as in configs/guard.yaml
    assert any(cb["class_path"] == "lit_sahs.crossfit.CrossFitCalibration" for cb in cfg["trainer"]["callbacks"])


def test_locate_and_zero_shot_commands(workdir, cli):
    db = f"sqlite:///{workdir}/mlruns/mlflow.db"
    code, out, err = cli(["locate", "--store", str(workdir / "store"), "--tracking_uri", db])
    assert code == 0, err
    assert "2.1" in out.split("top 8 heads")[1].split(",")[0] or "3.0" in out.split("top 8 heads")[1].split(",")[0]
    code, out, err = cli(["evaluate", "--store", str(workdir / "store"), "--top_k", "2", "--max_epochs", "5",
                          "--tracking_uri", db])
    assert code == 0, err[-2000:]
    csv = (workdir / "store" / "zero_shot" / "matrix_heads.csv").read_text().splitlines()
    assert csv[0] == "train\\test,dan,plain,pliny"
    assert len(csv) == 5 and csv[-1].startswith("all others,")
    values = [float(v) for line in csv[1:] for v in line.split(",")[1:] if v]
    assert min(values) > 0.9  # planted signal transfers across families
    assert (workdir / "store" / "zero_shot" / "matrix_heads.png").exists()
    assert (workdir / "store" / "zero_shot" / "matrix_tfidf.csv").exists()


def test_bad_input_is_one_error_line(workdir, cli):
    code, _, err = cli(["evaluate", "--store", str(workdir / "store"), "--heads", "2.1,3.0", "--families", "plain,nosuch",
                        "--tracking_uri", f"sqlite:///{workdir}/mlruns/mlflow.db"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "nosuch" in err
    cfg = write_config(workdir, {"class_path": "lit_sahs.detectors.LogisticDetector"},
                       {"held_out": {"families": ["nosuch"]}})
    code, _, err = cli(["fit", "--config", str(cfg)])
    assert code == 2 and "nosuch" in err.strip().splitlines()[-1]
    assert not (workdir / "out").exists()


def test_guard_config_parses_and_its_sources_assemble(cli):
    from lit_sahs.data.protocol import build_dataset

    code, out, err = cli(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "guard.yaml"), "--print_config"])
    assert code == 0, err
    prep = yaml.safe_load(out)["prepare"]
    benign = [n.strip() for n in prep["benign"].split(",")]
    assert "sharegpt_instructions" in benign
    samples = build_dataset(harmful=prep["harmful"].split(","), benign=benign, attacks=["plain"], limit=120)
    assert {"sharegpt_instructions", "sharegpt"} <= {s.source for s in samples}  # the subset keeps its prompts
    # every named source contributes, labelled as the config says
    labels = {s.source: s.label for s in samples}
    assert {n: labels.get(n) for n in prep["harmful"].split(",")} == {n: 1 for n in prep["harmful"].split(",")}
    assert {n: labels.get(n) for n in benign} == {n: 0 for n in benign}
    cfg = yaml.safe_load(out)
    # the source-protocol winner: logistic on the larger target's top first-token heads
    assert prep["target"] == "qwen2.5-coder-1.5b-instruct"
    assert cfg["model"]["class_path"].endswith("LogisticDetector") and cfg["model"]["init_args"]["l2"] == 0.9
    data = cfg["data"]["init_args"]
    assert data["top_k"] == 9 and data["ranking"].startswith(data["store"] + "/") and not data["all_heads"]
    assert cfg["trainer"]["callbacks"][0]["class_path"] == "lit_sahs.crossfit.CrossFitCalibration"


def test_the_recorded_attnpool_guard_config_parses(cli):
    """experiments/results/attnpool-guard2000-smollm2/guard-attnpool.yaml: the run docs/results.md reports."""
    path = Path(__file__).parents[1] / "experiments" / "results" / "attnpool-guard2000-smollm2" / "guard-attnpool.yaml"
    code, out, err = cli(["fit", "--config", str(path), "--print_config"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["model"]["class_path"].endswith("AttentionPoolDetector") and cfg["data"]["init_args"]["features"] == "tokens"
    assert cfg["data"]["init_args"]["held_out"] == {"families": ["dan"], "sources": ["past_tense", "sharegpt_instructions"]}
    assert cfg["trainer"]["callbacks"][0]["class_path"] == "lit_sahs.crossfit.CrossFitCalibration"


def test_the_recorded_judge_band_guard_config_parses(cli):
    """experiments/results/judge-cut-guard-qwen2.5-coder-1.5b/guard-judge.yaml: the guard recipe with a judge band."""
    path = (Path(__file__).parents[1] / "experiments" / "results" / "judge-cut-guard-qwen2.5-coder-1.5b"
            / "guard-judge.yaml")
    code, out, err = cli(["fit", "--config", str(path), "--print_config"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    cb = cfg["trainer"]["callbacks"][0]
    assert cb["class_path"] == "lit_sahs.crossfit.CrossFitCalibration" and cb["init_args"]["judge_band"] == [0.3, 0.9]
    assert cfg["data"]["init_args"]["store"] == "stores/guard-tokens-judge-qwen2.5-coder-1.5b"
    assert cfg["data"]["init_args"]["top_k"] == 9 and cfg["model"]["init_args"]["l2"] == 0.9
    assert cfg["data"]["init_args"]["held_out"] == {"families": ["dan"], "sources": ["past_tense", "sharegpt_instructions"]}


def test_the_recorded_largest_store_guard_config_parses(cli):
    """experiments/results/guard-largest-smollm2/guard-largest.yaml: the guard recipe on the largest store."""
    path = Path(__file__).parents[1] / "experiments" / "results" / "guard-largest-smollm2" / "guard-largest.yaml"
    code, out, err = cli(["fit", "--config", str(path), "--print_config"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["prepare"]["spread_attacks"] is True and cfg["prepare"]["limit"] == 6000
    assert cfg["data"]["init_args"]["store"] == "stores/largest-smollm2"
    assert cfg["model"]["class_path"].endswith("SparseHeadDetector")
    assert cfg["data"]["init_args"]["held_out"] == {"families": ["dan"], "sources": ["past_tense", "sharegpt_instructions"]}


def test_fit_with_prepare_extracts_locates_and_reports(workdir, cli):
    """`prepare.target` set: fit extracts the store first (LightningCLI hands the section over as a
    namespace), locates the heads, fits, and writes the report and the artifact."""
    cfg = yaml.safe_load(write_config(workdir, {"class_path": "lit_sahs.detectors.LogisticDetector"}).read_text())
    cfg["prepare"] = {"target": "tiny-llava", "harmful": "advbench", "benign": "truthfulqa", "attacks": "plain",
                      "limit": 48, "batch_size": 16}
    cfg["data"]["init_args"].update({"store": str(workdir / "tiny"), "ranking": str(workdir / "tiny" / "ranking.json"),
                                     "held_out": {"families": []}})
    cfg["trainer"]["max_epochs"] = 2
    (workdir / "prep.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = cli(["fit", "--config", str(workdir / "prep.yaml")])
    assert code == 0, err[-2000:]
    assert (workdir / "tiny" / "manifest.json").exists() and (workdir / "tiny" / "ranking.json").exists()
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["heads"]["overall"]["n"] > 0
    assert (workdir / "out" / "detector" / "detector.json").exists()


def test_fit_prepares_heads_at_every_token_and_trains_the_attention_pooling_family(workdir, cli):
    """`prepare.token_heads` records the heads at every token; `fit --model AttentionPoolDetector` with
    `features: tokens` trains on them and exports an artifact that reads them."""
    from lit_sahs.artifact import load_detector

    cfg = yaml.safe_load(write_config(workdir, {"class_path": "lit_sahs.detectors.AttentionPoolDetector"}).read_text())
    cfg["prepare"] = {"target": "tiny-llama", "harmful": "advbench", "benign": "truthfulqa", "attacks": "plain",
                      "limit": 48, "batch_size": 16, "token_heads": "2.1,0.3", "token_length": 16}
    cfg["data"]["init_args"].update({"store": str(workdir / "tok"), "heads": "2.1,0.3", "features": "tokens",
                                     "held_out": {"families": []}})
    cfg["data"]["init_args"].pop("ranking", None)
    cfg["trainer"]["max_epochs"] = 2
    cfg["baselines"] = []
    (workdir / "tok.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = cli(["fit", "--config", str(workdir / "tok.yaml")])
    assert code == 0, err[-2000:]
    det = load_detector(workdir / "out" / "detector")
    assert det.family == "attnpool" and det.feature_spec.names == ("tok:2.1", "tok:0.3", "tokmask")
    assert det.feature_spec.token_length == 16


def test_checkpoints_without_a_dirpath_go_under_the_output_dir(workdir, cli):
    """A ModelCheckpoint with no dirpath writes under --output_dir/checkpoints, not into
    ./<experiment id>/<run id>/checkpoints of the working directory; Lightning's tips stay out."""
    cfg = yaml.safe_load(write_config(workdir, {"class_path": "lit_sahs.detectors.LogisticDetector"}).read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].pop("dirpath")
    cfg["trainer"].pop("default_root_dir")
    cfg["trainer"]["max_epochs"] = 2
    cfg["baselines"] = []
    (workdir / "nodir.yaml").write_text(yaml.safe_dump(cfg))
    before = {p.name for p in workdir.iterdir()}
    code, out, err = cli(["fit", "--config", str(workdir / "nodir.yaml")])
    assert code == 0, err[-2000:]
    assert (workdir / "out" / "checkpoints" / "best.ckpt").exists()
    assert {p.name for p in workdir.iterdir()} - before <= {"out", "mlruns"}
    assert "Tip:" not in out + err


@pytest.mark.parametrize("name,extra", [("wraps", {}), ("wraps-benign", {"wrap_classes": "benign"})])
def test_the_recorded_safevlm_wraps_configs_differ_from_the_shipped_stage2_by_the_wraps_only(cli, name, extra):
    """experiments/results/safevlm-configs-wraps*/stage2.yaml: the shipped stage II plus in-the-wild training wraps
    (of both classes, or of the benign rows only)."""
    root = Path(__file__).parents[1]
    cfgs = []
    for path in (root / "configs" / "safevlm_stage2.yaml", root / f"experiments/results/safevlm-configs-{name}/stage2.yaml"):
        code, out, err = cli(["fit", "--config", str(path), "--print_config"])
        assert code == 0, err
        cfgs.append(yaml.safe_load(out))
    shipped, wraps = cfgs
    assert wraps["data"]["init_args"].pop("train_wraps") == "inthewild" and shipped["data"]["init_args"].pop("train_wraps") == []
    for key, value in extra.items():
        assert wraps["data"]["init_args"].pop(key) == value and shipped["data"]["init_args"].pop(key) != value
    assert wraps["output_dir"] == f"artifacts/safevlm-stage2-{name}"
    # the recorded runs predate the gated answer margin (they chose among their epochs by val/answer_margin) and
    # the answer cut the shipped config places at the end of its fit
    assert {c["init_args"]["monitor"] for c in wraps["trainer"].pop("callbacks")} == {"val/answer_margin"}
    callbacks = shipped["trainer"].pop("callbacks")
    assert [c["class_path"] for c in callbacks if "monitor" not in c["init_args"]] == ["lit_sahs.live_answer_cut.LiveAnswerCut"]
    assert {c["init_args"]["monitor"] for c in callbacks if "monitor" in c["init_args"]} == {"val/gated_answer_margin"}
    for cfg in cfgs:
        cfg.pop("output_dir"), cfg["trainer"].pop("default_root_dir")
    assert wraps == shipped  # same stage I, draw, held-out family, validation sources and training settings


def test_the_stage1_start_config_only_makes_the_start_a_checkpoint_candidate(cli):
    """experiments/configs/safevlm_stage1_start.yaml, layered over configs/safevlm_stage1.yaml: the same fit with
    InitialCheckpoint (same monitor) in place of ModelCheckpoint, into its own output directory."""
    root = Path(__file__).parents[1]
    shipped_path = root / "configs" / "safevlm_stage1.yaml"
    cfgs = []
    for extra in ([], ["--config", str(root / "experiments/configs/safevlm_stage1_start.yaml")]):
        code, out, err = cli(["fit", "--config", str(shipped_path), *extra, "--print_config"])
        assert code == 0, err
        cfgs.append(yaml.safe_load(out))
    shipped, start = cfgs
    assert start["output_dir"] == start["trainer"]["default_root_dir"] == "artifacts/safevlm-stage1-start"
    callbacks = [(c["class_path"].rsplit(".", 1)[1], c["init_args"]["monitor"]) for c in start["trainer"].pop("callbacks")]
    assert callbacks == [("InitialCheckpoint", "val/margin"), ("EarlyStopping", "val/margin")]
    assert [c["class_path"].rsplit(".", 1)[1] for c in shipped["trainer"].pop("callbacks")] == ["ModelCheckpoint", "EarlyStopping"]
    for cfg in cfgs:
        cfg.pop("output_dir"), cfg["trainer"].pop("default_root_dir")
    assert start == shipped
