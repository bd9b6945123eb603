"""The shipped SafeVLM configs' artifacts in generation: how often the artifacts that
``fit --config configs/safevlm_heads.yaml / safevlm_stage1.yaml / safevlm_stage2.yaml`` wrote refuse
the prompts their own fit held out, against the unmodified target, on that fit's own draw and split.

    python experiments/safevlm_config_eval.py --fit_config configs/safevlm_stage2.yaml \\
        --out experiments/results/safevlm-configs-generation

Groups: the config's test split (its held-out jailbreak family, applied to every source), harmful and
benign; and, where the config names them, the validation-only sources (never trained on, but the fit chose its checkpoints and
calibrated its thresholds and LoRA gate on them: read those rows as a check, not a test). Conditions:
the unmodified target; the safety-head guard; SafeVLM stage I; stage II as shipped (its LoRA adapter
gated by the artifact's own ``lora_threshold``); stage II with the adapter on for every prompt.
Refusal: the phrase judge. Utility: OpenBookQA (``--mc_n`` questions). Writes <out>/results.json and
<out>/results.md.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from lit_sahs.commands import script_main
from lit_sahs.errors import LitSahsError
from lit_sahs.safevlm.refusals import (REFERENCE, groups_of, guarded, mc_questions, pick, plain_generate,
                                       refusal_rates, refusal_table)


def data_args(config: str) -> dict:
    """The SafetyDataModule arguments of a fit config (``data.init_args``), or one error."""
    import yaml

    path = Path(config)
    if not path.is_file():
        raise LitSahsError(f"--fit_config {config}: no such file")
    cfg = yaml.safe_load(path.read_text()) or {}
    data = cfg.get("data") or {}
    if not str(data.get("class_path", "")).endswith("SafetyDataModule"):
        raise LitSahsError(f"--fit_config {config}: its data is not a SafetyDataModule (a SafeVLM fit config is needed)")
    return dict(data.get("init_args") or {})


def val_groups(rows) -> dict[str, list]:
    return {"harmful, validation-only sources": [r for r in rows if r["label"] == 1],
            "benign, validation-only sources": [r for r in rows if r["label"] == 0]}


def shares(text: str, option: str) -> list[float]:
    """Comma-separated shares in (0, 1), or one error naming `option`."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LitSahsError(f"{option} {text!r}: give comma-separated shares in (0, 1), e.g. 0.75,0.9") from None
    if any(not 0.0 < x < 1.0 for x in out):
        raise LitSahsError(f"{option}: each share must lie in (0, 1), got {text}")
    return out


def val_scores(det, target, val_rows, batch_size: int) -> list[float]:
    """The guard's own prefill risk of every validation row (NaN where scoring failed)."""
    guard = det.make_guard(target, threshold=1.01)  # score only: nothing flagged, one token
    scores = []
    for i in range(0, len(val_rows), batch_size):
        scores += guard.generate([r["text"] for r in val_rows[i:i + batch_size]], max_new_tokens=1).scores
    return [float("nan") if s is None else s for s in scores]


def calibrated_risk(scores: list[float], val_rows, share: float) -> float:
    """The highest risk that keeps `share` of the validation harmful rows at or above it, every source
    weighing the same (the rule of stage II's ``lora_tpr`` gate), from `val_scores`."""
    from lit_sahs.safevlm.selection import gate_threshold

    sources = sorted({r["source"] for r in val_rows})
    return float(gate_threshold(scores, [r["label"] for r in val_rows], [sources.index(r["source"]) for r in val_rows],
                                lora_tpr=share))


def stage_conditions(conditions: dict, dets: dict, base, stage2_label: str, gen):
    """Add stage I's and stage II's rows (gated as shipped and, with a gate, the adapter on for every prompt)
    to `conditions`; returns stage II's own copy of the target."""
    from lit_sahs.safevlm.guard import SafeVLMGuard
    from lit_sahs.targets import load_target

    tuned = load_target(base.fingerprint.name)  # stage II puts its LoRA weights into its own copy
    gate = float(dets["stage2"].lora_threshold)
    conditions["SafeVLM stage I (safevlm_stage1.yaml)"] = gen(dets["stage1"].make_guard(base))
    two = f"SafeVLM stage II ({stage2_label}" if stage2_label else "SafeVLM stage II as shipped (safevlm_stage2.yaml"
    conditions[two + (", LoRA gated)" if math.isfinite(gate) else ")")] = gen(dets["stage2"].make_guard(tuned))
    if math.isfinite(gate):
        every = f"SafeVLM stage II ({stage2_label}), adapter on for every prompt" if stage2_label else \
            "SafeVLM stage II, adapter on for every prompt"
        conditions[every] = gen(SafeVLMGuard(tuned, dets["stage2"], lora_threshold=0.0))
    return tuned


def run(fit_config: str = "configs/safevlm_stage2.yaml", heads: str = "artifacts/safevlm-heads/detector",
        stage1: str = "artifacts/safevlm-stage1/detector", stage2: str = "artifacts/safevlm-stage2/detector",
        out: str = "experiments/results/safevlm-configs-generation", eval_n: int = 0, mc_n: int = 40,
        max_new_tokens: int = 20, batch_size: int = 4, threads: int = 0, answer_tpr: str = "",
        conditions: str = "", reference: bool = True, stage2_label: str = "", groups: str = "",
        lora_tpr: str = "", answer_direction: str = "", heads_label: str = "") -> int:
    """The shipped configs' artifacts against the unmodified target, in generation, on their fit's split.

    Args:
        fit_config: a SafeVLM fit config (its data section defines the draw and the split)
        heads: the safety-head detector artifact (safevlm_heads.yaml's output; empty: skip the guard row)
        stage1: the stage-I SafeVLM artifact
        stage2: the stage-II SafeVLM artifact
        out: output directory (results.json, results.md)
        eval_n: prompts per group (0: every prompt of the group)
        mc_n: OpenBookQA questions (utility)
        max_new_tokens: greedy tokens per answer
        batch_size: prompts per generate call
        threads: torch CPU threads (0: torch's default)
        answer_tpr: comma-separated shares; each adds the safety-head guard and the shipped stage II with
            ``answer_below`` set to the highest risk that keeps that share of the validation harmful rows
            at or above it (every source weighing the same), so at most the rest of them are nudged
        conditions: comma-separated substrings; only conditions whose name contains one of them run
            (and the unmodified target, which the others are compared with, unless --reference false)
        reference: run the unmodified target (false: its rows are in an earlier run on the same draw)
        stage2_label: what the stage II rows are called when --stage2 is not the shipped config's artifact
            (e.g. the config that trained it); empty: "as shipped (safevlm_stage2.yaml)"
        lora_tpr: comma-separated shares; each adds stage II with its LoRA gate moved to the highest risk that
            keeps that share of the validation harmful rows at or above it (the rule ``lora_tpr`` fits with,
            here from the guard's own prefill scores), beside the artifact's own gate
        answer_direction: a refusal direction file (``python -m lit_sahs direction``); each --answer_tpr share
            also adds both guards with that direction ablated while the nudged prompts decode
        groups: comma-separated substrings; only the prompt groups whose name contains one of them run
            (e.g. "validation-only"); empty: every group
        heads_label: what the safety-head guard row is called when --heads is not the shipped config's
            artifact (e.g. "calibrated answer side"); empty: "safevlm_heads.yaml"
    """
    args = dict(locals())
    conditions_, groups_ = conditions, groups
    gate_shares, answer_shares = shares(lora_tpr, "--lora_tpr"), shares(answer_tpr, "--answer_tpr")
    import torch

    from lit_sahs.artifact import load_detector
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.judge import PhraseJudge
    from lit_sahs.safevlm import SafetyDataModule
    from lit_sahs.safevlm.guard import SafeVLMGuard
    from lit_sahs.targets import load_target

    if threads:
        torch.set_num_threads(threads)
    init = data_args(fit_config)
    if bool(stage1) != bool(stage2):
        raise LitSahsError("give --stage1 and --stage2, or neither (empty: the safety-head guard's rows only)")
    if not (stage2 or heads):
        raise LitSahsError("nothing to evaluate: give --heads or --stage1 and --stage2")
    if not stage2 and (gate_shares or "stage" in conditions_):
        raise LitSahsError("--lora_tpr and the stage conditions need --stage1 and --stage2")
    dets = {"stage1": load_detector(stage1), "stage2": load_detector(stage2)} if stage2 else {}
    if stage2 and not dets["stage2"].lora:
        raise LitSahsError(f"--stage2 {stage2}: a stage-I artifact (no LoRA adapter); pass the stage-II one")
    if gate_shares and not math.isfinite(float(dets["stage2"].lora_threshold)):
        raise LitSahsError(f"--lora_tpr: {stage2} has no LoRA gate to move (its adapter is on for every prompt)")
    if heads:
        dets["heads"] = load_detector(heads)
    names = {d.fingerprint.name if d.fingerprint else None for d in dets.values()}
    if names != {init.get("target")}:
        raise LitSahsError(f"the artifacts are for {sorted(map(str, names))}, the config's data for {init.get('target')!r}")
    init["held_out"] = Holdout(**(init.get("held_out") or {}))
    init["compliant_answers"], init["train_wraps"] = 0, []  # training rows play no part here: do not build them
    families = init["held_out"].families
    if len(families) != 1 or init["held_out"].sources:
        raise LitSahsError(f"--fit_config {fit_config}: the test split must hold out one jailbreak family and no source")
    t0 = time.time()
    base = load_target(init.pop("target"))
    slots = int(dets["stage1"].hparams.num_safety_tokens) if stage2 else 1  # the draw and split do not depend on it
    dm = SafetyDataModule(target=base, num_safety_tokens=slots, **init)
    dm.setup()
    test = {g: rs for g, rs in groups_of(dm.split_rows("test"), families[0]).items() if rs}
    groups = {**test, **(val_groups(dm.split_rows("val")) if init.get("val_sources") else {})}
    wanted_groups = [g.strip() for g in groups_.split(",") if g.strip()]
    if wanted_groups:
        groups = {g: rs for g, rs in groups.items() if any(w in g for w in wanted_groups)}
        if not groups:
            raise LitSahsError(f"--groups {groups_!r} matches no prompt group of this split")
    picked = pick(groups, eval_n)
    mc = mc_questions(mc_n)

    def gen(guard):
        return lambda texts: guarded(guard, texts, max_new_tokens, batch_size)

    conditions = {REFERENCE: lambda texts: (plain_generate(base, texts, max_new_tokens, batch_size), None)}
    if heads:
        conditions[f"safety-head guard ({heads_label or 'safevlm_heads.yaml'})"] = gen(dets["heads"].make_guard(base))
    tuned = stage_conditions(conditions, dets, base, stage2_label, gen) if stage2 else None
    gate = float(dets["stage2"].lora_threshold) if stage2 else math.inf
    val_rows = dm.split_rows("val")
    scored = {}  # each guard's validation risks, scored once for every share that needs them
    if gate_shares or answer_shares:
        scored["stage2"] = val_scores(dets["stage2"], tuned, val_rows, batch_size)
    if answer_shares and heads:
        scored["heads"] = val_scores(dets["heads"], base, val_rows, batch_size)
    gates = {}
    label = f"SafeVLM stage II ({stage2_label}" if stage2_label else "SafeVLM stage II (safevlm_stage2.yaml"
    for share in gate_shares:
        gates[f"lora_tpr {share:g}"] = t = calibrated_risk(scored["stage2"], val_rows, share)
        conditions[f"{label}, LoRA gated at {t:.3g}: {share:g} of val harmful above)"] = \
            gen(SafeVLMGuard(tuned, dets["stage2"], lora_threshold=t))
    answer_below = {}
    for share in answer_shares:
        for name, key, det, target in ((("safety-head guard", "heads", dets["heads"], base),) if heads else ()) + \
                ((("SafeVLM stage II as shipped", "stage2", dets["stage2"], tuned),) if stage2 else ()):
            below = calibrated_risk(scored[key], val_rows, share)
            answer_below[f"{name}, answer_below at {share:g} val harmful"] = below
            conditions[f"{name}, answers nudged below {below:.3g} ({share:g} of val harmful above)"] = \
                gen(det.make_guard(target, answer_below=below, answer_direction="off"))  # not an artifact's own
            if answer_direction:
                conditions[f"{name}, refusal direction ablated below {below:.3g} ({share:g} of val harmful above)"] = \
                    gen(det.make_guard(target, answer_below=below, answer_direction=answer_direction))
    if conditions_:
        wanted = [c.strip() for c in conditions_.split(",") if c.strip()]
        conditions = {k: v for k, v in conditions.items() if (k == REFERENCE and reference) or any(w in k for w in wanted)}
    results = refusal_rates(conditions, picked, mc, PhraseJudge(), log=lambda line: print(line, flush=True))
    summary = {"args": args, "target": base.fingerprint.name, "lora_threshold": gate if math.isfinite(gate) else None,
               "lora_gates": gates,
               "answer_below": answer_below,
               "groups": {g: len(rs) for g, rs in groups.items()}, "seconds": time.time() - t0, "results": results}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"The shipped SafeVLM configs' artifacts on {base.fingerprint.name}: refused / group size (phrase judge), "
             f"OpenBookQA accuracy (n={len(mc)}); test = the {families[0]} family over every source, validation-only "
             "sources = checkpoint and gate choice (not a test).", "", *refusal_table(results, list(groups))]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
