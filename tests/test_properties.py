"""Property-based tests of the readers of user input: whatever bytes, JSON, CSV dialect or text
encoding a user file or a detector artifact holds, reading it ends in a documented result or one
LitSahsError, never another exception (a traceback instead of an `error:` line)."""
import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from lit_sahs.data.samples import Sample
from lit_sahs.data.user_files import load_user_file
from lit_sahs.detectors import LogisticDetector, SafetyDetector
from lit_sahs.artifact import load_detector, save_detector
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint
from lit_sahs.prompts import read_prompts

# the number of examples, the deadline and the example database come from the profile tests/conftest.py loads
SETTINGS = settings()
COLUMNS = ("text", "label", "id", "attack", "attack_family", "source", "category", "image", "extra")
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252", "ascii")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
# cell values a user file plausibly holds: labels and ids as text or numbers, empty cells, odd text
cells = st.one_of(st.sampled_from(["0", "1", " 1 ", "", "2", "yes", "-0", "1.0"]), st.integers(-3, 3),
                  st.text(max_size=30))
rows = st.lists(st.dictionaries(st.sampled_from(COLUMNS), cells | json_values, max_size=len(COLUMNS)),
                min_size=0, max_size=6)


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="lit-sahs-props-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fresh(workdir: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / "img.png").write_bytes(b"\x89PNG not really")  # an image path that exists
    return d


def check_user_file(path: Path) -> None:
    try:
        samples = load_user_file(path)
    except LitSahsError:
        return
    assert samples and all(isinstance(s, Sample) for s in samples)
    assert all(s.label in (0, 1) and s.text.strip() and isinstance(s.id, str) and s.id for s in samples)
    assert len({s.id for s in samples}) == len(samples)


def check_prompts(path: Path) -> None:
    try:
        prompts = read_prompts(path)
    except LitSahsError:
        return
    assert prompts and all(isinstance(r["text"], str) and isinstance(r["id"], str) for r in prompts)
    assert all(r["image"] is None or isinstance(r["image"], str) for r in prompts)


def write_csv(path: Path, data: list[dict], delimiter: str, quoting: int, encoding: str, header: list[str]) -> bool:
    buf = io.StringIO()
    try:
        w = csv.DictWriter(buf, fieldnames=header, delimiter=delimiter, quoting=quoting, extrasaction="ignore",
                           escapechar="\\")
        w.writeheader()
        for r in data:
            w.writerow({k: v if isinstance(v, (str, int)) else json.dumps(v) for k, v in r.items()})
        path.write_bytes(buf.getvalue().encode(encoding))
    except (csv.Error, UnicodeEncodeError, ValueError):
        return False
    return True


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".csv", ".ndjson", ".txt"]))
@example(data=b"\x80", suffix=".jsonl").via("found: UnicodeDecodeError from jsonl_rows")
@example(data=b"\x80", suffix=".csv").via("found: UnicodeDecodeError from csv_rows")
@example(data=b"\x80", suffix=".txt").via("found: UnicodeDecodeError from read_prompts")
@example(data=b"text,label\n\"a\x00\",1\n" + b"x" * 200, suffix=".csv")
def test_random_bytes(workdir, data, suffix):
    d = fresh(workdir)
    (d / f"f{suffix}").write_bytes(data)
    if suffix != ".txt":
        check_user_file(d / f"f{suffix}")
    check_prompts(d / f"f{suffix}")


@SETTINGS
@given(lines=st.lists(json_values | rows.map(lambda r: r[0] if r else {}), max_size=6),
       encoding=st.sampled_from(ENCODINGS), blank=st.booleans())
@example(lines=[{"text": "0", "image": 1}], encoding="utf-8", blank=False).via("found: TypeError in read_prompts")
@example(lines=[{"text": "a", "id": {"x": 1}}], encoding="utf-8", blank=False)
@example(lines=[{"text": "a", "label": 1}], encoding="utf-16", blank=False)
def test_random_json_lines(workdir, lines, encoding, blank):
    d = fresh(workdir)
    text = ("\n\n" if blank else "\n").join(json.dumps(v, allow_nan=True) for v in lines) + "\n"
    try:
        (d / "f.jsonl").write_bytes(text.encode(encoding))
    except UnicodeEncodeError:
        assume(False)
    check_user_file(d / "f.jsonl")
    check_prompts(d / "f.jsonl")


@SETTINGS
@given(data=rows, delimiter=st.sampled_from([",", ";", "\t", "|"]),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
       encoding=st.sampled_from(ENCODINGS),
       header=st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=6))
def test_random_csv_dialects_and_encodings(workdir, data, delimiter, quoting, encoding, header):
    d = fresh(workdir)
    path = d / "f.csv"
    assume(write_csv(path, data, delimiter, quoting, encoding, header))
    check_user_file(path)
    check_prompts(path)


@SETTINGS
@given(text=st.text(max_size=200), encoding=st.sampled_from(ENCODINGS))
def test_random_text_prompt_files(workdir, text, encoding):
    d = fresh(workdir)
    try:
        (d / "f.txt").write_bytes(text.encode(encoding))
    except UnicodeEncodeError:
        assume(False)
    check_prompts(d / "f.txt")


# ---------------------------------------------------------------- detector artifacts

GEOM = Geometry(num_layers=3, num_heads=2, head_dim=4)
FP = TargetFingerprint("prop-target", GEOM, "d" * 64)


@pytest.fixture(scope="module")
def artifact(workdir):
    det = LogisticDetector().bind(HeadSet([(0, 1), (2, 0)]), GEOM, FP, torch.zeros(2, 4), torch.ones(2, 4))
    det.threshold.fill_(0.5)
    path = save_detector(det, workdir / "det")
    return json.loads((path / "detector.json").read_text()), (path / "detector.safetensors").read_bytes()


def check_detector(path: Path) -> None:
    try:
        det = load_detector(path)
    except LitSahsError:
        return
    assert isinstance(det, SafetyDetector) and det.is_bound
    assert 0.0 <= float(det.threshold) <= 1.0 + 1e-12


def write_artifact(workdir: Path, meta, weights: bytes) -> Path:
    d = fresh(workdir) / "det"
    d.mkdir()
    (d / "detector.json").write_text(meta if isinstance(meta, str) else json.dumps(meta, allow_nan=True))
    (d / "detector.safetensors").write_bytes(weights)
    return d


@SETTINGS
@given(meta=json_values, weights=st.binary(max_size=200))
def test_detector_from_random_json_and_bytes(workdir, meta, weights):
    """Random JSON and random bytes (a detector.json that is not even an object, a safetensors file
    that is noise)."""
    check_detector(write_artifact(workdir, meta, weights))


def _mutate(obj, path, value):
    """A copy of the JSON `obj` with the value at `path` (keys / indices) replaced, or deleted when
    value is DELETE."""
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for key in path[:-1]:
        cur = cur[key]
    if value is DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


DELETE = object()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@SETTINGS
@given(data=st.data(), value=json_values | st.just(DELETE), cut=st.integers(0, 4000),
       flip=st.lists(st.integers(0, 4000), max_size=3), keep_weights=st.booleans())
def test_detector_from_damaged_artifact(workdir, artifact, data, value, cut, flip, keep_weights):
    """A real artifact with one value of its detector.json replaced by random JSON (or removed), and
    its safetensors bytes flipped or cut."""
    meta, weights = artifact
    path = data.draw(st.sampled_from(list(_paths(meta))[1:]))
    damaged = _mutate(meta, path, value)
    blob = bytearray(weights)
    if not keep_weights:
        for i in flip:
            blob[i % len(blob)] ^= 0xFF
        blob = blob[:cut] if cut < len(blob) else blob
    check_detector(write_artifact(workdir, damaged, bytes(blob)))


def test_format_version_that_is_not_a_number(workdir, artifact):
    """found: TypeError comparing a null format_version"""
    meta, weights = artifact
    for version in (None, "1", [1], float("nan")):
        with pytest.raises(LitSahsError, match="format_version"):
            load_detector(write_artifact(workdir, dict(meta, format_version=version), weights))


def test_infinite_numbers_in_the_description(workdir, artifact):
    """found: OverflowError from int(inf) in a head or the fingerprint's geometry, not one error line"""
    meta, weights = artifact
    heads = json.loads(json.dumps(meta))
    heads["head_set"][0][0] = float("inf")
    layers = json.loads(json.dumps(meta))
    layers["fingerprint"]["geometry"]["num_layers"] = float("inf")
    for damaged in (heads, layers):
        with pytest.raises(LitSahsError, match="corrupt"):
            load_detector(write_artifact(workdir, damaged, weights))


@SETTINGS
@given(data=st.data())
def test_detector_with_foreign_tensors(workdir, artifact, data):
    """A well-formed safetensors file whose tensors have other names, shapes or dtypes."""
    from safetensors.torch import save as save_tensors

    meta, _ = artifact
    names = ["linear.weight", "linear.bias", "mean", "std", "threshold", "other"]
    tensors = {}
    for name in data.draw(st.lists(st.sampled_from(names), unique=True, max_size=6)):
        shape = tuple(data.draw(st.lists(st.integers(0, 9), max_size=3)))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.float64]))
        fill = data.draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -2.0]))
        tensors[name] = torch.full(shape, fill).to(dtype) if dtype != torch.bool else torch.zeros(shape, dtype=dtype)
    check_detector(write_artifact(workdir, meta, save_tensors(tensors)))
