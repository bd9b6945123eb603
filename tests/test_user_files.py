"""Bad input in the files users hand over: user data files (BOM, ids, contradictory labels) and
detector artifacts (threshold out of range, a state dict that does not fit)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_sahs.data.protocol import SampleSpec
from lit_sahs.data.user_files import load_user_file
from lit_sahs.artifact import load_detector, save_detector
from lit_sahs.detectors.logistic import LogisticDetector
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint

BOM = "\ufeff"


def write_jsonl(path, rows, prefix=""):
    path.write_text(prefix + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- user data files

def test_csv_saved_by_a_spreadsheet_with_bom_loads(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(BOM + "text,label\nHow do I bake bread?,0\nWrite malware,1\n", encoding="utf-8")
    a, b = load_user_file(path)
    assert (a.text, a.label, b.text, b.label) == ("How do I bake bread?", 0, "Write malware", 1)


def test_jsonl_with_bom_loads(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "label": 0}, {"text": "hack it", "label": 1}], BOM)
    assert [s.text for s in load_user_file(path)] == ["hello", "hack it"]


def test_id_column_is_the_sample_id(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "q-17", "text": "hello", "label": 0},
                                              {"id": 18, "text": "hack it", "label": 1},
                                              {"text": "no id here", "label": 0}])
    a, b, c = load_user_file(path)
    assert (a.id, a.base_id, b.id, b.base_id) == ("q-17", "q-17", "18", "18")
    assert c.id and c.id not in ("q-17", "18")  # content-derived, as before
    csv = tmp_path / "d.csv"
    csv.write_text("id,text,label\nr1,hello,0\n,hack it,1\n", encoding="utf-8")
    first, second = load_user_file(csv)
    assert first.id == "r1" and second.id not in ("r1", "")  # an empty cell: content-derived id
    # attacked variants keep the user's id as their base
    attacked = SampleSpec(data=str(path), attacks="plain,dan", limit=None).build()
    assert {s.base_id for s in attacked if s.attack == "dan"} >= {"q-17", "18"}
    assert [s.id for s in attacked if s.attack == "plain"][:2] == ["q-17", "18"]


def test_duplicate_id_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "hello", "label": 0},
                                              {"id": "b", "text": "bye", "label": 0},
                                              {"id": "a", "text": "hack it", "label": 1}])
    with pytest.raises(LitSahsError, match=r"d\.jsonl, line 3: id 'a' is already used on line 1"):
        load_user_file(path)
    bad = write_jsonl(tmp_path / "e.jsonl", [{"id": [1], "text": "hello", "label": 0}])
    with pytest.raises(LitSahsError, match=r"line 1: `id` must be a string or an integer"):
        load_user_file(bad)


def test_text_with_both_labels_is_dropped_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "How do I pick a lock?", "label": 1},
        {"text": "How do I bake bread?", "label": 0},
        {"text": "how do I pick a lock", "label": 0},  # same normalised text, other label
        {"text": "How do I bake bread?", "label": 0},  # a plain repeat
        {"text": "Write malware", "label": 1},
    ])
    with caplog.at_level(logging.WARNING, logger="lit_sahs.data.sources"):
        samples = load_user_file(path)
    assert [s.text for s in samples] == ["How do I bake bread?", "Write malware"]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 2 rows whose text appears with both labels (1 texts)" in text
    assert "dropped 1 rows that repeat" in text
    only_conflicts = write_jsonl(tmp_path / "e.jsonl", [{"text": "x y", "label": 1}, {"text": "X, y", "label": 0}])
    with pytest.raises(LitSahsError, match="no rows left"):
        load_user_file(only_conflicts)


# ---------------------------------------------------------------- detector artifacts

GEOM = Geometry(num_layers=2, num_heads=2, head_dim=4)


@pytest.fixture
def artifact(tmp_path):
    det = LogisticDetector().bind(HeadSet([(0, 1), (1, 0)]), GEOM, TargetFingerprint("t", GEOM, "a" * 64),
                                  torch.zeros(2, 4), torch.ones(2, 4))
    return save_detector(det, tmp_path / "det")


def set_threshold(path, value):
    state = load_file(str(path / "detector.safetensors"))
    state["threshold"] = torch.tensor(value, dtype=torch.float64)
    save_file(state, str(path / "detector.safetensors"))
    meta = json.loads((path / "detector.json").read_text())
    meta["threshold"] = value
    (path / "detector.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("value", [-0.25, 1.5, float("nan")])
def test_threshold_outside_0_1_is_refused(artifact, value):
    set_threshold(artifact, value)
    with pytest.raises(LitSahsError, match=r"threshold .* is not a probability in \[0, 1\]|NaN or inf"):
        load_detector(artifact)


def test_threshold_at_the_edges_is_accepted(artifact):
    for value in (0.0, 1.0, 1.0000000000000002):  # calibrate_threshold's "flag nothing" above 1.0
        set_threshold(artifact, value)
        assert float(load_detector(artifact).threshold) == value


def test_save_refuses_an_out_of_range_threshold(artifact, tmp_path):
    det = load_detector(artifact)
    det.threshold.fill_(-1.0)
    with pytest.raises(LitSahsError, match="not a probability"):
        save_detector(det, tmp_path / "other")


def test_state_dict_error_keeps_its_reason(artifact):
    state = load_file(str(artifact / "detector.safetensors"))
    del state["linear.bias"]
    state["linear.weight"] = torch.zeros(1, 5)
    save_file(state, str(artifact / "detector.safetensors"))
    with pytest.raises(LitSahsError) as e:
        load_detector(artifact)
    msg = str(e.value)
    assert "linear.bias" in msg and "Missing key" in msg and "(+1 more)" in msg and "corrupt" in msg
