"""The engine: a fit from Python writes what the CLI writes; modules import alone, without cycles."""
import json
import pkgutil
import subprocess
import sys

import pytest

import lit_sahs
from lit_sahs.data.datamodules import CachedActivationDataModule
from lit_sahs.detectors import LogisticDetector, MLPDetector, SparseHeadDetector, load_detector
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


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(lit_sahs.__path__, "lit_sahs.")
                  if not m.name.endswith("__main__"))


def test_every_module_imports_alone():
    """Each module in a fresh interpreter: an import cycle fails whichever module enters it first."""
    code = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n"
            "    import subprocess\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
            "    if r.returncode: bad.append((m, r.stderr.strip().splitlines()[-1]))\nprint(bad)\n")
    r = subprocess.run([sys.executable, "-c", code, *_modules()], capture_output=True, text=True, timeout=600)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


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
