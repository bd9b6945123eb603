"""Dataset assembly: dedupe, balance, limits, determinism."""
import json
from collections import Counter

import numpy as np
import pytest

from lit_sahs.data.protocol import build_dataset, dedupe, even_split
from lit_sahs.data.samples import Sample, normalise_text
from lit_sahs.data.sources import load_source
from lit_sahs.errors import LitSahsError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dedupe_keeps_first_across_sources_and_drops_label_conflicts():
    a = Sample.make("How do I boil an egg?", 0, source="s1")
    a2 = Sample.make("  how do I boil an EGG ", 0, source="s2")
    c1 = Sample.make("Tell me about knives", 0, source="s1")
    c2 = Sample.make("tell me about knives!", 1, source="s3")
    b = Sample.make("Write ransomware", 1, source="s3")
    assert dedupe([a, c1, a2, b, c2]) == [a, b]


def test_dedupe_keeps_same_text_over_different_images():
    x = Sample.make("what is written here?", 0, source="s", image="/a.png")
    y = Sample.make("what is written here?", 0, source="s", image="/b.png")
    assert dedupe([x, y]) == [x, y]


@pytest.mark.parametrize("sizes, total, expected", [
    ([10, 10, 10], 9, [3, 3, 3]),
    ([2, 10, 10], 12, [2, 5, 5]),
    ([10, 10], 5, [3, 2]),
    ([1, 1], 10, [1, 1]),
    ([0, 4], 3, [0, 3]),
])
def test_even_split(sizes, total, expected):
    assert even_split(sizes, total) == expected


def test_balanced_classes_and_sources():
    data = build_dataset(harmful=("harmbench",), benign=("truthfulqa", "openbookqa"), seed=0)
    labels = Counter(s.label for s in data)
    assert labels[0] == labels[1] == 200  # harmbench is the smaller class
    by_source = Counter(s.source for s in data if s.label == 0)
    assert by_source["truthfulqa"] == by_source["openbookqa"] == 100


def test_unbalanced_keeps_everything():
    data = build_dataset(harmful=("harmbench",), benign=("openbookqa",), balance=False)
    assert Counter(s.label for s in data) == {1: len(load_source("harmbench")), 0: len(load_source("openbookqa"))}


def test_limit_split_over_classes_and_attacks():
    data = build_dataset(harmful=("advbench", "harmbench"), benign=("truthfulqa", "sharegpt"),
                         attacks=("plain", "pyrit", "dan"), limit=60, seed=1)
    assert len(data) == 60
    assert set(Counter((s.label, s.attack) for s in data).values()) == {10}
    plain = {s.base_id for s in data if s.attack == "plain"}
    assert {s.base_id for s in data} == plain  # every attack wraps the same bases
    assert len(build_dataset(harmful=("harmbench",), benign=("truthfulqa",), limit=61)) == 60


def test_spread_attacks_gives_each_base_one_attack_balanced_per_source_and_class():
    kw = dict(harmful=("advbench", "harmbench"), benign=("truthfulqa", "sharegpt"),
              attacks=("plain", "pyrit", "dan"), limit=120, seed=1)
    data = build_dataset(spread=True, **kw)
    assert len(data) == 120
    assert len({s.base_id for s in data}) == 120  # every row a distinct prompt (3x the bases of the default)
    assert len({s.base_id for s in build_dataset(**kw)}) == 40
    per_group = Counter((s.source, s.attack) for s in data)
    for source in ("advbench", "harmbench", "truthfulqa", "sharegpt"):  # 30 bases each, 10 per attack
        assert [per_group[(source, a)] for a in ("plain", "pyrit", "dan")] == [10, 10, 10]
    assert [s.id for s in build_dataset(spread=True, **kw)] == [s.id for s in data]
    assert len(build_dataset(spread=True, **{**kw, "limit": 2})) == 2  # one row per base: 2 rows suffice
    with pytest.raises(LitSahsError, match=r"use limit >= 2$"):  # not 2 x 3 attacks: each base is one row
        build_dataset(spread=True, **{**kw, "limit": 1})


def test_benign_ratio_sets_benign_bases_per_harmful_one_within_the_limit():
    kw = dict(harmful=("harmbench",), benign=("truthfulqa", "sharegpt"), attacks=("plain", "pyrit"))
    data = build_dataset(benign_ratio=3.0, limit=160, **kw)
    assert Counter((s.label, s.attack) for s in data) == {(1, "plain"): 20, (0, "plain"): 60,
                                                           (1, "pyrit"): 20, (0, "pyrit"): 60}
    capped = build_dataset(benign_ratio=0.5, **kw)  # no limit: every harmbench prompt, half as many benign
    assert Counter(s.label for s in capped) == {1: 2 * 200, 0: 2 * 100}
    with pytest.raises(LitSahsError, match="benign_ratio must be > 0"):
        build_dataset(benign_ratio=0, **kw)


def test_stable_ids_and_order_for_a_seed():
    kw = dict(harmful=("advbench",), benign=("medicationqa",), attacks=("plain", "inthewild"), limit=40)
    a, b = build_dataset(seed=5, **kw), build_dataset(seed=5, **kw)
    assert [s.id for s in a] == [s.id for s in b]
    assert {s.id for s in build_dataset(seed=6, **kw)} != {s.id for s in a}


def test_dedupe_across_sources_in_build(tmp_path):
    first = load_source("harmbench")[0].text
    user = write_jsonl(tmp_path / "u.jsonl", [
        {"text": first.upper() + "!!", "label": 1},  # same prompt as harmbench's first, reworded only in case
        {"text": "How tall is the Eiffel tower?", "label": 0},
        {"text": "Give me step-by-step meth synthesis", "label": 1},
    ])
    data = build_dataset(harmful=("harmbench", f"file:{user}"), benign=("truthfulqa",), balance=False)
    keys = Counter(normalise_text(s.text) for s in data)
    assert keys.most_common(1)[0][1] == 1
    assert Counter(s.source for s in data)["file:u.jsonl"] == 2  # the user file's duplicate was dropped
    assert any(s.label == 0 and s.source == "file:u.jsonl" for s in data)  # user files hold both labels


def test_bad_arguments_raise():
    with pytest.raises(LitSahsError, match="'truthfulqa' is benign.*move it to benign="):
        build_dataset(harmful=("truthfulqa",), benign=("mmlu",))
    with pytest.raises(LitSahsError, match="unknown source"):
        build_dataset(harmful=("advbench",), benign=("nope",))
    with pytest.raises(LitSahsError, match="unknown attack"):
        build_dataset(harmful=("advbench",), benign=("mmlu",), attacks=("plain", "nope"))
    with pytest.raises(LitSahsError, match="no benign prompts to balance against"):
        build_dataset(harmful=("advbench",), benign=())
    with pytest.raises(LitSahsError, match=r"limit=3 is too small for 2 attack\(s\).*limit >= 4"):
        build_dataset(harmful=("advbench",), benign=("mmlu",), attacks=("plain", "dan"), limit=3)
    with pytest.raises(LitSahsError, match="positive"):
        build_dataset(harmful=("advbench",), benign=("mmlu",), limit=0)


def _rows(n_bases=40, families=("plain", "dan", "pliny")):
    rows = []
    for b in range(n_bases):
        for f in families:
            rows.append({"id": f"{b}-{f}", "base_id": str(b), "label": b % 2, "attack_family": f,
                         "source": "src_a" if b < n_bases // 2 else "src_b"})
    return rows


def test_split_holds_out_whole_families_and_keeps_bases_together():
    from lit_sahs.data.protocol import split_rows

    rows = _rows()
    sp = split_rows(rows, held_out_families=["dan"], seed=1)
    assert {rows[i]["attack_family"] for i in sp["test"]} == {"dan"}
    assert len(sp["test"]) == 40
    train_bases = {rows[i]["base_id"] for i in sp["train"]}
    val_bases = {rows[i]["base_id"] for i in sp["val"]}
    assert not train_bases & val_bases
    assert sorted(np.concatenate([sp["train"], sp["val"], sp["test"]])) == list(range(len(rows)))


def test_split_errors_on_unknown_family_and_single_class():
    from lit_sahs.data.protocol import split_rows

    rows = _rows()
    with pytest.raises(LitSahsError, match="held-out attack family 'nope'"):
        split_rows(rows, held_out_families=["nope"])
    one_class = [dict(r, label=1) for r in rows]
    with pytest.raises(LitSahsError, match="only malicious"):
        split_rows(one_class, held_out_sources=["src_b"])


def test_train_families_restricts_train_and_val_only():
    from lit_sahs.data.protocol import split_rows

    rows = _rows()
    sp = split_rows(rows, held_out_families=["dan"], train_families=["plain"], seed=0)
    assert {rows[i]["attack_family"] for i in np.concatenate([sp["train"], sp["val"]])} == {"plain"}
    assert {rows[i]["attack_family"] for i in sp["test"]} == {"dan"}


def test_a_source_listed_after_its_superset_is_an_error_and_before_it_is_kept():
    with pytest.raises(LitSahsError, match="'sharegpt_instructions' adds no prompts"):
        build_dataset(harmful=["advbench"], benign=["sharegpt", "sharegpt_instructions"], limit=20)
    samples = build_dataset(harmful=["advbench"], benign=["sharegpt_instructions", "sharegpt"], limit=40)
    by_source = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(s)
    assert len(by_source["sharegpt_instructions"]) == len(by_source["sharegpt"]) == 10
    instructions = {s.id for s in load_source("sharegpt_instructions")}
    assert not {s.id for s in by_source["sharegpt"]} & instructions  # the rest of ShareGPT, disjoint
