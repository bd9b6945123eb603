"""The engine: a fit from Python writes what the CLI writes; modules import alone, without cycles."""
import json
import pkgutil
import subprocess
import sys

import pytest

import lit_sahs
from lit_sahs.data.datamodules import CachedActivationDataModule
from lit_sahs.detectors import LogisticDetector, MLPDetector, SparseHeadDetector
from lit_sahs.artifact import load_detector
from lit_sahs.engine import Engine, family_defaults
from synthetic import SIGNAL_HEADS, make_store


def test_engine_fit_from_python_writes_report_and_artifact(tmp_path):
    make_store(tmp_path / "store")
    dm = CachedActivationDataModule(tmp_path / "store", heads="2.1,3.0", held_out_families=["pliny"], batch_size=64)
    result = Engine(output_dir=tmp_path / "out", baselines=["tfidf"], max_epochs=5).fit(LogisticDetector(l2=1e-3), dm)
    out = tmp_path / "out"
    for name in ("report.md", "report.json", "benign_fpr.json", "roc.png", "detector"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(result.reports, default=float))
    assert set(report) == {"heads", "tfidf"} and set(report["heads"]) == {"overall", "pliny"}
    assert report["heads"]["overall"]["auroc"] > 0.95  # the planted heads separate the held-out family
    exported = load_detector(out / "detector")
    assert [tuple(h) for h in exported.head_set] == list(SIGNAL_HEADS)
    assert float(exported.threshold) == pytest.approx(float(result.detector.threshold))
    assert result.paths["detector"] == out / "detector"


def test_family_trainer_defaults_and_caller_overrides():
    assert family_defaults(LogisticDetector)["max_epochs"] == 5
    assert family_defaults(MLPDetector)["max_epochs"] == 40
    assert family_defaults(SparseHeadDetector)["max_epochs"] == 5
    engine = Engine(validate_once=True)
    assert engine.trainer_settings(MLPDetector)["check_val_every_n_epoch"] == 40
    assert Engine(max_epochs=3).trainer_settings(MLPDetector)["max_epochs"] == 3  # the caller wins
    # an unset caller value (None, as fit_fold passes) keeps the family's default, not Lightning's 1000
    assert Engine(validate_once=True, max_epochs=None).trainer_settings(SparseHeadDetector)["max_epochs"] == 5
    assert Engine(max_epochs=None).trainer(SparseHeadDetector).max_epochs == 5


def _module_imports() -> dict[str, set[str]]:
    """lit_sahs module -> the lit_sahs modules it imports at load time (module level, outside functions)."""
    import ast
    from pathlib import Path

    root = Path(lit_sahs.__file__).parent
    mods = {m.name: Path(m.module_finder.path) / (m.name.rsplit(".", 1)[-1] + ("/__init__.py" if m.ispkg else ".py"))
            for m in pkgutil.walk_packages(lit_sahs.__path__, "lit_sahs.")}
    mods["lit_sahs"] = root / "__init__.py"
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # load-time imports only: an import inside a function runs later
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks never run
                continue
            for n in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try)) else []:
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("lit_sahs"):
                    deps.add(n.module)
                    deps.update(f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods)
                elif isinstance(n, ast.Import):
                    deps.update(a.name for a in n.names if a.name.startswith("lit_sahs"))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles():
    """No cycle among load-time imports (a package's __init__ may import its own submodules)."""
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue  # a package and its submodules
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


@pytest.mark.parametrize("module", ["lit_sahs.registry", "lit_sahs.tune", "lit_sahs.tracking", "lit_sahs.folds",
                                    "lit_sahs.artifact", "lit_sahs.evaluate", "lit_sahs.runtime"])
def test_module_imports_alone(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]


def test_registry_and_tune_do_not_import_each_other():
    import ast
    from pathlib import Path

    root = Path(lit_sahs.__file__).parent
    for path, forbidden in ((root / "registry.py", "lit_sahs.tune"), (root / "tracking.py", "lit_sahs.registry"),
                            (root / "tracking.py", "lit_sahs.tune")):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in imported), (path.name, forbidden)
    for path in (root / "tune").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "lit_sahs.registry" not in imported, path.name


def test_cli_prints_each_log_line_once():
    """Lightning's INFO lines reach the terminal through its own handler only, once."""
    code = ("import logging, sys\nfrom lit_sahs.cli import configure_logging\nconfigure_logging()\n"
            "from lightning.pytorch.utilities.rank_zero import rank_zero_info\nrank_zero_info('marker-line')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.stdout + r.stderr).count("marker-line") == 1, r.stdout + r.stderr


def test_help_lists_every_command(cli):
    from lit_sahs.cli import COMMANDS, LIGHTNING_COMMANDS

    code, out, _ = cli(["--help"])
    assert code == 0
    for name in list(LIGHTNING_COMMANDS) + list(COMMANDS):
        assert f"  {name} " in out


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://bob:p@ss@word@db.example:5432/optuna", "postgresql+psycopg2://bob:***@db.example:5432/optuna"),
    ("postgresql://bob:secret@host/db", "postgresql://bob:***@host/db"),
    ("sqlite:///mlruns/optuna.db", "sqlite:///mlruns/optuna.db"),
    ("http://tracking:5000", "http://tracking:5000"),
])
def test_redact_hides_the_whole_password_even_with_an_unencoded_at(url, shown):
    from lit_sahs.tracking import redact

    assert redact(url) == shown
    assert "ss@word" not in redact(url) and "secret" not in redact(url)


def test_holdout_label_names_every_held_out_family_and_source(tmp_path, capsys):
    """The report and ROC title name the whole holdout (families and sources), not only the families."""
    from lit_sahs.data.holdout import Holdout

    assert Holdout(("dan",), ("past_tense", "sharegpt_instructions")).label == "dan, past_tense, sharegpt_instructions"
    assert Holdout().label == "random" and Holdout.of("dan,pliny").families == ("dan", "pliny")
    make_store(tmp_path / "store")
    dm = CachedActivationDataModule(tmp_path / "store", heads="2.1,3.0", held_out_families=["pliny"], batch_size=64)
    assert dm.holdout == Holdout(("pliny",), ())
    Engine(output_dir=tmp_path / "out", baselines=[], max_epochs=2).fit(LogisticDetector(l2=1e-3), dm)
    assert "Test split (held out: pliny)" in capsys.readouterr().out
