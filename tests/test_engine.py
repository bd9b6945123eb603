"""The engine: a fit from Python writes what the CLI writes; modules import alone, without cycles."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lit_sahs
from lit_sahs.data.datamodules import CachedActivationDataModule
from lit_sahs.detectors import LogisticDetector, MLPDetector, SparseHeadDetector
from lit_sahs.artifact import load_detector
from lit_sahs.engine import Engine, family_defaults
from synthetic import SIGNAL_HEADS, make_store
from lit_sahs.data.holdout import Holdout


def test_engine_fit_from_python_writes_report_and_artifact(tmp_path):
    make_store(tmp_path / "store")
    dm = CachedActivationDataModule(tmp_path / "store", heads="2.1,3.0", held_out=Holdout(families=["pliny"]), batch_size=64)
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


def test_a_run_logged_to_a_file_gets_a_bar_that_writes_as_it_goes(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    import contextlib
    import io

    from lit_sahs.engine import log_progress_bar

    monkeypatch.setattr("sys.stdout.isatty", lambda: False)  # output to a file, as a background run's log
    bars = [c for c in Engine(quiet=False).trainer(LogisticDetector).callbacks if isinstance(c, TQDMProgressBar)]
    assert len(bars) == 1 and not isinstance(bars[0], RichProgressBar)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        bars[0].init_train_tqdm().close()
    assert out.getvalue() == "" and err.getvalue()  # stdout stays for the commands' JSON summaries
    given = RichProgressBar()  # a bar the caller chose is kept, alone
    cbs = Engine(quiet=False, callbacks=[given]).trainer(LogisticDetector).callbacks
    assert [c for c in cbs if isinstance(c, (TQDMProgressBar, RichProgressBar))] == [given]
    assert not any(isinstance(c, TQDMProgressBar) for c in Engine().trainer(LogisticDetector).callbacks)  # quiet: none
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)  # a terminal keeps Lightning's own choice
    assert log_progress_bar({"enable_progress_bar": True}) == []


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(root: Path, package: str) -> dict[str, dict[str, str]]:
    """module -> {imported module: where ("path:line")} over every module of `package` (its folder
    `root`), counting every import wherever it is written (module level, functions, methods), except
    under ``if TYPE_CHECKING:``. ``from pkg import name`` counts the module that defines ``name``:
    the submodule ``pkg.name``, else the module a package __init__ re-exports it from, else ``pkg``.
    A package's __init__ importing its submodules is an edge; a module importing a package above it
    is not (that __init__ has run before the module does)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package,) + path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    trees = {mod: ast.parse(path.read_text(), str(path)) for mod, path in files.items()}

    def base(mod: str, node: ast.ImportFrom) -> str:
        """The absolute module a `from ... import` names (relative imports resolved)."""
        if not node.level:
            return node.module or ""
        here = mod.split(".") if files[mod].name == "__init__.py" else mod.split(".")[:-1]
        return ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))

    def top_level_from(mod: str):
        for node in trees[mod].body:
            if isinstance(node, ast.ImportFrom):
                yield node

    reexports = {mod: {a.asname or a.name: (base(mod, node), a.name) for node in top_level_from(mod) for a in node.names}
                 for mod in files if files[mod].name == "__init__.py"}

    def defining(module: str, name: str, seen=()) -> str:
        if f"{module}.{name}" in files:
            return f"{module}.{name}"
        if name in reexports.get(module, {}) and module not in seen:
            source, original = reexports[module][name]
            return defining(source, original, seen + (module,)) if source in files else module
        return module

    graph: dict[str, dict[str, str]] = {}
    for mod, tree in trees.items():
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
        edges: dict[str, str] = {}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = base(mod, node)
                targets = [defining(module, a.name) for a in node.names] if module in files else [module]
            else:
                continue
            for target in targets:
                while target and target not in files:  # import a.b.c of a name-less path: its longest module
                    target = target.rpartition(".")[0]
                if target and target != mod and not mod.startswith(target + "."):
                    edges.setdefault(target, f"{files[mod].relative_to(root.parent)}:{node.lineno}")
        graph[mod] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected group of modules (Tarjan), as a path that
    returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:  # breadth first, inside the group, back to start
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(cycles)


def test_import_graph_counts_every_import(tmp_path):
    """The checker sees an import written inside a method, resolves a package's re-export to the module
    that defines the name, and skips TYPE_CHECKING imports and a submodule importing its own package."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.low import Low\n")
    (pkg / "sub" / "low.py").write_text("import pkg.sub\nclass Low:\n    def up(self):\n        from ..high import High\n")
    (pkg / "high.py").write_text("from typing import TYPE_CHECKING\nfrom pkg.sub import Low\n"
                                 "if TYPE_CHECKING:\n    from pkg.other import Other\n")
    (pkg / "other.py").write_text("import pkg.high\n")
    graph = import_graph(pkg, "pkg")
    assert set(graph["pkg.high"]) == {"pkg.sub.low"} and graph["pkg.high"]["pkg.sub.low"] == "pkg/high.py:2"
    assert set(graph["pkg.sub.low"]) == {"pkg.high"}  # the method's import; not its own package pkg.sub
    assert set(graph["pkg.sub"]) == {"pkg.sub.low"} and set(graph["pkg.other"]) == {"pkg.high"}
    assert import_cycles(graph) == [["pkg.high", "pkg.sub.low", "pkg.high"]]


def test_no_import_cycles():
    """No cycle among lit_sahs modules, counting imports inside functions too: a low module never
    imports a higher one, even lazily."""
    graph = import_graph(Path(lit_sahs.__file__).parent, "lit_sahs")
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        "  " + " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}" for c in cycles)


def test_no_module_over_500_lines():
    root = Path(lit_sahs.__file__).parent
    lengths = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert not {p: n for p, n in lengths.items() if n > 500}


@pytest.mark.parametrize("module", ["lit_sahs.registry", "lit_sahs.tune", "lit_sahs.tracking", "lit_sahs.folds",
                                    "lit_sahs.artifact", "lit_sahs.evaluate", "lit_sahs.hooks",
                                    "lit_sahs.loading", "lit_sahs.options", "lit_sahs.prompts"])
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

    assert Holdout(("dan",), ("past_tense", "sharegpt_instructions")).label == "dan, past_tense, sharegpt_instructions"
    assert Holdout().label == "random" and Holdout.of("dan,pliny").families == ("dan", "pliny")
    make_store(tmp_path / "store")
    dm = CachedActivationDataModule(tmp_path / "store", heads="2.1,3.0", held_out=Holdout(families=["pliny"]), batch_size=64)
    assert dm.holdout == Holdout(("pliny",), ())
    Engine(output_dir=tmp_path / "out", baselines=[], max_epochs=2).fit(LogisticDetector(l2=1e-3), dm)
    assert "Test split (held out: pliny)" in capsys.readouterr().out
