"""SafeVLM on a real packaged target: refusals on held-out harmful sources and jailbreak families,
benign answers kept, multiple-choice utility — for the unmodified target, SafeVLM stage I, stage II,
stage I with the safety-head detector's heads joined to its head (``--joined``), and the safety-head
logistic detector as a guard, all on the same split; and each one's held-out AUROC. ``--generate
false`` stops after the held-out AUROCs (no stage II, no generation).

    python experiments/safevlm_eval.py --target qwen2.5-coder-0.5b-instruct --out experiments/results/safevlm-qwen0.5b
    python experiments/safevlm_eval.py --target smollm2-135m-instruct --out experiments/results/safevlm-smollm2

Split (protocol.split_rows, one definition for every method): train on AdvBench, HarmBench and
Do-Not-Answer against TruthfulQA and MMLU questions, plain and PyRIT templates; held out: the
past-tense harmful source, the ShareGPT instructions and HealthSearchQA (sensitive-topic health
questions) benign sources, and the DAN jailbreak family (applied to every source). Refusal: the
product's phrase judge on the response. Utility: OpenBookQA multiple choice (letter answer, greedy),
a refused question counts as wrong. Writes <out>/results.json and <out>/results.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from lit_sahs.commands import script_main
from lit_sahs.safevlm.refusals import (groups_of, guarded, mc_questions, pick, plain_generate, refusal_rates,
                                       refusal_table)

HARMFUL = "advbench,harmbench,donotanswer,past_tense"
BENIGN = "truthfulqa,mmlu,healthsearchqa,sharegpt_instructions"
ATTACKS = "plain,pyrit,dan"
HELD_SOURCES = ["past_tense", "healthsearchqa", "sharegpt_instructions"]
HELD_FAMILIES = ["dan"]
STAGES = ("stage1", "stage1-joined", "stage2", "stage2-joined")  # output folders of each fitted stage


def gated_thresholds(det, target, dm, fprs, tprs=()) -> dict[str, float]:
    """{"<share> val benign": the risk at which `det`'s safety head flags that share of the validation split's
    benign rows, "<share> val harmful": the highest risk that keeps that share of its harmful rows}, every
    validation source weighing the same (``selection.gate_threshold``, the rules SafeVLM fits in-run)."""
    import torch

    from lit_sahs.safevlm.selection import gate_threshold

    det.attach(target)
    rows = dm.split_rows("val")
    names = sorted({r["source"] for r in rows})
    scores, labels = torch.as_tensor(det.split_scores(dm, "val")), torch.tensor([int(r["label"]) for r in rows])
    sources = torch.tensor([names.index(r["source"]) for r in rows])
    return {**{f"{f:g} val benign": gate_threshold(scores, labels, sources, lora_fpr=f) for f in fprs},
            **{f"{f:g} val harmful": gate_threshold(scores, labels, sources, lora_tpr=f) for f in tprs}}


def shares(name: str, value: str) -> list[float]:
    """Comma-separated shares in (0, 1) of option `name`, or one error line."""
    try:
        out = [float(f) for f in str(value).split(",") if f]
    except ValueError:
        raise SystemExit(f"error: --{name} takes shares in (0, 1), comma-separated, got {value!r}") from None
    if any(not 0.0 < f < 1.0 for f in out):
        raise SystemExit(f"error: --{name} takes shares in (0, 1), got {value!r}")
    return out


def selecting(monitor: str, history: list, patience: int = 1) -> list:
    """Checkpoint choice and early stopping on a validation number (the shipped configs' callbacks), and
    each validation epoch's selection numbers appended to `history`."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    class History(L.Callback):
        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                history.append({k: round(float(v), 6) for k, v in trainer.callback_metrics.items()
                                if k.startswith("val/") and ("margin" in k or "refusal" in k or k == "val/auroc")})

    return [ModelCheckpoint(monitor=monitor, mode="max", filename="best", enable_version_counter=False),
            EarlyStopping(monitor=monitor, mode="max", patience=patience), History()]


def run(out: str, target: str = "qwen2.5-coder-0.5b-instruct", limit: int = 240, max_chars: int = 400, tokens: int = 8,
        epochs1: int = 6, epochs2: int = 1, lora_rank: int = 16, lr1: float = 3e-3, lr2: float = 2e-4,
        eval_n: int = 24, mc_n: int = 60, max_new_tokens: int = 24, batch_size: int = 8, threads: int = 0,
        joined: bool = True, generate: bool = True, harmful: str = HARMFUL, benign: str = BENIGN,
        val_sources: str = "", plain: bool = True, benign_ratio: float = 1.0, compare: str = "", fit: bool = True,
        lora_fpr: str = "", lora_tpr: str = "", compliant: int = 0, stage1_from: str = "", guard: bool = True) -> int:
    """SafeVLM stage I and II against the unmodified target and the safety-head guard, on one split.

    Args:
        out: output directory (results.json, results.md, the trained artifacts)
        target: packaged target name
        limit: prompts drawn in all
        max_chars: longest attacked prompt
        tokens: safety tokens per set
        epochs1: stage I epochs
        epochs2: stage II epochs
        lora_rank: stage II LoRA rank
        lr1: stage I learning rate
        lr2: stage II learning rate
        eval_n: prompts per evaluation group
        mc_n: OpenBookQA questions (utility)
        max_new_tokens: greedy tokens per answer
        batch_size: prompts per batch (training, extraction, generation)
        threads: torch CPU threads (0: torch's default)
        joined: also fit stage I with the safety-head detector's heads joined to its safety head
        generate: run stage II and the generation groups (false: held-out AUROCs only)
        harmful: harmful sources (the held-out ones are added if missing)
        benign: benign sources (the held-out ones are added if missing)
        val_sources: validation-only sources (comma-separated, added to the draw); with them, stage I keeps
            its checkpoint with the best val/margin and stage II the best val/answer_margin (early stopping on
            each), as configs/safevlm_stage*.yaml do; without them, a random validation split, last epoch kept
        plain: fit stage I without joined heads (false, with --joined true: the joined heads only, and stage II
            starts from the joined stage I)
        benign_ratio: benign base prompts per harmful one in the draw (1: balanced, as every run so far)
        compare: earlier runs' output directories (comma-separated) whose final SafeVLM stages (stage II where it
            ran) are evaluated on this run's groups too, each on a fresh copy of the target: the groups change
            with the draw, so a run drawn differently is compared on the same prompts without fitting it again
        fit: fit the safety-head detector's comparison stages I and II (false: evaluate --compare's runs only,
            beside the unmodified target and the safety-head guard)
        lora_fpr: shares of the validation split's benign rows (comma-separated, e.g. 0.25,0.5): each stage II is
            also evaluated with its LoRA adapter gated by its own safety head (``lora_threshold``: the risk that
            flags that share of validation benign rows, sources weighing the same)
        lora_tpr: the same with the harmful-side rule: the highest risk that keeps the adapter for that share of the
            validation split's harmful rows (comma-separated, e.g. 0.8,0.9)
        compliant: sampled tries for benign training rows whose own greedy answer is a refusal
            (SafetyDataModule ``compliant_answers``; 0: train towards the greedy answers as they are)
        stage1_from: an earlier run's output directory whose stage I (``stage1`` or ``stage1-joined``, as --plain
            picks) stage II starts from, instead of fitting stage I here (same draw: stage II alone is compared)
        guard: evaluate the safety-head guard too
    """
    args = dict(locals())
    a = SimpleNamespace(**args)
    if a.fit and not (a.plain or a.joined):
        raise SystemExit("error: nothing to fit: --plain false needs --joined true")
    if not a.fit and not a.compare:
        raise SystemExit("error: nothing to evaluate: --fit false needs --compare")
    stage1_dir = Path(a.stage1_from) if a.stage1_from else Path(a.out)  # where stage I is (fitted or reused)
    earlier = {}  # condition name -> SafeVLM artifact of an earlier run (its final stages)
    for d in (Path(c) for c in str(a.compare).split(",") if c):
        found = {stage: d / stage / "detector" for stage in STAGES if (d / stage / "detector").is_dir()}
        if not found:
            raise SystemExit(f"error: --compare {d}: no trained stage in it (looked for {', '.join(STAGES)}/detector)")
        final = [s for s in found if s.startswith("stage2")] or list(found)
        earlier.update({f"{d.name}: {s}": found[s] for s in final})
    fprs, tprs = shares("lora_fpr", a.lora_fpr), shares("lora_tpr", a.lora_tpr)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from lit_sahs.artifact import load_detector
    from lit_sahs.data.datamodules import CachedActivationDataModule
    from lit_sahs.detectors import LogisticDetector
    from lit_sahs.engine import Engine
    from lit_sahs.detectors.guard import SafetyGuard
    from lit_sahs.judge import PhraseJudge
    from lit_sahs.pipeline import Prepare, ensure_ranking, ensure_store
    from lit_sahs.safevlm import SafeVLM, SafetyDataModule
    from lit_sahs.safevlm.guard import SafeVLMGuard
    from lit_sahs.targets import load_target

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.data.sources import HARMFUL_SOURCES

    val = [v for v in str(a.val_sources).split(",") if v]
    names = {"harmful": [h for h in a.harmful.split(",") if h], "benign": [b for b in a.benign.split(",") if b]}
    for extra in HELD_SOURCES + val:
        side = names["harmful" if extra in HARMFUL_SOURCES else "benign"]
        side += [] if extra in side else [extra]
    spec = dict(harmful=",".join(names["harmful"]), benign=",".join(names["benign"]), attacks=ATTACKS, limit=a.limit,
                max_chars=a.max_chars, seed=0)
    if a.benign_ratio != 1.0:  # only then: the balanced draw keeps its store name (one store per draw)
        spec["benign_ratio"] = a.benign_ratio
    split = dict(held_out=Holdout(families=HELD_FAMILIES, sources=HELD_SOURCES), val_sources=val)
    first = "stage1" if a.plain else "stage1-joined"  # stage II starts from it
    second = "stage2" if a.plain else "stage2-joined"
    history = {"stage1": [], "stage1-joined": [], second: []}
    stage1_cb, stage2_cb = ((selecting("val/margin", history["stage1"]), selecting("val/answer_margin", history[second]))
                            if val else ([], []))
    ckpt = {"enable_checkpointing": True} if val else {}

    # ---- the safety-head logistic detector on the same rows (first: joined heads start from it)
    t = time.time()
    import hashlib

    draw = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]  # one store per draw
    store = Path("stores") / f"safevlm-eval-{a.target}-{draw}"
    ensure_store(Prepare(target=a.target, batch_size=a.batch_size, **spec), str(store),
                 {"accelerator": "cpu", "devices": 1})
    ensure_ranking(str(store), str(store / "ranking.json"), HELD_FAMILIES, HELD_SOURCES, top_k=8)
    hdm = CachedActivationDataModule(str(store), ranking=str(store / "ranking.json"), top_k=8, batch_size=512, **split)
    heads = Engine(output_dir=out / "heads", max_epochs=15).fit(LogisticDetector(l2=1e-3, optimizer="lbfgs"), hdm).detector
    timings["heads_s"] = time.time() - t

    # ---- SafeVLM stage I (alone, and with the detector's heads joined) and II (on its own copy of the
    # target: LoRA goes into it)
    t = time.time()
    base = load_target(a.target)
    dm = SafetyDataModule(target=base, num_safety_tokens=a.tokens, batch_size=a.batch_size, compliant_answers=a.compliant,
                          **spec, **split)
    dm.setup()
    balance = dm.balance()  # rows per split by label, risk level and type, source, attack family
    timings["answers_s"] = time.time() - t
    n_layers = base.geometry.num_layers
    t = time.time()
    from lightning import seed_everything

    a.plain, a.joined, a.generate = (a.plain, a.joined, a.generate) if a.fit else (False, False, True)
    if a.stage1_from:  # stage I comes from the earlier run: fit neither here, evaluate only what is new (stage II)
        if not (stage1_dir / first / "detector").is_dir():
            raise SystemExit(f"error: --stage1_from {stage1_dir}: no {first}/detector in it")
        a.plain = a.joined = False
    if a.plain:
        seed_everything(0, verbose=False)  # the safety modules' initialisation: every run starts from the same one
        Engine(output_dir=out / "stage1", max_epochs=a.epochs1, enable_progress_bar=True, callbacks=stage1_cb,
               **ckpt).fit(SafeVLM(stage=1, num_safety_tokens=a.tokens, feature_layer=n_layers // 2, lr=a.lr1), dm)
        timings["stage1_s"] = time.time() - t
    if a.joined:
        t = time.time()
        seed_everything(0, verbose=False)
        Engine(output_dir=out / "stage1-joined", max_epochs=a.epochs1, enable_progress_bar=True,
               callbacks=selecting("val/margin", history["stage1-joined"]) if val else [], **ckpt).fit(
            SafeVLM(stage=1, num_safety_tokens=a.tokens, feature_layer=n_layers // 2, lr=a.lr1,
                    head_keys_init=str(out / "heads" / "detector")), dm)
        timings["stage1_joined_s"] = time.time() - t
    reports = {"safety-head detector (logistic, top-8)": ("heads", "heads")}
    if a.plain:
        reports["SafeVLM stage I"] = ("stage1", "safevlm")
    if a.joined:
        reports["SafeVLM stage I + joined heads"] = ("stage1-joined", "safevlm")
    if a.stage1_from:
        reports["SafeVLM stage I" + ("" if first == "stage1" else " + joined heads") + f" ({stage1_dir.name})"] = (first, "safevlm")
    held_out = {name: json.loads(((stage1_dir if d == first else out) / d / "report.json").read_text())[key]["overall"]
                for name, (d, key) in reports.items()}
    (out / "auroc.json").write_text(json.dumps({"target": a.target, "args": args, "timings_s": timings, "validation_by_epoch": history,
                                                "held_out": held_out, "balance": balance}, indent=1) + "\n")
    for name, rep in held_out.items():
        print(f"held-out {name}: n={rep.get('n')} AUROC={rep.get('auroc'):.3f} "
              f"TPR@1%FPR={rep.get('tpr_at_1fpr', float('nan')):.3f}", flush=True)
    if not a.generate:
        return 0
    if a.fit:
        t = time.time()
        tuned = load_target(a.target)
        dm2 = SafetyDataModule(target=tuned, num_safety_tokens=a.tokens, batch_size=a.batch_size,
                               compliant_answers=a.compliant, **spec, **split)
        seed_everything(0, verbose=False)
        Engine(output_dir=out / second, max_epochs=a.epochs2, enable_progress_bar=True, callbacks=stage2_cb, **ckpt).fit(
            SafeVLM(stage=2, init_from=str(stage1_dir / first / "detector"), lora_rank=a.lora_rank, lr=a.lr2), dm2)
        timings["stage2_s"] = time.time() - t

    # ---- evaluation
    groups = groups_of(dm.split_rows("test"))
    picked = pick(groups, a.eval_n)
    mc = mc_questions(a.mc_n)
    judge = PhraseJudge()
    def dm_for(tokens: int):  # the draw's rows with slots for `tokens` safety tokens (an earlier run's count)
        if tokens == a.tokens:
            return dm
        other = SafetyDataModule(target=base, num_safety_tokens=tokens, batch_size=a.batch_size, **spec, **split)
        other.setup()
        return other

    def gen(guard):
        return lambda texts: guarded(guard, texts, a.max_new_tokens, a.batch_size)

    conditions = {"unmodified target": lambda texts: (plain_generate(base, texts, a.max_new_tokens, a.batch_size), None)}
    if a.plain:
        conditions["SafeVLM stage I"] = gen(SafeVLMGuard(base, load_detector(out / "stage1" / "detector")))
    if a.joined:
        conditions["SafeVLM stage I + joined heads"] = gen(SafeVLMGuard(base, load_detector(out / "stage1-joined" / "detector")))
    label = "SafeVLM stage II" + ("" if second == "stage2" else " + joined heads") + (", compliant answers" if a.compliant else "")
    stage2 = {label: (tuned, load_detector(out / second / "detector"))} if a.fit else {}
    # earlier runs: a fresh target each (a stage II artifact puts its LoRA weights into it)
    stage2.update({name: (load_target(a.target), load_detector(path)) for name, path in earlier.items()})
    lora_thresholds = {}
    for name, (tgt, det) in stage2.items():
        conditions[name] = gen(SafeVLMGuard(tgt, det))
        if det.lora and (fprs or tprs):
            lora_thresholds[name] = gated_thresholds(det, tgt, dm_for(int(det.hparams.num_safety_tokens)), fprs, tprs)
            for rule, thr in lora_thresholds[name].items():
                conditions[f"{name}, LoRA gated at {rule}"] = gen(SafeVLMGuard(tgt, det, lora_threshold=thr))
    if a.guard:
        conditions["safety-head guard (logistic, top-8)"] = gen(SafetyGuard(base, heads))
    results = refusal_rates(conditions, picked, mc, judge, log=lambda line: print(line, flush=True))

    summary = {"target": a.target, "args": args, "timings_s": timings, "results": results, "held_out": held_out,
               "validation_by_epoch": history, "sources": spec, "balance": balance,
               "groups": {g: len(rs) for g, rs in groups.items()}, "lora_thresholds": lora_thresholds,
               **({"stage1_report": json.loads((stage1_dir / first / "report.json").read_text())["safevlm"]["overall"]}
                  if a.fit else {}),
               "heads_report": json.loads((out / "heads" / "report.json").read_text())["heads"]["overall"]}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"SafeVLM on {a.target}: refused / group size by group (phrase judge), benign answers equal to the "
             f"unmodified target's, OpenBookQA accuracy (n={len(mc)}).", "", *refusal_table(results, list(groups))]
    lines += ["", "Training rows: " + "; ".join(f"{key} {json.dumps(balance['train'][key])}"
                                                for key in ("label", "level", "type"))]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
