"""Thresholds cross-fitted over source folds: they keep their false-positive rate on a benign
source the detector never read better than the validation-calibrated threshold."""
import json

import numpy as np
import pytest

from lit_sahs.crossfit import crossfit_threshold, weighted_threshold
from lit_sahs.data.holdout import Holdout
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.folds import Folds
from synthetic import SIGNAL_HEADS, shifted_sources_store

HEADS = ",".join(f"{l}.{h}" for l, h in SIGNAL_HEADS)
# benign sources whose prompts sit closer to the harmful side, by a source-level shift: what a
# collection of borderline requests looks like to a detector trained on ordinary ones
SHIFT = {"ben0": 0.0, "ben1": 0.0, "ben2": 1.6, "ben3": 1.6}


def shifted_store(path, n_per_source: int = 36, seed: int = 0) -> ActivationStore:
    return shifted_sources_store(path, SHIFT, n_per_source, seed)


def test_weighted_threshold_weighs_every_source_the_same():
    big, small = np.linspace(0, 0.5, 1000), np.linspace(0.5, 1.0, 10)
    t = weighted_threshold({"big": big, "small": small}, 0.25)
    # pooled, 1% of the rows come from `small`; weighted, a quarter of the benign weight is half of it
    assert (small >= t).mean() == pytest.approx(0.5) and (big >= t).mean() == 0.0
    assert weighted_threshold({"a": np.array([0.2, 0.2, 0.2])}, 0.5) > 0.2  # ties are never split
    assert weighted_threshold({"a": np.array([0.1, 0.9])}, 0.0) > 0.9
    with pytest.raises(LitSahsError, match="no benign rows"):
        weighted_threshold({"a": np.array([])}, 0.05)
    with pytest.raises(LitSahsError, match="NaN"):
        weighted_threshold({"a": np.array([0.1, np.nan])}, 0.05)


def test_crossfit_threshold_scores_each_source_with_a_fit_that_left_it_out(tmp_path):
    shifted_store(tmp_path / "s")
    folds = Folds(tmp_path / "s", ranking=None, heads=HEADS)
    cf = crossfit_threshold(folds, "logistic", {}, 2, target_fpr=0.05, max_epochs=3)
    assert set(cf.per_source) == set(SHIFT) and cf.folds[0] == "harm0__ben0"
    assert all(v["rows"] == 36 for v in cf.per_source.values())
    # equal weights: the mean over sources of each one's flagged share is the budget at most
    assert np.mean([v["fpr"] for v in cf.per_source.values()]) <= 0.05 + 1e-9
    assert cf.per_source["ben2"]["fpr"] > cf.per_source["ben0"]["fpr"]  # the shifted sources take the budget
    json.dumps(cf.metadata())
    with pytest.raises(LitSahsError, match="two harmful and two benign"):
        crossfit_threshold(folds, "logistic", {}, 2, Holdout(sources=("ben0", "ben1", "ben2")), max_epochs=1)


def test_crossfit_keeps_the_held_out_benign_fpr_within_its_target(tmp_path):
    """On the folds that hold out a shifted benign source the validation threshold (calibrated on the
    other sources' rows, mostly unshifted) flags far more than 5%; the cross-fitted one, which saw
    what leaving a source out does, flags fewer, while still catching most harmful prompts."""
    from lit_sahs.generalisation import format_source_tables, source_protocol

    shifted_store(tmp_path / "s")
    res = source_protocol(str(tmp_path / "s"), top_k=2, heads=HEADS, ranking=None, max_epochs=3, baselines=(),
                          progress=False, crossfit=True, target_fpr=0.05)
    shifted = [f["calibration"] for f in res["folds"] if f["holdout"][1] in ("ben2", "ben3")]
    assert len(shifted) == 2
    for c in shifted:
        assert c["threshold_crossfit"] > c["threshold_validation"] and c["fpr_crossfit"] < c["fpr_validation"]
    assert np.mean([c["fpr_validation"] for c in shifted]) > 0.1  # twice the target and more
    m = res["calibration"]
    assert m["fpr_crossfit"] <= 0.05 < m["fpr_validation"]  # the promise kept on average, and broken without it
    assert m["tpr_crossfit"] > 0.8
    assert "Threshold calibration of logistic" in format_source_tables(res)


def test_calibrate_command_rewrites_the_artifact_with_its_calibration(tmp_path, cli):
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.folds import fit_fold

    shifted_store(tmp_path / "s")
    folds = Folds(tmp_path / "s", ranking=None, heads=HEADS)
    det = fit_fold(folds, "logistic", {}, 2, max_epochs=3).detector
    path = save_detector(det, tmp_path / "det")
    before = float(det.threshold)
    code, out, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--relocate", "false",
                          "--max_epochs", "3"])
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    loaded = load_detector(path)
    assert float(loaded.threshold) == pytest.approx(summary["threshold"]) and summary["threshold"] != before
    assert loaded.calibration["method"] == "crossfit_sources" and set(loaded.calibration["per_source"]) == set(SHIFT)
    code, _, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "nosuch")])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:")


def test_a_fit_config_with_the_callback_ships_the_cross_fitted_threshold(tmp_path, cli, monkeypatch):
    """The callback runs after training, the held-out sources stay out of its inner fits, and the
    report and the exported artifact both use its threshold (not the best checkpoint's)."""
    import yaml

    from test_refusal_direction import residual_store

    from lit_sahs.artifact import load_detector
    from lit_sahs.refusal_direction import from_store

    monkeypatch.chdir(tmp_path)
    shifted_store(tmp_path / "s")
    direction = from_store(residual_store(tmp_path / "r")[0]).save(tmp_path / "d.safetensors")  # same target
    cfg = {
        "seed_everything": 0,
        "mlflow": {"experiment": "unit", "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"},
        "output_dir": str(tmp_path / "out"),
        "trainer": {"accelerator": "cpu", "max_epochs": 3, "enable_progress_bar": False, "logger": False,
                    "callbacks": [{"class_path": "lit_sahs.crossfit.CrossFitCalibration",
                                   "init_args": {"answer_tpr": 0.9, "answer_direction": str(direction)}},
                                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"monitor": "val/auroc", "mode": "max"}}]},
        "model": {"class_path": "lit_sahs.detectors.LogisticDetector"},
        "data": {"class_path": "lit_sahs.data.datamodules.CachedActivationDataModule",
                 "init_args": {"store": str(tmp_path / "s"), "heads": HEADS, "held_out": {"sources": ["harm2", "ben3"]}}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = cli(["fit", "--config", str(tmp_path / "fit.yaml")])
    assert code == 0, err[-2000:]
    assert "threshold cross-fitted over" in out
    meta = json.loads((tmp_path / "out" / "detector" / "detector.json").read_text())
    cal = meta["calibration"]
    assert cal["method"] == "crossfit_sources" and meta["threshold"] == pytest.approx(cal["threshold"])
    assert set(cal["per_source"]) == {"ben0", "ben1", "ben2"}  # ben3 is the report's, never the calibration's
    assert not any("harm2" in f or "ben3" in f for f in cal["folds"])
    answer = meta["answer"]  # the answer cut on the same out-of-source rows, shipped with the threshold
    assert sorted(answer["harmful"]) == ["harm0", "harm1"] and answer["kept"] >= 0.9 and answer["answer_tpr"] == 0.9
    assert "answer cut:" in out
    shipped, fitted = load_detector(tmp_path / "out" / "detector").answer_direction, from_store(tmp_path / "r")
    assert shipped.layer == fitted.layer and shipped.rows == fitted.rows == {"harmful": 32, "benign": 24}
    assert np.allclose(shipped.vector.numpy(), fitted.vector.numpy(), atol=1e-6)


def test_low_fpr_loss_ranks_harmful_prompts_above_the_top_benign_ones_only():
    import torch

    from lit_sahs.detectors.base import low_fpr_loss

    logits = torch.tensor([3.0, 1.0, -1.0, -2.0, 0.5, 2.0], requires_grad=True)
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    loss = low_fpr_loss(logits, y, 0.25)  # one benign prompt (of four) in the region: the 3.0
    expected = torch.nn.functional.softplus(torch.tensor([3.0 - 0.5, 3.0 - 2.0])).mean()
    assert float(loss) == pytest.approx(float(expected))
    loss.backward()
    assert logits.grad[0] > 0 and (logits.grad[1:4] == 0).all() and (logits.grad[4:] < 0).all()
    assert float(low_fpr_loss(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), 0.05)) == 0.0


def test_the_low_fpr_objective_is_a_hyper_parameter_that_travels_with_the_artifact(tmp_path):
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.folds import fit_fold

    shifted_store(tmp_path / "s")
    folds = Folds(tmp_path / "s", ranking=None, heads=HEADS)
    det = fit_fold(folds, "logistic", {"low_fpr_weight": 1.0, "low_fpr": 0.1}, 2, max_epochs=2).detector
    loaded = load_detector(save_detector(det, tmp_path / "det"))
    assert loaded.hparams.low_fpr_weight == 1.0 and loaded.hparams.low_fpr == 0.1
    with pytest.raises(LitSahsError, match="low_fpr"):
        LogisticDetector(low_fpr=0.0)
    with pytest.raises(LitSahsError, match="low_fpr_weight"):
        LogisticDetector(low_fpr_weight=-1.0)


def test_evaluate_command_reports_and_plots_both_thresholds(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shifted_store(tmp_path / "s")
    code, out, err = cli(["evaluate", "--store", str(tmp_path / "s"), "--protocol", "sources", "--heads", HEADS,
                          "--relocate", "false", "--max_epochs", "3", "--crossfit", "true", "--target_fpr", "0.05",
                          "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0, err[-2000:]
    result = json.loads((tmp_path / "s" / "sources" / "sources.json").read_text())
    assert set(result["calibration"]) == {"fpr_validation", "fpr_crossfit", "tpr_validation", "tpr_crossfit"}
    assert (tmp_path / "s" / "sources" / "sources_calibration.png").stat().st_size > 1000
    assert "benign FPR cross-fit" in (tmp_path / "s" / "sources" / "sources.md").read_text()


def test_val_sources_validate_on_collections_never_trained_on(tmp_path):
    """The threshold calibrated on a held-out validation source: on the shifted store it keeps the
    other shifted source's benign FPR down, where a random validation split does not."""
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.data.protocol import split_rows
    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.engine import Engine

    shifted_store(tmp_path / "s")
    index = ActivationStore.open(tmp_path / "s").index()
    split = split_rows(index, held_out_sources=["harm2", "ben3"], val_sources=["harm1", "ben2"])
    src = np.array([r["source"] for r in index])
    assert set(src[split["val"]]) == {"harm1", "ben2"} and set(src[split["train"]]) == {"harm0", "ben0", "ben1"}
    with pytest.raises(LitSahsError, match="both held out"):
        split_rows(index, held_out_sources=["ben2"], val_sources=["ben2", "harm1"])
    with pytest.raises(LitSahsError, match="nosuch"):
        split_rows(index, val_sources=["nosuch"])
    with pytest.raises(LitSahsError, match="only benign"):
        split_rows(index, val_sources=["ben2"])

    fpr = {}
    for name, val in (("random", []), ("sources", ["harm1", "ben2"])):
        dm = CachedActivationDataModule(str(tmp_path / "s"), heads=HEADS, held_out=Holdout(sources=["harm2", "ben3"]),
                                        val_sources=val)
        det = Engine(validate_once=True, max_epochs=3).fit(LogisticDetector(target_fpr=0.05), dm).detector
        test = dm.split_rows("test")
        from lit_sahs.folds import FoldFit

        s = np.asarray(FoldFit(det, dm).scores("test"))
        benign = np.array([r["label"] == 0 for r in test])
        fpr[name] = float((s[benign] >= float(det.threshold)).mean())
    assert fpr["sources"] <= 0.05 < fpr["random"], fpr


def test_the_callback_keeps_validation_sources_out_of_its_inner_fits(tmp_path):
    """val_sources are never trained on by the fit; the cross-fit's inner fits do not train on them either,
    and neither the threshold nor the answer cut is placed on their rows."""
    from lit_sahs.crossfit import CrossFitCalibration
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.engine import Engine

    shifted_store(tmp_path / "s")
    dm = CachedActivationDataModule(str(tmp_path / "s"), heads=HEADS, val_sources=["harm2", "ben3"])
    callback = CrossFitCalibration(answer_tpr=0.9)
    det = Engine(validate_once=True, max_epochs=3, callbacks=[callback]).fit(LogisticDetector(), dm).detector
    assert set(det.calibration["per_source"]) == {"ben0", "ben1", "ben2"}
    assert not any(name in fold for fold in det.calibration["folds"] for name in ("harm2", "ben3"))
    assert sorted(det.answer["harmful"]) == ["harm0", "harm1"] and sorted(det.answer["benign"]) == ["ben0", "ben1", "ben2"]
