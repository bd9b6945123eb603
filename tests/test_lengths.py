"""Prompts longer than the target's context: one policy (``prompting.fit_context``) for extract,
evaluate --data, screen and guard, applied to the whole input before the first forward: refused by
default with one error naming the rows and their token counts, or cut with --truncate left|right.
On the tiny LLaVA (context 4096; a copy with a context of 64 for the cheap cases). Also: guard's
fail-closed refusals are announced by one warning."""
import json
import logging

import pytest

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.extract import run_extraction
from lit_sahs.prompts import encode_prompts
from lit_sahs.targets import load_target, prompting
from test_score_file import tiny_detector, write_jsonl

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
LONG = "START " + "word " * 100 + "END"  # about 110 tokens on the tiny tokenizer
LONGER = "a b c " * 50  # about 160
HUGE = "word " * 5000  # longer than the tiny target's real context of 4096


@pytest.fixture(scope="module")
def short_llava():
    """A tiny LLaVA of its own whose config says its context is 64 tokens."""
    target = load_target("tiny-llava")
    target.model.config.text_config.max_position_embeddings = 64
    return target


@pytest.fixture(scope="module")
def detector(tiny_llava, tmp_path_factory):
    return tiny_detector(tiny_llava, tmp_path_factory.mktemp("tiny") / "det")


def samples():
    return [Sample.make("hello there", 0, "unit"), Sample.make(LONG, 1, "unit"), Sample.make(LONGER, 1, "unit")]


def test_extract_refuses_long_prompts_before_the_store_exists(short_llava, tmp_path):
    s = samples()
    with pytest.raises(LitSahsError) as e:
        run_extraction(short_llava, s, tmp_path / "store", trainer_kwargs=CPU)
    msg = str(e.value)
    assert "2 prompts are longer than the target's context of 64 tokens" in msg
    assert f"{s[1].id} (" in msg and f"{s[2].id} (" in msg and s[0].id not in msg and "--truncate" in msg
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("side", ["left", "right"])
def test_extract_truncate_cuts_the_text_not_the_template(short_llava, tmp_path, side):
    s = samples()
    result = run_extraction(short_llava, s, tmp_path / "store", trainer_kwargs=CPU, truncate=side)
    assert result["written"] == 3
    stored = {r["id"]: r["text"] for r in ActivationStore.open(tmp_path / "store").index()}
    assert stored[s[0].id] == "hello there"
    kept = stored[s[1].id]
    assert kept.rstrip().endswith("END") != kept.lstrip().startswith("START")
    assert kept.rstrip().endswith("END") == (side == "left")
    assert max(prompting.prompt_lengths(short_llava, list(stored.values()))) <= 64


def test_truncate_value_is_checked_before_the_target_loads(tmp_path):
    with pytest.raises(LitSahsError, match="truncate must be left"):
        run_extraction("no-such-target", samples(), tmp_path / "store", truncate="middle")


def test_encode_prompts_applies_the_same_policy(short_llava):
    with pytest.raises(LitSahsError, match="prompt 1 is \\d+ tokens, longer than the target's context of 64"):
        encode_prompts(short_llava, ["hi", LONG])
    enc = encode_prompts(short_llava, ["hi", LONG], truncate="right")
    assert enc["input_ids"].shape[1] <= 64
    with pytest.raises(LitSahsError, match="max_new_tokens"):  # fits alone, not with 30 new tokens
        encode_prompts(short_llava, ["word " * 40], reserve=30)


def test_memory_is_bounded_by_the_batch(short_llava, detector, monkeypatch, tmp_path):
    """score_file: every forward holds at most batch_size prompts of at most the context's length."""
    import lit_sahs.hooks as hooks
    from lit_sahs.evaluate import score_file

    shapes = []
    real = hooks.capture_forward

    def recording(target, enc, heads, **kw):
        shapes.append(tuple(enc["input_ids"].shape))
        return real(target, enc, heads, **kw)

    monkeypatch.setattr(hooks, "capture_forward", recording)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": i % 2} for i, t in
                                              enumerate(["hi", LONG, LONGER, "what is rain?", LONG + " again"])])
    report = score_file(str(detector), str(data), target=short_llava, batch_size=2, truncate="left")
    assert report["overall"]["n"] == 5 and len(shapes) == 3
    assert max(b for b, _ in shapes) <= 2 and max(t for _, t in shapes) <= 64


def _file(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"id": "short", "text": "What is rain?", "label": 0},
                                              {"id": "long1", "text": HUGE, "label": 1},
                                              {"id": "long2", "text": "x " + HUGE, "label": 0}])


def _no_forward(monkeypatch):
    """Every command's forward runs under a HeadCapture: entering one is the first forward."""
    from lit_sahs.hooks import HeadCapture

    def refuse(*a, **k):
        raise AssertionError("a forward ran before the prompt lengths were checked")

    monkeypatch.setattr(HeadCapture, "__enter__", refuse)


def _error(err):
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "long1 (" in last and "long2 (" in last and "short (" not in last
    assert "longer than the target's context of 4096 tokens" in last and "--truncate" in last
    return last


def test_evaluate_data_refuses_long_prompts_before_the_first_forward(detector, mlflow_workdir, tmp_path, cli,
                                                                     monkeypatch):
    data = _file(tmp_path)
    with monkeypatch.context() as m:
        _no_forward(m)
        code, _, err = cli(["evaluate", "--detector", str(detector), "--data", str(data), "--json",
                            str(tmp_path / "r.json")])
    assert code == 2
    _error(err)
    assert not (tmp_path / "r.json").exists()
    code, _, err = cli(["evaluate", "--detector", str(detector), "--data", str(data), "--json",
                        str(tmp_path / "r.json"), "--truncate", "right", "--batch_size", "2"])
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["overall"]["n"] == 3


def test_screen_refuses_every_long_prompt_at_once_or_truncates(detector, tmp_path, cli, monkeypatch):
    data = _file(tmp_path)
    with monkeypatch.context() as m:
        _no_forward(m)
        code, _, err = cli(["screen", "--detector", str(detector), "--data", str(data), "--batch_size", "1"])
    assert code == 2
    _error(err)
    code, out, err = cli(["screen", "--detector", str(detector), "--data", str(data), "--truncate", "left",
                          "--out", str(tmp_path / "s.jsonl")])
    assert code == 0, err[-2000:]
    assert [json.loads(l)["id"] for l in (tmp_path / "s.jsonl").read_text().splitlines()] == ["short", "long1", "long2"]


def test_guard_counts_the_new_tokens_and_truncates(detector, tmp_path, cli, monkeypatch):
    data = write_jsonl(tmp_path / "g.jsonl", [{"id": "near", "text": "word " * 4050}, {"id": "ok", "text": "hi"}])
    with monkeypatch.context() as m:
        _no_forward(m)
        code, _, err = cli(["guard", "--detector", str(detector), "--data", str(data), "--max_new_tokens", "60"])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "prompt near is" in last and "plus 60 new tokens" in last and "max_new_tokens" in last
    code, _, err = cli(["guard", "--detector", str(detector), "--data", str(data), "--max_new_tokens", "60",
                        "--truncate", "left", "--out", str(tmp_path / "g_out.jsonl")])
    assert code == 0, err[-2000:]
    assert len((tmp_path / "g_out.jsonl").read_text().splitlines()) == 2


def test_guard_fail_closed_warns_once_how_many_were_refused(tiny_llava, tmp_path, cli, caplog, monkeypatch):
    det = tiny_detector(tiny_llava, tmp_path / "nan_det", nan=True)
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "text": t} for i, t in
                                              enumerate(["hello", "what is rain?", "tell me a joke"])])
    code, _, err = cli(["guard", "--detector", str(det), "--data", str(data), "--max_new_tokens", "2"])
    assert code == 2 and "NaN or inf" in err.strip().splitlines()[-1]  # such an artifact is refused on load
    # a detector that scores NaN at run time (here: the load check switched off) is failed closed
    import lit_sahs.artifact_format as fmt

    monkeypatch.setattr(fmt, "check_finite", lambda tensors, source: None)
    with caplog.at_level(logging.WARNING):
        code, out, err = cli(["guard", "--detector", str(det), "--data", str(data), "--max_new_tokens", "2",
                              "--batch_size", "2"])
    assert code == 0, err[-2000:]
    rows = [json.loads(l) for l in out.strip().splitlines()]
    assert [r["flagged"] for r in rows] == [True] * 3 and all(r["score"] is None for r in rows)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "3 of 3 prompts were refused" in warnings[0] and "NaN" in warnings[0]


def test_live_datamodule_refuses_long_prompts_before_any_batch(short_llava, tmp_path):
    from lit_sahs.data.datamodules import LiveActivationDataModule

    data = tmp_path / "p.jsonl"
    write_jsonl(data, [{"text": "hello there", "label": 0}, {"text": LONG, "label": 1}])
    with pytest.raises(LitSahsError, match="longer than the target's context of 64 tokens"):
        LiveActivationDataModule(short_llava, data=str(data), attacks="plain", all_heads=True)
