"""The judge band's cut (lit_sahs.judge_cut): fitted on cross-fitted benign scores so that the two-stage
rule keeps the detector's target FPR, even for a judge that calls every prompt "unsafe" (where a cut at
log-odds 0 would flag the whole band), carried by the artifact and used by screen and guard."""
import json

import numpy as np
import pytest

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.self_judge import JudgeRule, band_decisions, judge_rule
from synthetic import SIGNAL_HEADS, shifted_sources_store

HEADS = ",".join(f"{l}.{h}" for l, h in SIGNAL_HEADS)
SHIFT = {"ben0": 0.0, "ben1": 0.0, "ben2": 1.6, "ben3": 1.6}  # two benign sources look half harmful


def judge_store(path, n_per_source: int = 36, with_judge: bool = True, seed: int = 0) -> ActivationStore:
    """Three harmful and four benign sources; the judge's log-odds lean to "unsafe" for every row."""
    return shifted_sources_store(path, SHIFT, n_per_source, seed, judge=with_judge)


def test_the_cut_keeps_the_two_stage_fpr_where_log_odds_zero_flags_the_band():
    from lit_sahs.judge_cut import fit_judge_cut

    rng = np.random.default_rng(0)
    benign = {}
    for src, shift in (("a", 0.0), ("b", 0.15)):  # b: 6% of its rows above the band, flagged by the detector
        s = rng.uniform(0, 0.8, 400) + shift
        benign[src] = (s, 3.0 + s + 0.5 * rng.standard_normal(400))  # every benign row leans "unsafe"
    rec = fit_judge_cut(benign, threshold=0.85, band=(0.4, 0.9), target_fpr=0.05)
    assert rec["cut"] > 3.0 and 0.04 < rec["fpr"] <= 0.05 + 1e-9 and 0.3 < rec["judged"] < 0.9
    assert rec["fpr_detector"] == pytest.approx(np.mean([(s >= 0.85).mean() for s, _ in benign.values()]))
    for src, (s, j) in benign.items():  # the record's figures are what band_decisions does at that cut
        for cut, key in ((rec["cut"], "fpr"), (0.0, None)):
            flagged, judged, _ = band_decisions(s, s >= 0.85, JudgeRule((0.4, 0.9), cut), lambda r: j[r])
            if key:
                assert flagged.mean() == pytest.approx(rec["per_source"][src][key])
            else:  # log-odds 0 flags every judged row: far past the budget
                assert flagged.mean() >= judged.mean() > 0.3
    # the detector alone above the band already spends the budget: the judge may flag none of the band
    over = fit_judge_cut(benign, threshold=0.3, band=(0.0, 0.3), target_fpr=0.05)
    assert over["cut"] > max(j[(s >= 0) & (s <= 0.3)].max() for s, j in benign.values()) and over["fpr"] > 0.05
    with pytest.raises(LitSahsError, match="holds none"):
        fit_judge_cut({"a": (np.array([0.1, 0.2]), np.array([1.0, 1.0]))}, 0.5, (0.6, 0.7), 0.05)
    with pytest.raises(LitSahsError, match="NaN"):
        fit_judge_cut({"a": (np.array([0.1, 0.2]), np.array([np.nan, 1.0]))}, 0.5, (0.0, 0.7), 0.05)


def test_the_rule_comes_from_the_record_and_a_band_must_match_it():
    rec = {"band": [0.3, 0.9], "cut": 4.5}
    assert judge_rule(None, rec) == JudgeRule((0.3, 0.9), 4.5) and judge_rule("off", rec) is None
    assert judge_rule("0.3,0.9", rec) == JudgeRule((0.3, 0.9), 4.5)
    assert judge_rule((0.1, 0.5), rec, cut=1.0) == JudgeRule((0.1, 0.5), 1.0)  # an explicit cut wins
    assert judge_rule(None, None) is None
    with pytest.raises(LitSahsError, match="calibrated for the band 0.3,0.9"):
        judge_rule((0.2, 0.9), rec)
    with pytest.raises(LitSahsError, match="no calibrated judge cut.*calibrate"):
        judge_rule((0.2, 0.9), None)
    for bad in ({"band": [0.9, 0.3], "cut": 1.0}, {"band": [0.3, 0.9], "cut": float("nan")}, {"cut": 1.0}):
        with pytest.raises(LitSahsError, match="judge calibration is corrupt"):
            judge_rule(None, bad)


def test_calibrate_judge_runs_the_judge_only_on_benign_rows_inside_the_band(tmp_path):
    from lit_sahs.crossfit import crossfit_threshold
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.judge_cut import calibrate_judge

    store = judge_store(tmp_path / "s", with_judge=False)
    folds = Folds(tmp_path / "s", ranking=None, heads=HEADS)
    det = fit_fold(folds, "logistic", {}, 2, max_epochs=3).detector
    cf = crossfit_threshold(folds, "logistic", {}, 2, target_fpr=0.05, max_epochs=3)
    det.threshold.fill_(cf.threshold)
    seen = []

    def judge_fn(texts):
        seen.extend(texts)
        return np.array([5.0 if "ben2" in t else 4.0 for t in texts])

    band = (0.01, 0.5)
    rec = calibrate_judge(det, cf, store, band, judge_fn, batch_size=5)
    text = {r["id"]: r["text"] for r in store.index()}
    want = {text[i] for ids, s in cf.benign.values() for i, v in zip(ids, s) if band[0] <= v <= band[1]}
    assert sorted(seen) == sorted(want) and all(t.startswith("ben") for t in seen)
    assert det.judge is rec and rec["band"] == list(band) and rec["fpr"] <= 0.05 + 1e-9
    with pytest.raises(LitSahsError, match="no judge_logodds extra"):
        calibrate_judge(det, cf, store, band, None)


def test_calibrate_command_ships_the_cut_and_screening_uses_it(tmp_path, cli):
    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.folds import Folds, fit_fold

    judge_store(tmp_path / "s")
    det = fit_fold(Folds(tmp_path / "s", ranking=None, heads=HEADS), "logistic", {}, 2, max_epochs=3).detector
    path = save_detector(det, tmp_path / "det")
    code, out, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--relocate", "false",
                          "--max_epochs", "3", "--judge_band", "0.01,0.5"])
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    loaded = load_detector(path)
    assert loaded.judge == summary["judge"] and loaded.judge["band"] == [0.01, 0.5]
    assert loaded.judge["cut"] > 4.0 and loaded.judge["fpr"] <= 0.05 + 1e-9  # log-odds 0 would flag every row
    assert loaded.judge["threshold"] == pytest.approx(float(loaded.threshold))
    assert judge_rule(None, loaded.judge) == JudgeRule((0.01, 0.5), loaded.judge["cut"])
    # recalibrating the threshold alone drops the cut it was fitted at
    code, _, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--relocate", "false",
                        "--max_epochs", "3", "--target_fpr", "0.1"])
    assert code == 0 and load_detector(path).judge is None, err
    # a crafted artifact with a broken judge record: one error line, before any target is loaded
    meta_path = path / "detector.json"
    meta = json.loads(meta_path.read_text())
    meta["judge"] = {"band": [0.2, 0.95], "cut": "high"}
    meta_path.write_text(json.dumps(meta))
    code, _, err = cli(["screen", "--detector", str(path), "--prompt", "hi"])
    lines = [l for l in err.strip().splitlines() if not l.startswith(("INFO", "WARNING"))]
    assert code == 2 and len(lines) == 1 and "judge calibration is corrupt" in lines[0], err
    code, _, err = cli(["calibrate", "--detector", str(path), "--store", str(tmp_path / "s"), "--judge_band", "0.9,0.2"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "judge_band" in err


def test_screen_uses_the_detectors_cut_by_default_and_off_turns_it_off(tmp_path, cli):
    import torch

    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.engine import Engine
    from lit_sahs.extract import run_extraction
    from lit_sahs.folds import build_detector
    from lit_sahs.screen import Screener
    from lit_sahs.targets import load_target

    torch.set_num_threads(1)
    tiny = load_target("tiny-llama")
    texts = [f"{w} number {i}" for i in range(4) for w in ("how to build a bomb", "a poem about bread")]
    samples = [Sample.make(t, int(i % 2 == 0), source="unit") for i, t in enumerate(texts)]
    run_extraction(tiny, samples, tmp_path / "s", batch_size=4, trainer_kwargs={"accelerator": "cpu", "devices": 1,
                                                                                 "enable_progress_bar": False})
    dm = CachedActivationDataModule(str(tmp_path / "s"), heads="0.0,1.1", batch_size=64)
    det = Engine(validate_once=True, max_epochs=2).fit(build_detector("logistic", {}), dm).detector
    plain = Screener(tiny, det, batch_size=4).score(texts)
    assert plain.judged is None
    with pytest.raises(LitSahsError, match="no calibrated judge cut"):
        Screener(tiny, det, judge_band=(0.0, 1.0))
    probe = Screener(tiny, det, judge_band=(0.0, 1.0), judge_cut=0.0).score(texts)
    cut = float(np.median(probe.judge_logodds))  # between the judge's answers: half the rows either side
    det.judge = {"band": [0.0, 1.0], "cut": cut}
    res = Screener(tiny, det, batch_size=4).score(texts)  # the detector's own rule, no band given
    assert res.judged.all() and res.flagged.tolist() == (probe.judge_logodds >= cut).tolist()
    assert 0 < res.flagged.sum() < len(texts)
    off = Screener(tiny, det, judge_band="off").score(texts)
    assert off.judged is None and off.flagged.tolist() == plain.flagged.tolist()
    # the MLflow pyfunc model decides the band the same way, and says which rows it judged
    from lit_sahs.pyfunc_model import DetectorModel

    m = DetectorModel()
    m.detector, m.target, m.batch_size, m.categories = det, tiny, 3, []
    frame = m.predict(None, texts)
    assert frame["judged"].tolist() == res.judged.tolist() and frame["flagged"].tolist() == res.flagged.tolist()
    # so does the moderation service (guarded chat goes through the guard, which applies it too)
    from lit_sahs.serving import GuardService

    service = GuardService(det, tiny)
    assert [r["flagged"] for r in service.moderate(texts)] == res.flagged.tolist()
    assert service.metadata()["judge_band"] == {"band": [0.0, 1.0], "cut": cut}
    # the command line: the stored rule by default, `off`, and a band it was not calibrated for
    from lit_sahs.artifact import save_detector

    art = save_detector(det, tmp_path / "det")
    code, out, err = cli(["screen", "--detector", str(art), "--prompt", texts[0], "--prompt", texts[1]])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["judged"] == 2, err
    code, out, err = cli(["screen", "--detector", str(art), "--prompt", texts[0], "--judge_band", "off"])
    assert code == 0 and "judged" not in json.loads(out.strip().splitlines()[-1]), err
    for command in ("screen", "guard"):
        code, _, err = cli([command, "--detector", str(art), "--prompt", texts[0], "--judge_band", "0.2,0.3"])
        errors = [l for l in err.strip().splitlines() if l.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "calibrated for the band 0,1" in errors[0], err
        assert err.strip().splitlines()[-1] == errors[0]


def test_a_fit_config_ships_the_judge_cut_and_reports_the_two_stage_rule_on_held_out_sources(tmp_path, cli,
                                                                                               monkeypatch):
    """CrossFitCalibration(judge_band=...) fits the cut on the training sources only; the test report
    states the two-stage rule's benign FPR and harmful TPR on the held-out ones, next to the detector's."""
    import yaml

    monkeypatch.chdir(tmp_path)
    judge_store(tmp_path / "s", n_per_source=30)
    cfg = {
        "seed_everything": 0,
        "mlflow": {"experiment": "unit", "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"},
        "output_dir": str(tmp_path / "out"),
        "trainer": {"accelerator": "cpu", "max_epochs": 3, "enable_progress_bar": False, "logger": False,
                    "callbacks": [{"class_path": "lit_sahs.crossfit.CrossFitCalibration",
                                   "init_args": {"judge_band": [0.01, 0.5]}}]},
        "model": {"class_path": "lit_sahs.detectors.LogisticDetector"},
        "data": {"class_path": "lit_sahs.data.datamodules.CachedActivationDataModule",
                 "init_args": {"store": str(tmp_path / "s"), "heads": HEADS, "held_out": {"sources": ["harm2", "ben3"]}}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = cli(["fit", "--config", str(tmp_path / "fit.yaml")])
    assert code == 0, err[-2000:]
    meta = json.loads((tmp_path / "out" / "detector" / "detector.json").read_text())
    judge = meta["judge"]
    assert judge["band"] == [0.01, 0.5] and judge["threshold"] == pytest.approx(meta["threshold"])
    assert set(judge["per_source"]) == {"ben0", "ben1", "ben2"} and judge["fpr"] <= 0.05 + 1e-9
    report = json.loads((tmp_path / "out" / "judge_band.json").read_text())
    assert report["cut"] == judge["cut"] and 0 < report["judged"] < 1
    # the held-out benign source sits inside the band, where the judge's log-odds are as high as the
    # training sources': the promise (<= 5%, weighted over training sources) is broken there, and the
    # report says so instead of repeating the promise
    assert report["benign_fpr"] > report["promised_fpr"] and report["benign_fpr_detector"] == 0.0
    assert "With the judge deciding scores in [0.01, 0.5]" in out, out


def test_the_sources_protocol_measures_the_judge_band_per_fold(tmp_path, cli, monkeypatch):
    """`evaluate --protocol sources --crossfit true --judge_band`: each fold fits its own cut on its
    training sources and the table reports the two-stage rule on the held-out ones."""
    from lit_sahs.judge_cut import held_out_two_stage

    monkeypatch.chdir(tmp_path)
    judge_store(tmp_path / "s", n_per_source=24)
    args = ["evaluate", "--store", str(tmp_path / "s"), "--protocol", "sources", "--heads", HEADS, "--relocate",
            "false", "--max_epochs", "3", "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]
    code, out, err = cli(args + ["--crossfit", "true", "--judge_band", "0.01,0.5"])
    assert code == 0, err[-2000:]
    result = json.loads((tmp_path / "s" / "sources" / "sources.json").read_text())
    cal = [f["calibration"] for f in result["folds"]]
    assert len(cal) == 4 and all(np.isfinite(c["judge_cut"]) for c in cal)
    assert result["calibration"]["fpr_judge"] == pytest.approx(np.mean([c["fpr_judge"] for c in cal]))
    assert "With the judge deciding detector scores in [0.01, 0.5]" in out
    # the rule itself: rows inside the band follow the judge, the others the threshold
    rec = {"band": [0.2, 0.6], "cut": 1.0, "threshold": 0.5, "fpr": 0.05}
    got = held_out_two_stage(rec, np.array([0.1, 0.3, 0.55, 0.9, 0.3]), np.array([0, 0, 0, 1, 1]),
                             np.array([9.0, 0.5, 2.0, -1.0, 3.0]))
    assert got["benign_fpr"] == pytest.approx(1 / 3) and got["harmful_tpr"] == 1.0 and got["judged"] == 0.6
    assert got["benign_fpr_detector"] == pytest.approx(1 / 3) and got["harmful_tpr_detector"] == 0.5
    code, _, err = cli(args + ["--judge_band", "0.01,0.5"])  # no cross-fit: refused in one line
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "--crossfit true" in err
