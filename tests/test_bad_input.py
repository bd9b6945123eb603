"""Bad input from a hostile user or a careless one: secrets in URLs, numbers outside their range,
outputs that cannot be written, damaged stores, malformed files, interrupts. Each ends in one
`error:` line (exit status 2, 130 for Ctrl+C) before any work, and no secret reaches a message."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from synthetic import FP, GEOM, make_store

ROOT = Path(__file__).parents[1]
MIN_FRAGMENT = 4  # a piece of a secret this long must never show


def redact(*args):
    from lit_sahs.redact import redact as redact_

    return redact_(*args)


def check_outputs(**kwargs):
    from lit_sahs.outputs import check_outputs as check

    return check(**kwargs)
ISSUE_URL = "postgresql+psycopg2://evil:hunter@2:SuperSecret99/abc@127.0.0.1:41061/optdb"
QUERY_URL = "postgresql+psycopg2://evil@127.0.0.1:1/optdb?password=QuerySecret"


def error_line(err: str) -> str:
    """The one line a refused command prints (log records of the libraries it ran aside: Lightning's
    INFO lines, MLflow's note that it created the experiment)."""
    lines = [l for l in err.strip().splitlines() if not l.startswith(("INFO", "WARNING", "[I ", "[W ", "20"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def fragments(secret: str) -> set[str]:
    n = min(MIN_FRAGMENT, len(secret))
    return {secret[i:j] for i in range(len(secret)) for j in range(i + n, len(secret) + 1)}


def leaks(text: str, secret: str) -> list[str]:
    return [f for f in fragments(secret) if f in text]


# ---------------------------------------------------------------- redaction

def test_redaction_of_the_reported_urls():
    assert redact(ISSUE_URL) == "postgresql+psycopg2://evil:***@127.0.0.1:41061/optdb"
    assert redact(QUERY_URL) == "postgresql+psycopg2://evil@127.0.0.1:1/optdb?password=***"
    driver = f"cannot reach {ISSUE_URL}: invalid literal for int() with base 10: 'SuperSecret99'"
    assert "Secret" not in redact(driver, ISSUE_URL) and "127.0.0.1:41061/optdb" in redact(driver, ISSUE_URL)
    for plain in ("sqlite:///mlruns/mlflow.db", "postgresql://lit@db:5432/x", "models:/name@champion", "no url"):
        assert redact(plain) == plain


@pytest.mark.parametrize("option, url, secret", [("--storage", ISSUE_URL, "SuperSecret99"),
                                                 ("--tracking_uri", ISSUE_URL, "SuperSecret99"),
                                                 ("--storage", QUERY_URL, "QuerySecret")])
def test_tune_with_a_secret_url_is_one_error_line_without_it(mlflow_workdir, cli, option, url, secret):
    make_store(mlflow_workdir / "store", n_base=20)
    code, out, err = cli(["tune", "--store", str(mlflow_workdir / "store"), "--n_trials", "0", option, url])
    line = error_line(err)
    assert code == 2 and not leaks(out + err, secret) and not leaks(out + err, "hunter@2:"), line


passwords = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=MIN_FRAGMENT,
                    max_size=40).filter(lambda p: p.strip() == p and "***" not in p)
users = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=10)
hosts = st.sampled_from(["127.0.0.1", "db.internal", "localhost", "[::1]"])
schemes = st.sampled_from(["postgresql", "postgresql+psycopg2", "mysql+pymysql", "mssql+pyodbc", "https", "http"])
secret_keys = st.sampled_from(["password", "PASSWORD", "sslpassword", "token", "api_key", "secret", "auth"])


@st.composite
def secret_urls(draw):
    """(url, secrets, public): credentials in the address, in a query parameter, or both; `public` is
    the URL with each secret replaced by a NUL (what the URL shows anyway)."""
    scheme, user, host, pw = draw(schemes), draw(users), draw(hosts), draw(passwords)
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    where = draw(st.sampled_from(["userinfo", "query", "both"]))
    address = f"{host}:{port}" if port else host
    secrets, parts = [], [f"{scheme}://{user}"]
    if where in ("userinfo", "both"):
        parts += [":", (pw,)]
        secrets.append(pw)
    parts.append(f"@{address}/{draw(users)}")
    if where in ("query", "both"):
        qsecret = draw(passwords)
        before = draw(st.sampled_from(["", "sslmode=require&", "timeout=5&"]))
        parts += [f"?{before}{draw(secret_keys)}=", (qsecret,)]
        secrets.append(qsecret)
    url = "".join(p[0] if isinstance(p, tuple) else p for p in parts)
    public = "".join("\0" if isinstance(p, tuple) else p for p in parts)
    return url, secrets, public


@settings()
@given(case=secret_urls(), data=st.data())
def test_redaction_hides_every_secret_fragment(case, data):
    """Whatever the password holds (@ : / ? # & = and any script), no piece of it four characters or
    longer survives: not in the URL shown, not where a driver quotes parts of the URL."""
    url, secrets, public = case
    quoted = []
    for s in secrets:  # a driver quotes a piece of the URL it could not parse
        i = data.draw(st.integers(0, len(s) - 1))
        quoted.append(s[i:data.draw(st.integers(i + 1, len(s)))])
    message = f"cannot reach {url}: invalid literal for int() with base 10: {quoted!r}; url={url!r}"
    for out in (redact(url), redact(message, url)):
        for s in secrets:  # a piece the URL shows anyway (its host, say) tells nothing about the secret
            assert not [f for f in leaks(out, s) if f not in public], (out, s)
    assert "://" in redact(url)  # still shows where it points


@settings()
@given(pw=passwords, where=st.sampled_from(["userinfo", "query"]))
@example(pw="psyc", where="userinfo")  # a password that is also a piece of the scheme
@example(pw="0&=0", where="query")  # the driver refuses the DSN itself (ProgrammingError, not OperationalError)
def test_storage_and_tracking_errors_never_show_a_password(pw, where, caplog):
    """The real openers (Optuna storage, MLflow tracking probe), driver messages included: one
    LitSahsError, nothing of the password in it or in any log record."""
    from lit_sahs.tracking import open_storage, probe_database

    template = ("postgresql+psycopg2://lit:{}@127.0.0.1:1/db" if where == "userinfo"
                else "postgresql+psycopg2://lit@127.0.0.1:1/db?password={}")
    url = template.format(pw)
    public = template.format("")  # a fragment the URL shows anyway ("psyc" of the scheme) tells nothing
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for opener in (lambda: open_storage(url, None), lambda: probe_database(url, "the MLflow tracking store")):
            with pytest.raises(LitSahsError) as e:
                opener()
            assert not [f for f in leaks(str(e.value), pw) if f not in public], str(e.value)
    assert not [f for f in leaks(caplog.text, pw) if f not in public]


# ---------------------------------------------------------------- numbers on the command line

@pytest.mark.parametrize("command", ["guard", "screen"])
@pytest.mark.parametrize("value", ["2", "-1", "1.0000001", ".nan", ".inf", "-.inf", "nan", "inf", "1e400", "abc"])
def test_threshold_outside_0_1_is_one_error_line(cli, command, value, tmp_path):
    code, _, err = cli([command, "--detector", str(tmp_path / "none"), "--prompt", "hi", "--threshold", value])
    assert code == 2 and "--threshold" in error_line(err)


@pytest.mark.parametrize("value", ["2", "-0.5", "nan", "abc"])
def test_answer_below_outside_0_1_is_one_error_line_before_anything_loads(cli, value, tmp_path):
    code, _, err = cli(["guard", "--detector", str(tmp_path / "none"), "--prompt", "hi", "--answer_below", value])
    assert code == 2 and "--answer_below" in error_line(err)


@pytest.mark.parametrize("argv, needle", [
    (["--batch_size", "0"], "--batch_size must be >= 1"), (["--batch_size", "-3"], "--batch_size must be >= 1"),
    (["--block_rows", "0"], "--block_rows must be >= 1"), (["--block_rows", "-2"], "--block_rows must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"), (["--batch_size", "1.5"], "--batch_size '1.5' is not a valid int"),
])
def test_extract_numbers_are_checked_first(cli, argv, needle, tmp_path):
    code, _, err = cli(["extract", "--store", str(tmp_path / "s"), *argv])
    assert code == 2 and needle in error_line(err)
    assert not (tmp_path / "s").exists()


def test_a_negative_limit_never_slices_from_the_end(tmp_path):
    from lit_sahs.data.protocol import SampleSpec

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"prompt {i}", "label": i % 2}) + "\n" for i in range(6)))
    with pytest.raises(LitSahsError, match="limit must be >= 1"):
        SampleSpec(data=str(data), attacks="plain", limit=-1).build()


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                    st.integers(-2**70, 2**70))
spellings = st.sampled_from([repr, str, lambda x: f"{x:e}" if isinstance(x, float) else str(x),
                             lambda x: {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}.get(str(x), str(x))])


@settings()
@given(case=st.sampled_from([("screen", "--threshold"), ("guard", "--threshold"), ("extract", "--batch_size"),
                             ("extract", "--block_rows"), ("extract", "--limit")]),
       value=numbers, spell=spellings)
def test_any_number_on_the_command_line_is_used_or_refused_in_one_line(case, value, spell, tmp_path_factory):
    """Every number a user can type for these options is either in range (the command goes on to its
    next check: here a missing detector or store folder) or refused naming the option, in one line."""
    from lit_sahs.cli import main

    command, option = case
    text = spell(value)
    assume(not text.startswith("-") or text[1:2].isdigit() or text[1:2] == ".")
    where = tmp_path_factory.getbasetemp() / "cli-numbers"
    if command == "extract":
        argv = ["extract", "--store", str(where / "file" / "store"), option, text]
        (where).mkdir(exist_ok=True)
        (where / "file").touch()
    else:
        argv = [command, "--detector", str(where / "no-detector"), "--prompt", "hi", option, text]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        main(argv)
    line = error_line(err.getvalue())
    assert e.value.code == 2
    try:
        number = float(text.replace(".nan", "nan").replace(".inf", "inf"))
    except ValueError:
        number = None
    if option == "--threshold":
        ok = number is not None and 0 <= number <= 1
    else:
        ok = text.lstrip("+").isdigit() and int(text) >= 1  # a whole number written as one
    if ok:
        assert option not in line, line  # accepted: refused later, for the missing detector / store folder
    else:
        assert option in line, line


# ---------------------------------------------------------------- outputs

def test_check_outputs(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(LitSahsError, match="afile is a file, so the folder"):
        check_outputs(dirs={"--out": tmp_path / "afile" / "out"})
    with pytest.raises(LitSahsError, match="afile is a file, so the folder"):
        check_outputs(files={"--out": tmp_path / "afile" / "x.jsonl"})
    with pytest.raises(LitSahsError, match="is a file, not a directory"):
        check_outputs(dirs={"--store": tmp_path / "afile"})
    with pytest.raises(LitSahsError, match="is a directory: give a file path"):
        check_outputs(files={"--json": tmp_path / "adir"})
    with pytest.raises(LitSahsError, match="--out and --passed name the same file"):
        check_outputs(files={"--out": tmp_path / "a.jsonl", "--passed": str(tmp_path / "." / "a.jsonl")})
    check_outputs(files={"--out": tmp_path / "new" / "deeper" / "a.jsonl"}, dirs={"--store": tmp_path / "adir"})
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


def test_an_existing_folder_that_refuses_writes_is_refused(tmp_path):
    """Tests run as root, where permission bits do not stop a write: /sys is a folder nobody writes."""
    try:
        (Path("/sys/kernel") / ".lit_sahs-probe").mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys
        pytest.skip("/sys/kernel is writable here")
    with pytest.raises(LitSahsError, match="cannot be written"):
        check_outputs(dirs={"--store": "/sys/kernel/store"})
    with pytest.raises(LitSahsError, match="cannot be written"):
        check_outputs(files={"--out": "/sys/kernel/out.jsonl"})


def fit_config(workdir: Path, output_dir: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "mlflow": {"experiment": "unit", "tracking_uri": f"sqlite:///{workdir}/mlruns/mlflow.db"},
        "output_dir": str(output_dir),
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "enable_progress_bar": False,
                    "default_root_dir": str(workdir / "root"), "log_every_n_steps": 1,
                    "enable_checkpointing": False},
        "model": {"class_path": "lit_sahs.detectors.LogisticDetector", "init_args": {"l2": 0.001}},
        "data": {"class_path": "lit_sahs.data.datamodules.CachedActivationDataModule",
                 "init_args": {"store": str(workdir / "store"), "heads": "2.1,3.0",
                               "held_out": {"families": ["pliny"]}, "batch_size": 64}},
    }
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("unwritable", ["under_a_file", "sys"])
def test_fit_checks_its_output_folder_before_training(mlflow_workdir, cli, monkeypatch, unwritable):
    import lightning

    make_store(mlflow_workdir / "store", n_base=20)
    (mlflow_workdir / "afile").write_text("x")
    out = mlflow_workdir / "afile" / "out" if unwritable == "under_a_file" else Path("/sys/kernel/lit_sahs-out")
    monkeypatch.setattr(lightning.Trainer, "fit", lambda *a, **k: pytest.fail("trained before checking the output"))
    code, _, err = cli(["fit", "--config", str(fit_config(mlflow_workdir, out))])
    assert code == 2 and "output_dir" in error_line(err)


def test_every_writing_command_checks_its_output_first(mlflow_workdir, cli, tmp_path):
    store = mlflow_workdir / "store"
    make_store(store, n_base=20)
    blocked = tmp_path / "afile"
    blocked.write_text("x")
    for argv, flag in [
        (["extract", "--store", str(blocked / "s")], "--store"),
        (["locate", "--store", str(store), "--out", str(blocked / "o")], "--out"),
        (["evaluate", "--store", str(store), "--out", str(blocked / "o")], "--out"),
        (["evaluate", "--detector", str(tmp_path / "d"), "--data", str(tmp_path / "x.jsonl"), "--json",
          str(blocked / "r.json")], "--json"),
        (["guard", "--detector", str(tmp_path / "d"), "--prompt", "hi", "--out", str(blocked / "g.jsonl")], "--out"),
        (["screen", "--detector", str(tmp_path / "d"), "--prompt", "hi", "--passed", str(blocked / "p.jsonl")],
         "--passed"),
    ]:
        code, _, err = cli(argv)
        assert code == 2 and flag in error_line(err) and "afile is a file" in err, (argv, err)
    assert not (store / "ranking.json").exists()  # locate refused before ranking


# ---------------------------------------------------------------- damaged stores

def damage_a_chunk(store: Path) -> None:
    block = sorted((store / "blocks").iterdir())[0]
    chunk = block / "c" / "0" / "2" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))


def run_module(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lit_sahs", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_damaged_store_is_one_line_not_a_flood_of_pending_tasks(mlflow_workdir):
    store = mlflow_workdir / "store"
    make_store(store, n_base=40)
    damage_a_chunk(store)
    r = run_module(["locate", "--store", str(store)], mlflow_workdir)
    assert r.returncode == 2 and "is damaged" in error_line(r.stderr), r.stderr[-3000:]
    r = run_module(["fit", "--config", str(fit_config(mlflow_workdir, mlflow_workdir / "out"))], mlflow_workdir)
    assert r.returncode == 2 and "is damaged" in error_line(r.stderr), r.stderr[-3000:]
    assert "Task was destroyed" not in r.stderr and "cannot schedule" not in r.stderr


def image_store(tmp_path: Path):
    from PIL import Image

    src = tmp_path / "src.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(src)
    store = ActivationStore.create_or_open(tmp_path / "s", FP, "rule", {"fmt": 1})
    rows = [{"id": f"r{i}", "label": i % 2, "image": str(src)} for i in range(4)]
    store.write_block(rows, np.random.default_rng(0).standard_normal((4,) + GEOM.shape))
    copy = next((tmp_path / "s" / "images").iterdir())
    return store, src, copy


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, other bytes


def test_store_verify_checks_images_and_repair_restores_them(tmp_path, cli):
    store, src, copy = image_store(tmp_path)
    good = copy.read_bytes()
    flip_a_byte(copy)
    code, out, err = cli(["store", "verify", str(tmp_path / "s")])
    assert code == 2 and f"bad images/{copy.name}" in out and "image copies" in error_line(err)
    code, out, err = cli(["store", "verify", str(tmp_path / "s"), "--repair"])
    assert code == 0 and f"restored images/{copy.name}" in out and copy.read_bytes() == good, err
    copy.unlink()  # missing and its original changed: reported, not restorable
    flip_a_byte(src)
    code, out, err = cli(["store", "verify", str(tmp_path / "s"), "--repair"])
    assert code == 2 and "is missing" in out and "could not be restored" in error_line(err)
    assert len(ActivationStore.open(tmp_path / "s")) == 4  # the rows themselves are intact


def test_writing_a_row_replaces_a_corrupted_image_copy(tmp_path):
    store, src, copy = image_store(tmp_path)
    good = copy.read_bytes()
    flip_a_byte(copy)
    store.write_block([{"id": "again", "label": 1, "image": str(src)}], np.zeros((1,) + GEOM.shape))
    assert copy.read_bytes() == good


def test_an_edited_manifest_is_reported_as_such(tmp_path):
    make_store(tmp_path / "s", n_base=4)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["position_rule"] = "something else"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LitSahsError, match="manifest.json does not match its checksum"):
        ActivationStore.open(tmp_path / "s")


def test_a_manifest_geometry_that_fits_no_block_is_the_manifests_fault(tmp_path, cli):
    make_store(tmp_path / "s", n_base=10)
    path = tmp_path / "s" / "manifest.json"
    m = json.loads(path.read_text())
    m.pop("manifest_sha256")  # as a store made before manifests had checksums
    m["geometry"]["num_heads"] = m["fingerprint"]["geometry"]["num_heads"] = 4
    path.write_text(json.dumps(m))
    blocks = sorted(p.name for p in (tmp_path / "s" / "blocks").iterdir())
    for repair in ([], ["--repair"]):
        code, _, err = cli(["store", "verify", str(tmp_path / "s"), *repair])
        line = error_line(err)
        assert code == 2 and "the manifest is wrong, not the blocks" in line and "nothing was removed" in line
    assert sorted(p.name for p in (tmp_path / "s" / "blocks").iterdir()) == blocks
    with pytest.raises(LitSahsError, match="store verify") as e:
        ActivationStore.open(tmp_path / "s").read()
    assert "--repair" not in str(e.value)


def test_a_full_disk_leaves_no_temp_block(tmp_path, monkeypatch):
    import asyncio

    from zarr.storage import LocalStore

    store = make_store(tmp_path / "s", n_base=4)
    real = LocalStore.set

    async def full_for_one_chunk(self, key, value, *args, **kwargs):
        if key.startswith("c/0/1/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        await asyncio.sleep(0.2)  # the other chunk writes are still running when the error surfaces
        return await real(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", full_for_one_chunk)
    with pytest.raises(OSError, match="No space"):
        store.write_block([{"id": f"n{i}", "label": 0} for i in range(3)], np.zeros((3,) + GEOM.shape))
    time.sleep(0.5)
    assert [p.name for p in store.blocks_dir.iterdir() if p.name.startswith(".")] == []


def test_written_counts_only_this_runs_rows(tmp_path):
    """Two runs commit the same rows (each checked the store before the other committed): each
    counts the rows read from its own blocks, so together they count every row once."""
    store = ActivationStore.create_or_open(tmp_path / "s", FP, "rule", {"fmt": 1})
    rows = [{"id": f"r{i}", "label": i % 2} for i in range(6)]
    acts = np.zeros((6,) + GEOM.shape)
    store.write_block(rows, acts, tag="aaaaaa")
    other = ActivationStore.open(tmp_path / "s")
    other.written_ids = lambda: set()  # it looked before the first run committed
    other.write_block(rows, acts, tag="bbbbbb")
    store.refresh()
    assert len(store) == 6 and store.rows_tagged("aaaaaa") + store.rows_tagged("bbbbbb") == 6


# ---------------------------------------------------------------- two workers, interrupts

def test_two_workers_open_a_new_mlflow_database_together(tmp_path):
    script = ("import sys, time\nfrom lit_sahs.tracking import Tracker\nt0 = float(sys.argv[2])\n"
              "while time.time() < t0: time.sleep(0.005)\nprint(Tracker(sys.argv[1], 'tune').experiment_id)\n")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    start = time.time() + 8  # every worker has imported MLflow by then
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in results]
    assert len({o.strip() for o, _ in results}) == 1  # one experiment


def test_ctrl_c_is_one_line_and_exit_130(cli, monkeypatch):
    from lit_sahs import cli as cli_module

    def interrupted(argv):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setitem(cli_module.COMMANDS, "store", interrupted)
    before = signal.getsignal(signal.SIGINT)
    code, out, err = cli(["store", "verify", "x"])
    assert code == 130 and err == "error: interrupted\n" and out == ""
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_a_fit_exits_130_and_fails_the_run(mlflow_workdir, cli, monkeypatch):
    """Lightning turns the interrupt into exit status 1 after closing the logger's run (FAILED)."""
    from lit_sahs.detectors import LogisticDetector

    make_store(mlflow_workdir / "store", n_base=20)
    monkeypatch.setattr(LogisticDetector, "training_step", lambda *a, **k: signal.raise_signal(signal.SIGINT))
    code, _, err = cli(["fit", "--config", str(fit_config(mlflow_workdir, mlflow_workdir / "out"))])
    lines = err.strip().splitlines()
    assert code == 130 and lines[-1] == "error: interrupted" and not {"KeyboardInterrupt", "SystemExit: 1"} & set(lines)
    assert run_statuses(mlflow_workdir / "mlruns" / "mlflow.db") == {"fit-cfg": "FAILED"}  # fit-<config name>


def run_statuses(db: Path) -> dict:
    import sqlite3

    with sqlite3.connect(db) as c:
        return dict(c.execute("select name, status from runs").fetchall())


def test_ctrl_c_during_tune_leaves_no_run_running(mlflow_workdir, cli, monkeypatch):
    from lit_sahs.tune import objective

    make_store(mlflow_workdir / "store", n_base=20)
    real, calls = objective.score_fold, []

    def second_fold_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(objective, "score_fold", second_fold_interrupted)
    db = mlflow_workdir / "mlruns" / "mlflow.db"
    code, _, err = cli(["tune", "--store", str(mlflow_workdir / "store"), "--objective", "families", "--n_trials", "4",
                        "--min_rows", "10", "--storage", f"sqlite:///{mlflow_workdir}/o.db", "--tracking_uri",
                        f"sqlite:///{db}", "--baselines", "[]", "--refit", "false", "--plots", "false",
                        "--heartbeat_interval", "null", "--max_epochs", "2"])
    lines = err.strip().splitlines()
    assert code == 130 and lines[-1] == "error: interrupted" and "KeyboardInterrupt" not in lines, err[-3000:]
    statuses = run_statuses(db)
    assert "RUNNING" not in statuses.values() and statuses["lit_sahs"] == "KILLED", statuses
    assert "KILLED" in {s for n, s in statuses.items() if n.startswith("trial-")}


# ---------------------------------------------------------------- readers

@pytest.mark.parametrize("name, body, needle", [
    ("extra.csv", "text,label\nhello,1,surplus\nbye,0\n", "line 2: 3 fields but the header names 2 columns"),
    ("fewer.csv", "text,label,source\nhello,1\n", "line 2: 2 fields but the header names 3 columns"),
    ("open.csv", 'text,label\nfine,0\n"abc,1\nx,0\n', "line 3: a quoted field starts here and is never closed"),
    ("source.jsonl", json.dumps({"text": "a", "label": 1, "source": 5}) + "\n", "`source` must be text, got 5"),
    ("attack.jsonl", json.dumps({"text": "a", "label": 1, "attack": ["x"]}) + "\n", "`attack` must be text"),
])
def test_reader_refuses_what_it_used_to_guess(tmp_path, name, body, needle):
    from lit_sahs.data.user_files import load_user_file

    (tmp_path / name).write_text(body)
    with pytest.raises(LitSahsError) as e:
        load_user_file(tmp_path / name)
    assert needle in str(e.value)


@pytest.mark.parametrize("name, body", [
    ("f.csv", "text,label\nhello,1.0\nbye,0.0\n"),
    ("f.jsonl", json.dumps({"text": "hello", "label": 1.0}) + "\n" + json.dumps({"text": "bye", "label": 0.0}) + "\n"),
])
def test_float_labels_are_read(tmp_path, name, body):
    from lit_sahs.data.user_files import load_user_file

    (tmp_path / name).write_text(body)
    assert sorted((s.text, s.label) for s in load_user_file(tmp_path / name)) == [("bye", 0), ("hello", 1)]


def test_prompt_file_csv_with_a_surplus_field_is_refused(tmp_path):
    from lit_sahs.prompts import read_prompts

    (tmp_path / "p.csv").write_text("text,id\nhello, there,1\n")
    with pytest.raises(LitSahsError, match="3 fields but the header names 2"):
        read_prompts(tmp_path / "p.csv")


# ---------------------------------------------------------------- tune's default space

@pytest.mark.parametrize("heads, k", [(12, {"type": "int", "low": 1, "high": 12, "log": True}), (1, {"value": 1}),
                                      (64, {"type": "int", "low": 1, "high": 32, "log": True})])
def test_default_search_space_fits_the_store(heads, k):
    from lit_sahs.tune import DEFAULT_SPACE, SearchSpace

    assert SearchSpace.parse(dict(DEFAULT_SPACE), heads).to_dict()["k"] == k
    with pytest.raises(LitSahsError, match="must lie in 1..12"):  # a range the user chose is still checked
        SearchSpace.parse({**DEFAULT_SPACE, "k": {"low": 1, "high": 20}}, 12)
