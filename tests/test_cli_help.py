"""The command line explains itself: `--help` of every command works without loading the heavy
libraries, lists the choices, and a device this torch cannot use is one `error:` line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lit_sahs.cli import COMMANDS, LIGHTNING_COMMANDS

ROOT = Path(__file__).parents[1]
HEAVY = ("torch", "transformers", "mlflow", "lightning", "optuna")


def _help(command: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m lit_sahs COMMAND --help` in a fresh interpreter, and the modules it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lit_sahs", command, "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    imported = {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", r.stderr, re.M)}
    return r, imported


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "store"] + ["fit"])
def test_help_exits_zero_without_heavy_imports(command):
    r, imported = _help(command)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"python -m lit_sahs {command}" in r.stdout
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_store_help_and_other_lightning_commands_share_fits_page():
    r, imported = _help("store")
    assert r.returncode == 0 and not imported & set(HEAVY)
    from lit_sahs.cli.fit import short_help

    for command in LIGHTNING_COMMANDS:
        assert short_help(command).startswith(f"usage: python -m lit_sahs {command}")


def test_fit_help_is_short_and_lists_the_families(cli):
    from lit_sahs.families import FAMILIES  # every built-in family registered

    code, out, _ = cli(["fit", "--help"])
    assert code == 0
    assert out.startswith("usage: python -m lit_sahs fit")
    assert len(out.splitlines()) < 120  # LightningCLI's own page: over 500 lines
    assert len(FAMILIES) >= 4
    for name, cls in FAMILIES.items():  # the help's table (written without importing them) is right
        assert re.search(rf"^  {name}\s+{re.escape(cls.__module__)}\.{cls.__qualname__}$", out, re.M), name
    assert "--help_all" in out and "--print_config" in out


@pytest.mark.parametrize("argv, choices", [
    (["evaluate", "--help"], ["{families,sources}", "{round_robin,all_pairs}"]),
    (["locate", "--help"], ["{probe,effect}", "{zero,mean}", "{float32,bfloat16,float16}"]),
    (["tune", "--help"], ["{sources,families,both}"]),
    (["extract", "--help"], ["{auto,cpu,gpu,cuda,mps,tpu}"]),
])
def test_help_lists_the_choices(cli, argv, choices):
    code, out, _ = cli(argv)
    assert code == 0
    for c in choices:
        assert c in out, c


@pytest.mark.parametrize("argv", [["locate", "--store", "s", "--by", "nosuch"],
                                  ["evaluate", "--store", "s", "--protocol", "nosuch"],
                                  ["locate", "--store", "s", "--device", "gpu"]])
def test_a_wrong_choice_is_a_parse_error(cli, argv):
    code, _, err = cli(argv)
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_auto_device_and_a_device_this_torch_cannot_use(monkeypatch):
    import torch

    from lit_sahs.devices import resolve_device
    from lit_sahs.errors import LitSahsError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    for bad in ("cuda", "cuda:1"):
        with pytest.raises(LitSahsError, match="cannot use CUDA"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(LitSahsError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_cuda_on_a_cpu_only_torch_is_one_error_line(tmp_path):
    """`--device cuda` where torch sees no GPU: exit 2 and one `error:` line, not an AssertionError."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    store = tmp_path / "store"
    from synthetic import make_store

    make_store(store)
    r = subprocess.run([sys.executable, "-m", "lit_sahs", "locate", "--store", str(store), "--device", "cuda",
                        "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: device cuda") and "Traceback" not in r.stderr


def test_fit_on_an_accelerator_this_machine_lacks_is_one_error_line(tmp_path, monkeypatch, cli):
    import torch

    from test_fit_cli import write_config

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    from synthetic import make_store

    make_store(tmp_path / "store")
    cfg = write_config(tmp_path, {"class_path": "lit_sahs.detectors.LogisticDetector"}, {"ranking": None,
                                                                                        "heads": "2.1,3.0"})
    code, out, err = cli(["fit", "--config", str(cfg), "--trainer.accelerator", "gpu"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:")
    assert "MisconfigurationException" not in err and not (tmp_path / "out").exists()
