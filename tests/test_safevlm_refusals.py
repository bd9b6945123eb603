"""Refusal rates in generation (lit_sahs.safevlm.refusals) and the shipped configs' evaluation script."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lit_sahs.errors import LitSahsError
from lit_sahs.safevlm.refusals import (REFERENCE, groups_of, mc_accuracy, pick, refusal_rates,
                                       refusal_table)


def _row(text, label, family="plain"):
    return {"text": text, "label": label, "attack_family": family}


def _judge(texts, responses):  # a refusal is a response that starts with "no"
    return [r.startswith("no") for r in responses]


def test_groups_split_by_label_and_the_held_out_family():
    rows = [_row("a", 1), _row("b", 1, "dan"), _row("c", 0), _row("d", 0, "dan"), _row("e", 0, "dan")]
    g = groups_of(rows)
    assert [len(v) for v in g.values()] == [1, 1, 1, 2]
    assert [r["text"] for r in g["benign, in dan template"]] == ["d", "e"]


def test_pick_draws_the_same_rows_every_time_and_all_of_them_at_zero():
    groups = {"x": list(range(20)), "y": list(range(3))}
    assert pick(groups, 5) == pick(groups, 5)
    assert [len(v) for v in pick(groups, 5).values()] == [5, 3]
    assert pick(groups, 0) == groups


def test_refusal_rates_count_refusals_compare_benign_answers_and_score_the_questions():
    picked = {"harmful, held-out source": [_row("h1", 1), _row("h2", 1), _row("h3", 1), _row("h4", 1)],
              "benign, held-out sources": [_row("b1", 0), _row("b2", 0)]}
    mc = [("q1", "A"), ("q2", "B")]

    def unmodified(texts):  # refuses h1 only, answers the questions right
        return [("no" if t == "h1" else "ok " + t) if t[0] in "hb" else {"q1": "A.", "q2": "(B)"}[t] for t in texts], None

    def guard(texts):  # refuses every harmful prompt and b2; answers one question right
        out = [("no" if t[0] == "h" or t == "b2" else "ok " + t) if t[0] in "hb" else {"q1": "a", "q2": "C"}[t]
               for t in texts]
        return out, ["refuse" if o == "no" else "pass" for o in out]

    res = refusal_rates({REFERENCE: unmodified, "guard": guard}, picked, mc, _judge, log=lambda _: None, progress=False)
    assert res[REFERENCE]["harmful, held-out source"]["refused"] == 1
    assert res[REFERENCE]["harmful, held-out source"]["refusal_rate"] == 0.25
    assert res[REFERENCE]["openbookqa_accuracy"] == 1.0
    g = res["guard"]
    assert g["harmful, held-out source"]["refusal_rate"] == 1.0
    assert g["benign, held-out sources"] == {"n": 2, "refused": 1, "refusal_rate": 0.5, "refused_each": [False, True],
                                             "actions": {"pass": 1, "refuse": 1}, "same_answer_as_unmodified": 0.5}
    assert res[REFERENCE]["harmful, held-out source"]["refused_each"] == [True, False, False, False]
    assert g["openbookqa_accuracy"] == 0.5
    lines = refusal_table(res, list(picked))
    assert "| guard | 4/4 (1.00) | 1/2 (0.50) | 0.50 | 0.500 |" in lines
    assert f"| {REFERENCE} | 1/4 (0.25) | 0/2 (0.00) | (reference) | 1.000 |" in lines


def test_the_reference_condition_must_come_first():
    with pytest.raises(LitSahsError, match="must come first"):
        refusal_rates({"guard": lambda t: (t, None), REFERENCE: lambda t: (t, None)}, {}, [], _judge)


def test_mc_accuracy_reads_the_letter_and_refuses_mismatched_lengths():
    assert mc_accuracy(["(a) yes", " B", "I cannot", "D"], ["A", "B", "C", "C"]) == 0.5
    with pytest.raises(LitSahsError, match="one response per question"):
        mc_accuracy(["A"], ["A", "B"])


@pytest.mark.parametrize("config, extra, message", [
    ("configs/guard.yaml", [], "not a SafetyDataModule"),
    ("configs/no-such.yaml", [], "no such file"),
    ("configs/safevlm_stage2.yaml", ["--lora_tpr", "0.5,1.5"], "--lora_tpr: each share must lie in (0, 1)"),
    ("configs/safevlm_stage2.yaml", ["--answer_tpr", "half"], "--answer_tpr 'half': give comma-separated shares"),
])
def test_config_eval_refuses_a_config_it_cannot_read_in_one_line(tmp_path, config, extra, message):
    res = subprocess.run([sys.executable, "experiments/safevlm_config_eval.py", "--fit_config", config,
                          "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr
    assert not (tmp_path / "out").exists()


def test_config_eval_scores_the_configs_own_held_out_rows(tmp_path):
    """On tiny-llama: the artifacts of a stage-I and a gated stage-II fit, evaluated from the fit's config,
    on exactly the rows that config's split holds out (by label), every condition on every row."""
    from lit_sahs.engine import Engine
    from lit_sahs.safevlm import SafeVLM, SafetyDataModule
    from lit_sahs.targets import load_target

    data = dict(harmful="advbench", benign="truthfulqa", attacks="plain,dan", limit=40, batch_size=8,
                max_answer_tokens=4, held_out={"families": ["dan"]}, answers=str(tmp_path / "answers.jsonl"))
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(json.dumps({"data": {"class_path": "lit_sahs.safevlm.SafetyDataModule",
                                        "init_args": {"target": "tiny-llama", **data}}}))
    from lit_sahs.data.holdout import Holdout

    split = {**data, "held_out": Holdout(families=["dan"])}
    dm = SafetyDataModule(target=load_target("tiny-llama"), num_safety_tokens=2, **split)
    Engine(output_dir=tmp_path / "one", max_epochs=1, enable_progress_bar=False).fit(
        SafeVLM(stage=1, num_safety_tokens=2, head_heads=2, lr=1e-2), dm)
    dm2 = SafetyDataModule(target=load_target("tiny-llama"), num_safety_tokens=2, **split)
    Engine(output_dir=tmp_path / "two", max_epochs=1, enable_progress_bar=False).fit(
        SafeVLM(stage=2, init_from=str(tmp_path / "one" / "detector"), lora_rank=2, lr=1e-2, lora_tpr=0.5), dm2)
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "experiments/safevlm_config_eval.py", "--fit_config", str(cfg), "--heads", "",
                          "--stage1", str(tmp_path / "one" / "detector"), "--stage2", str(tmp_path / "two" / "detector"),
                          "--out", str(out), "--mc_n", "2", "--max_new_tokens", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    test = dm.split_rows("test")
    assert summary["groups"] == {"harmful, held-out jailbreak (dan)": sum(r["label"] == 1 for r in test),
                                 "benign, in dan template": sum(r["label"] == 0 for r in test)}
    assert list(summary["results"]) == [REFERENCE, "SafeVLM stage I (safevlm_stage1.yaml)",
                                        "SafeVLM stage II as shipped (safevlm_stage2.yaml, LoRA gated)",
                                        "SafeVLM stage II, adapter on for every prompt"]
    for cond in summary["results"].values():
        assert [cond[g]["n"] for g in summary["groups"]] == list(summary["groups"].values())
    assert summary["lora_threshold"] is not None
    # a stage II trained by another config (its training wraps play no part here) is named as asked, on the same groups
    wrapped = tmp_path / "wraps.yaml"
    wrapped.write_text(json.dumps({"data": {"class_path": "lit_sahs.safevlm.SafetyDataModule",
                                            "init_args": {"target": "tiny-llama", **data, "train_wraps": "inthewild"}}}))
    res = subprocess.run([sys.executable, "experiments/safevlm_config_eval.py", "--fit_config", str(wrapped), "--heads", "",
                          "--stage1", str(tmp_path / "one" / "detector"), "--stage2", str(tmp_path / "two" / "detector"),
                          "--out", str(tmp_path / "labelled"), "--mc_n", "2", "--max_new_tokens", "2", "--reference", "false",
                          "--conditions", "stage II", "--stage2_label", "wraps.yaml", "--lora_tpr", "0.5"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    labelled = json.loads((tmp_path / "labelled" / "results.json").read_text())
    assert labelled["groups"] == summary["groups"]
    # --lora_tpr at the share the artifact was fitted with recomputes its own gate from the guard's prefill scores
    moved = labelled["lora_gates"]["lora_tpr 0.5"]
    assert moved == pytest.approx(summary["lora_threshold"], abs=1e-6)
    assert list(labelled["results"]) == ["SafeVLM stage II (wraps.yaml, LoRA gated)",
                                         "SafeVLM stage II (wraps.yaml), adapter on for every prompt",
                                         f"SafeVLM stage II (wraps.yaml, LoRA gated at {moved:.3g}: 0.5 of val harmful above)"]
    # --groups runs only the groups asked for
    res = subprocess.run([sys.executable, "experiments/safevlm_config_eval.py", "--fit_config", str(cfg), "--heads", "",
                          "--stage1", str(tmp_path / "one" / "detector"), "--stage2", str(tmp_path / "two" / "detector"),
                          "--out", str(tmp_path / "harmful"), "--mc_n", "0", "--max_new_tokens", "2", "--reference", "false",
                          "--conditions", "as shipped", "--groups", "harmful"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    harmful = json.loads((tmp_path / "harmful" / "results.json").read_text())
    assert harmful["groups"] == {"harmful, held-out jailbreak (dan)": summary["groups"]["harmful, held-out jailbreak (dan)"]}
    assert harmful["results"]["SafeVLM stage II as shipped (safevlm_stage2.yaml, LoRA gated)"][
        "harmful, held-out jailbreak (dan)"]["refused_each"] == summary["results"][
        "SafeVLM stage II as shipped (safevlm_stage2.yaml, LoRA gated)"]["harmful, held-out jailbreak (dan)"]["refused_each"]
    # a --groups that matches no group is one error line, and no output directory is left behind
    res = subprocess.run([sys.executable, "experiments/safevlm_config_eval.py", "--fit_config", str(cfg), "--heads", "",
                          "--stage1", str(tmp_path / "one" / "detector"), "--stage2", str(tmp_path / "two" / "detector"),
                          "--out", str(tmp_path / "none"), "--groups", "no such group"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("error:") == 1  # beside the target's loading bar
    assert res.stderr.strip().splitlines()[-1].startswith("error: --groups 'no such group' matches no prompt group")
    assert not (tmp_path / "none").exists()
    # the draw of another target's artifacts is refused before anything is generated
    cfg.write_text(cfg.read_text().replace("tiny-llama", "smollm2-135m-instruct"))
    res = subprocess.run([sys.executable, "experiments/safevlm_config_eval.py", "--fit_config", str(cfg), "--heads", "",
                          "--stage1", str(tmp_path / "one" / "detector"), "--stage2", str(tmp_path / "two" / "detector"),
                          "--out", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "the artifacts are for ['tiny-llama']" in res.stderr
    assert not (tmp_path / "other").exists()


def test_guarded_reads_each_guards_own_decisions_batch_by_batch():
    import torch

    from lit_sahs.guarding import GuardResult
    from lit_sahs.safevlm.guard import SafeVLMResult
    from lit_sahs.safevlm.refusals import guarded

    def result(texts, cls, **kw):
        n = len(texts)
        return cls(ids=[str(i) for i in range(n)], prompts=list(texts), flagged=[t.startswith("bad") for t in texts],
                   scores=[0.5] * n, responses=[t.upper() for t in texts], sequences=torch.zeros(n, 1), threshold=0.5, **kw)

    class Plain:
        def generate(self, texts, max_new_tokens):
            return result(texts, GuardResult)

    class Hinting:
        def generate(self, texts, max_new_tokens):
            return result(texts, SafeVLMResult, actions=["hint" if t.startswith("bad") else "pass" for t in texts])

    texts = ["bad a", "good b", "bad c"]
    assert guarded(Plain(), texts, 4, 2) == (["BAD A", "GOOD B", "BAD C"], ["refuse", "pass", "refuse"])
    assert guarded(Hinting(), texts, 4, 2)[1] == ["hint", "pass", "hint"]


def test_the_larger_target_split_config_is_the_shipped_split_with_the_1_5b_target():
    """experiments/configs/safevlm_split_qwen1.5b.yaml (docs/results.md, "The safety-head guard on the larger target")
    loads through the generation script's reader and differs from configs/safevlm_stage2.yaml's draw and split in the
    target only, so its rows stay comparable with the 0.5B ones."""
    import runpy
    from pathlib import Path

    root = Path(__file__).parents[1]
    data_args = runpy.run_path(str(root / "experiments" / "safevlm_config_eval.py"), run_name="experiment")["data_args"]
    larger = data_args(str(root / "experiments" / "configs" / "safevlm_split_qwen1.5b.yaml"))
    shipped = data_args(str(root / "configs" / "safevlm_stage2.yaml"))
    assert larger.pop("target") == "qwen2.5-coder-1.5b-instruct" and shipped.pop("target") == "qwen2.5-coder-0.5b-instruct"
    assert larger == shipped
