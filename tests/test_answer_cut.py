"""The answer side's cut (lit_sahs.answer_cut): placed on harmful scores of unseen sources, shipped in the
artifact with its refusal direction, and used by the guards unless a user overrides it or turns it off."""
import json

import numpy as np
import pytest
import torch

from lit_sahs.errors import LitSahsError


def test_the_cut_keeps_the_share_of_harmful_rows_with_sources_weighing_the_same():
    from lit_sahs.answer_cut import fit_answer_cut

    one = fit_answer_cut({"a": np.arange(1, 11) / 10}, 0.9, {"b": [0.05, 0.12, 0.5, 0.9]})
    # one of ten may fall below: the cut sits halfway between 0.1 and 0.2
    assert one["answer_below"] == pytest.approx(0.15) and one["kept"] == pytest.approx(0.9)
    assert one["benign"]["b"] == {"rows": 4, "answered": 0.5} and one["answered"] == 0.5
    # a small source weighs as much as a large one: 10% of its weight is one of its 10 rows, not 10 of 100
    rec = fit_answer_cut({"small": np.linspace(0.01, 0.1, 10), "large": np.linspace(0.5, 1.0, 100)}, 0.95)
    assert 0.01 < rec["answer_below"] <= 0.02  # only the small source's lowest row falls below
    assert rec["harmful"]["small"]["kept"] == pytest.approx(0.9) and rec["harmful"]["large"]["kept"] == 1.0
    assert rec["kept"] == pytest.approx(0.95)
    with pytest.raises(LitSahsError, match="no harmful rows"):
        fit_answer_cut({"a": []}, 0.9)
    with pytest.raises(LitSahsError, match="--answer_tpr must be a probability"):
        fit_answer_cut({"a": [0.5]}, 1.5)


@pytest.fixture()
def flagging(smollm2):
    from test_guard import CHOSEN, FLAGS, HEADS, fit_flagging_detector

    return fit_flagging_detector(smollm2, [p for p, _ in CHOSEN], FLAGS, HEADS)


def test_the_artifact_ships_the_cut_and_direction_and_the_guard_uses_them(smollm2, flagging, tmp_path):
    """Saved and loaded, the record and the direction come back equal; a guard given nothing acts as one
    given them explicitly; "off" turns either off; a direction for another target is refused at load."""
    from test_guard import CHOSEN
    from test_refusal_direction import unit

    from lit_sahs.answer_cut import DIRECTION_TENSOR, fit_answer_cut
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.detectors.guard import SafetyGuard

    prompts = [CHOSEN[1][0], CHOSEN[4][0], CHOSEN[5][0]]
    d = unit(smollm2, seed=1)
    flagging.answer = fit_answer_cut({"h": [1.0, 1.0]}, 1.0)
    assert flagging.answer["answer_below"] == pytest.approx(0.5)  # every row kept: halfway to 0
    flagging.answer_direction = d
    loaded = load_detector(save_detector(flagging, tmp_path / "det"))
    assert loaded.answer == flagging.answer and loaded.answer_direction.layer == 3
    assert torch.allclose(loaded.answer_direction.vector, d.vector) and loaded.answer_direction.fingerprint == d.fingerprint
    explicit = SafetyGuard(smollm2, flagging, threshold=1.01, answer_below=0.5, answer_direction=d)
    stored = SafetyGuard(smollm2, loaded, threshold=1.01)
    a, b = (g.generate(prompts, max_new_tokens=5) for g in (explicit, stored))
    assert b.answered == a.answered == [True, True, False] and torch.equal(a.sequences, b.sequences)
    nudge_only = SafetyGuard(smollm2, loaded, threshold=1.01, answer_direction="off")
    assert nudge_only.answer_below == pytest.approx(0.5) and nudge_only.answer_direction is None
    plain = SafetyGuard(smollm2, loaded, threshold=1.01, answer_below="off").generate(prompts, max_new_tokens=5)
    assert plain.answered is None
    # the direction lies beside the family's tensors, which its loader read without it
    from safetensors import safe_open

    with safe_open(str(tmp_path / "det" / "detector.safetensors"), "pt") as f:
        assert DIRECTION_TENSOR in f.keys()
    assert DIRECTION_TENSOR not in loaded.artifact_tensors()
    with pytest.raises(LitSahsError, match="turns the answer side off"):
        SafetyGuard(smollm2, loaded, answer_below="off", answer_direction=d)
    # a direction fitted on another target, smuggled into the artifact
    meta_path = tmp_path / "det" / "detector.json"
    meta = json.loads(meta_path.read_text())
    meta["answer"]["direction"]["fingerprint"]["weights_hash"] = "sha256:" + "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LitSahsError, match="answer-side refusal direction was made for target"):
        load_detector(tmp_path / "det")


@pytest.mark.parametrize("change, match", [
    (lambda m: m["answer"].update(answer_below="high"), "answer-side calibration is corrupt"),
    (lambda m: m["answer"].pop("direction"), "half there"),
    (lambda m: m["answer"].update(answer_tpr=2), "answer-side calibration is corrupt"),
])
def test_a_crafted_answer_record_is_one_error_line(smollm2, flagging, tmp_path, cli, change, match):
    from test_refusal_direction import unit

    from lit_sahs.answer_cut import fit_answer_cut
    from lit_sahs.artifact import save_detector

    flagging.answer, flagging.answer_direction = fit_answer_cut({"h": [0.5, 0.9]}, 1.0), unit(smollm2)
    path = save_detector(flagging, tmp_path / "det")
    meta = json.loads((path / "detector.json").read_text())
    change(meta)
    (path / "detector.json").write_text(json.dumps(meta))
    code, _, err = cli(["guard", "--detector", str(path), "--prompt", "hi", "--max_new_tokens", "1"])
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and match in lines[0], err


def test_calibrate_places_the_cut_on_cross_fitted_harmful_scores_and_keeps_it(tmp_path, cli):
    from test_judge_cut import HEADS, judge_store

    from lit_sahs.answer_cut import fit_answer_cut
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.crossfit import crossfit_detector
    from lit_sahs.folds import Folds, fit_fold

    judge_store(tmp_path / "s", with_judge=False)
    det = fit_fold(Folds(tmp_path / "s", ranking=None, heads=HEADS), "logistic", {}, 2, max_epochs=3).detector
    path = save_detector(det, tmp_path / "det")
    code, out, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--relocate", "false",
                          "--max_epochs", "3", "--answer_tpr", "0.8"])
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    loaded = load_detector(path)
    # the same cross-fit, repeated: the cut is the one its harmful scores give
    cf = crossfit_detector(load_detector(path), Folds(tmp_path / "s", ranking=None, heads=HEADS), max_epochs=3)
    want = fit_answer_cut(cf.harmful, 0.8, {s: v for s, (_, v) in cf.benign.items()})
    assert sorted(cf.harmful) == ["harm0", "harm1", "harm2"]
    assert loaded.answer == want and summary["answer"]["answer_below"] == want["answer_below"]
    assert want["kept"] >= 0.8 and loaded.answer["method"] == "crossfit_sources"
    # recalibrating the threshold alone keeps the cut (it depends on harmful scores only)
    code, _, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--relocate", "false",
                        "--max_epochs", "3", "--target_fpr", "0.1"])
    assert code == 0 and load_detector(path).answer == want, err


@pytest.mark.parametrize("args, message", [
    ([], "nothing to calibrate"),
    (["--answer_sources", "future_tense"], "give --answer_tpr too"),
    (["--answer_tpr", "0.9"], "give --store (cross-fitted) or --answer_sources"),
    (["--answer_tpr", "0"], "must be above 0"),
    (["--judge_band", "0.2,0.8", "--answer_tpr", "0.9", "--answer_sources", "future_tense"], "give --store"),
    (["--answer_tpr", "0.9", "--answer_sources", "future_tense", "--answer_attacks", "plain,nosuch"],
     "unknown attack 'nosuch'"),
    (["--answer_tpr", "0.9", "--answer_sources", "future_tense", "--held_out_families", "dan"], "give --store"),
    (["--answer_tpr", "0.9", "--answer_sources", "future_tense", "--answer_direction", "from_store"], "give --store"),
])
def test_calibrate_refuses_a_plan_it_cannot_carry_out_before_loading(tmp_path, cli, args, message):
    code, _, err = cli(["calibrate", "--detector", str(tmp_path / "missing"), *args])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and message in err


def test_calibrate_refuses_a_direction_of_another_target_and_one_without_a_cut(smollm2, flagging, tmp_path, cli):
    from test_refusal_direction import residual_store, unit

    from lit_sahs.artifact import save_detector
    from lit_sahs.refusal_direction import from_store

    path = save_detector(flagging, tmp_path / "det")
    before = (path / "detector.safetensors").read_bytes()
    other = from_store(residual_store(tmp_path / "s")[0]).save(tmp_path / "other.safetensors")
    code, _, err = cli(["calibrate", "--detector", str(path), "--answer_direction", str(other)])
    assert code == 2 and "--answer_direction was made for target 'synthetic-target'" in err.strip().splitlines()[-1]
    mine = unit(smollm2).save(tmp_path / "mine.safetensors")
    code, _, err = cli(["calibrate", "--detector", str(path), "--answer_direction", str(mine)])
    assert code == 2 and "calibrate with --answer_tpr too" in err.strip().splitlines()[-1]
    assert (path / "detector.safetensors").read_bytes() == before  # nothing half-written


def test_calibrate_leaves_held_out_sources_out_of_every_fold(tmp_path, cli):
    from test_judge_cut import HEADS, judge_store

    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.folds import Folds, fit_fold

    judge_store(tmp_path / "s", with_judge=False)
    det = fit_fold(Folds(tmp_path / "s", ranking=None, heads=HEADS), "logistic", {}, 2, max_epochs=3).detector
    path = save_detector(det, tmp_path / "det")
    base = ["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--relocate", "false",
            "--max_epochs", "3", "--answer_tpr", "0.8"]
    code, out, err = cli(base + ["--held_out_sources", "harm2,ben3"])
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    answer = load_detector(path).answer
    assert sorted(answer["harmful"]) == ["harm0", "harm1"] and sorted(answer["benign"]) == ["ben0", "ben1", "ben2"]
    assert "ben3" not in summary["per_source"] and all("harm2" not in f for f in summary["folds"])
    before = (path / "detector.json").read_text()
    code, _, err = cli(base + ["--held_out_sources", "harm9"])
    assert code == 2 and "held-out source 'harm9' has no rows" in err.strip().splitlines()[-1]
    assert (path / "detector.json").read_text() == before


def test_the_source_protocol_checks_the_cut_on_each_held_out_pair(tmp_path, cli, monkeypatch):
    """evaluate --crossfit --answer_tpr: each fold's cut is the one its own cross-fit gives, and the shares
    it reports are those of the fold's held-out harmful and benign prompts on either side of it."""
    from test_crossfit import HEADS, shifted_store

    from lit_sahs.answer_cut import fit_answer_cut
    from lit_sahs.crossfit import crossfit_threshold
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.folds import Folds, fit_fold

    monkeypatch.chdir(tmp_path)
    shifted_store(tmp_path / "s")
    base = ["evaluate", "--store", str(tmp_path / "s"), "--protocol", "sources", "--heads", HEADS, "--relocate", "false",
            "--max_epochs", "3", "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--answer_tpr", "0.9"]
    code, _, err = cli(base)
    assert code == 2 and "--answer_tpr is measured with --protocol sources --crossfit true" in err
    code, _, err = cli(base + ["--crossfit", "true"])
    assert code == 0, err[-2000:]
    result = json.loads((tmp_path / "s" / "sources" / "sources.json").read_text())
    fold = result["folds"][0]
    folds = Folds(tmp_path / "s", ranking=None, heads=HEADS)
    hold = Holdout(sources=fold["holdout"])
    fit = fit_fold(folds, "logistic", None, 2, hold, max_epochs=3)
    cf = crossfit_threshold(folds, "logistic", None, 2, hold, max_epochs=3)
    cut = fit_answer_cut(cf.harmful, 0.9, {s: v for s, (_, v) in cf.benign.items()})["answer_below"]
    scores = np.asarray(fit.scores("test"))
    labels = np.array([r["label"] for r in fit.datamodule.split_rows("test")])
    c = fold["calibration"]
    assert c["answer_below"] == pytest.approx(cut)
    assert c["answer_kept"] == pytest.approx(float((scores[labels == 1] >= cut).mean()))
    assert c["answer_answered"] == pytest.approx(float((scores[labels == 0] < cut).mean()))
    assert result["calibration"]["answer_kept"] == pytest.approx(np.mean([f["calibration"]["answer_kept"]
                                                                          for f in result["folds"]]))
    assert "harmful kept" in (tmp_path / "s" / "sources" / "sources.md").read_text()


def test_a_direction_from_the_store_is_the_one_picked_by_effect_on_its_kept_rows(smollm2, flagging, tmp_path):
    """``from_store``: the recipe needs no direction file; what it ships is ``select_layer``'s pick on the
    store's rows outside the held-out ones, the target loaded from the detector's fingerprint."""
    from test_refusal_direction import residual_store, smollm2_store

    from lit_sahs.answer_cut import shipped_direction
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.refusal_direction import select_layer

    store = smollm2_store(smollm2, tmp_path / "s", real_layer=12, noise_layer=4)
    got = shipped_direction("from_store", flagging, store, Holdout(), "cpu")
    want = select_layer(smollm2, store)
    assert got.layer == want.layer and got.rows == want.rows == {"harmful": 6, "benign": 6}
    assert torch.allclose(got.vector, want.vector) and got.selection == pytest.approx(want.selection, rel=1e-4)
    with pytest.raises(LitSahsError, match="give the store"):
        shipped_direction("from_store", flagging, None)
    with pytest.raises(LitSahsError, match="made for target 'synthetic-target'"):  # before the target loads
        shipped_direction("from_store", flagging, residual_store(tmp_path / "other")[0])


# ---------------------------------------------------------------- the live cut inside a fit (LiveAnswerCut)

def test_the_live_cut_refuses_a_source_the_fit_trains_on_before_training(tmp_path):
    """Its promise is about prompts of sources the detector never read: a trained-on source ends the fit
    at its start, with nothing fitted."""
    from test_crossfit import HEADS, shifted_store

    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.engine import Engine
    from lit_sahs.live_answer_cut import LiveAnswerCut

    shifted_store(tmp_path / "s")
    dm = CachedActivationDataModule(str(tmp_path / "s"), heads=HEADS, val_sources=["harm2", "ben3"])
    import lightning as L

    class Steps(L.Callback):
        n = 0

        def on_train_batch_start(self, *args):
            Steps.n += 1

    det = LogisticDetector()
    with pytest.raises(LitSahsError, match="this fit trains on harm0"):
        Engine(validate_once=True, max_epochs=3, callbacks=[LiveAnswerCut(0.9, ["harm0", "harm2"]), Steps()]).fit(det, dm)
    assert Steps.n == 0  # not one training step
    # the validation-only sources are never trained on: the check lets them through; a missing direction is
    # refused at the same point, not after training; a debugging run (fast_dev_run) places no cut and checks nothing
    trainer = type("T", (), {"datamodule": dm, "fast_dev_run": False})()
    LiveAnswerCut(0.9, ["harm2", "ben3"]).on_fit_start(trainer, det)
    with pytest.raises(LitSahsError, match="answer_direction missing.safetensors does not exist"):
        LiveAnswerCut(0.9, ["harm2"], answer_direction="missing.safetensors").on_fit_start(trainer, det)
    trainer.fast_dev_run = True
    LiveAnswerCut(0.9, ["harm0"], answer_direction="missing.safetensors").on_fit_start(trainer, det)


@pytest.mark.parametrize("kwargs, match", [
    ({"sources": []}, "needs the sources"),
    ({"attacks": ["plain", "nosuch"]}, "unknown attack 'nosuch'"),
    ({"answer_tpr": 0}, "must be above 0"),
    ({"limit": 0}, "limit must be >= 1"),
])
def test_the_live_cut_refuses_bad_settings_when_built(kwargs, match):
    from lit_sahs.live_answer_cut import LiveAnswerCut

    with pytest.raises(LitSahsError, match=match):
        LiveAnswerCut(**{"answer_tpr": 0.9, "sources": ["future_tense"], **kwargs})


def test_a_direction_is_read_from_a_file_or_a_detector_that_ships_one(smollm2, flagging, tmp_path):
    from test_refusal_direction import unit

    from lit_sahs.artifact import save_detector
    from lit_sahs.live_answer_cut import direction_of

    bare = save_detector(flagging, tmp_path / "bare")
    with pytest.raises(LitSahsError, match="ships no refusal direction"):
        direction_of(str(bare), flagging)
    d = unit(smollm2, seed=2)
    flagging.answer, flagging.answer_direction = {"method": "crossfit_sources", "answer_tpr": 0.9, "answer_below": 0.2}, d
    shipped = save_detector(flagging, tmp_path / "shipped")
    for spec in (str(shipped), str(d.save(tmp_path / "d.safetensors"))):
        got = direction_of(spec, flagging)
        assert got.layer == d.layer and torch.allclose(got.vector, d.vector)
