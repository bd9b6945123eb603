"""Ablation: switch a HeadSet off during generation and measure what changes.

If the located safety heads are causal for refusal, ablating them should raise the attack success
rate (ASR: the share of harmful prompts the target does *not* refuse) far more than ablating as
many random heads, while benign answers stay close to the unablated ones.

For each configuration — no ablation, the top-k heads of a ranking, random k heads (several seeds;
drawn from the heads *outside* the top k) — in ``zero`` or ``mean`` mode (``hooks.HeadAblation``;
the mean is taken over the benign rows of the activation store), it reports

* ``asr``: share of harmful prompts not refused (greedy answers, judged by ``lit_sahs.judge``);
* on benign prompts, against the unablated answers: ``exact`` (share of answers identical token
  for token), ``prefix`` (mean share of the unablated answer's tokens reproduced before the first
  difference), ``ppl`` (perplexity of the unablated answers under the ablated target,
  teacher-forced; the no-ablation row gives the floor) and ``benign_refused`` (over-refusal).

    python -m lit_sahs ablate --store stores/qwen-plain --ks 4,8,16 --modes zero,mean --seeds 3 \\
        --n_harmful 64 --n_benign 32 --max_new_tokens 48 --out experiments/results/ablation_qwen.md

Text-only prompts (vision-language targets can be ablated with ``HeadAblation`` directly).
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import ABLATION_MODES, HeadAblation
from lit_sahs.judge import Judge, judge_responses, load_judge
from lit_sahs.generation import greedy_answers
from lit_sahs.targets import Target, prompting


# ---------------------------------------------------------------- means and configurations

def benign_means(store, heads: HeadSet, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Mean activation [k, head_dim] of `heads` over the store's benign rows (or the given rows)."""
    from lit_sahs.data.store import ActivationStore

    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    if rows is None:
        rows = np.flatnonzero(store.labels() == 0)
    if len(rows) == 0:
        raise LitSahsError(f"store {store.path} has no benign rows to take the ablation mean from")
    x = store.read(heads, rows=rows).astype(np.float64)
    return torch.from_numpy(x.mean(axis=0)).float()


@dataclass(frozen=True)
class AblationConfig:
    """One row of the table: which heads, how, and (for random heads) the seed."""

    name: str
    heads: Optional[HeadSet] = None  # None: no ablation
    mode: str = "zero"
    kind: str = "none"  # none | top | effect | greedy | random | heads
    seed: Optional[int] = None

    @property
    def k(self) -> int:
        return len(self.heads) if self.heads is not None else 0


def random_heads(geometry, k: int, seed: int, exclude: Sequence[tuple[int, int]] = ()) -> HeadSet:
    """k heads drawn uniformly (seeded) from all heads not in `exclude`."""
    pool = [(l, h) for l in range(geometry.num_layers) for h in range(geometry.num_heads) if (l, h) not in set(exclude)]
    if k > len(pool):
        raise LitSahsError(f"cannot draw {k} random heads from {len(pool)} heads outside the top set")
    return HeadSet(sorted(random.Random(f"ablate|{seed}|{k}").sample(pool, k)))


def study_configs(ranking, ks: Sequence[int], modes: Sequence[str], seeds: int, geometry,
                  random_modes: Optional[Sequence[str]] = None, effect=None) -> list[AblationConfig]:
    """none; top-k of `ranking` and of the `effect` ranking (``locate --by effect``; with its greedy
    set) for each k and mode; random-k (outside those top k) for each k, mode and seed."""
    for m in list(modes) + list(random_modes or []):
        if m not in ABLATION_MODES:
            raise LitSahsError(f"unknown ablation mode {m!r}: use {', '.join(ABLATION_MODES)}")
    random_modes = list(modes) if random_modes is None else list(random_modes)
    configs = [AblationConfig("none")]
    for k in ks:
        sets = [(name, r.top_k(k)) for name, r in (("top", ranking), ("effect", effect)) if r is not None]
        configs += [AblationConfig(f"{name}-{k} {m}", hs, m, name) for name, hs in sets for m in modes]
        outside = tuple(dict.fromkeys(h for _, hs in sets for h in hs))
        for m in random_modes:
            for s in range(seeds):
                configs.append(AblationConfig(f"random-{k} {m} s{s}", random_heads(geometry, k, s, outside),
                                              m, "random", s))
    greedy = (effect.meta.get("greedy") or {}).get("heads") if effect is not None else None
    configs += [AblationConfig(f"greedy-{len(greedy)} {m}", HeadSet(greedy), m, "greedy") for m in modes if greedy]
    return configs


# ---------------------------------------------------------------- generation and scoring

def generate_answers(target: Target, texts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16,
                     ablation: Optional[HeadAblation] = None) -> list[list[int]]:
    """Greedy answers (token ids, trimmed after EOS), under `ablation` when given."""
    return greedy_answers(target, texts, max_new_tokens, batch_size, by_length=True, during=ablation)


@torch.no_grad()
def answer_nll(target: Target, texts: Sequence[str], answers: Sequence[Sequence[int]], batch_size: int = 16,
               ablation: Optional[HeadAblation] = None) -> tuple[float, int]:
    """(summed NLL, token count) of `answers` given their prompts, teacher-forced, under `ablation`.

    Each row is prompt + answer, left-padded so every answer ends in the last column; the LM head
    runs only on the last max(answer)+1 positions."""
    total, count = 0.0, 0
    pad = target.tokenizer.pad_token_id
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]) + len(answers[i]), i))
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start:start + batch_size] if len(answers[i]) > 0]
        if not idx:
            continue
        enc = prompting.encode(target, [texts[i] for i in idx])
        rows = [enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist() + list(answers[i])
                for b, i in enumerate(idx)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
        a_max = max(len(answers[i]) for i in idx)
        with ablation if ablation is not None else nullcontext():
            logits = target.model(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                                  position_ids=prompting.position_ids_from_mask(mask).to(target.device),
                                  use_cache=False, logits_to_keep=a_max + 1).logits
        # logits[:, j] predicts the token in column width - a_max - 1 + j + 1
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        labels = ids[:, width - a_max:].to(logp.device)
        nll = -logp.gather(-1, labels[..., None]).squeeze(-1)
        for b, i in enumerate(idx):
            n = len(answers[i])
            total += float(nll[b, a_max - n:].sum())
            count += n
    return total, count


def agreement(base: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(share of answers identical, mean share of each base answer reproduced before the first difference)."""
    exact, prefix = [], []
    for a, b in zip(base, other):
        exact.append(list(a) == list(b))
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        prefix.append(n / max(len(a), 1))
    return float(np.mean(exact)), float(np.mean(prefix))


# ---------------------------------------------------------------- the study

def run_study(target: Target, harmful: Sequence[str], benign: Sequence[str], configs: Sequence[AblationConfig],
              store=None, judge: Optional[Judge] = None, max_new_tokens: int = 48, batch_size: int = 16,
              progress: bool = True) -> list[dict]:
    """One result dict per configuration (the first must be the unablated one)."""
    if not harmful or not benign:
        raise LitSahsError("the ablation study needs harmful prompts (ASR) and benign prompts (utility)")
    if not configs or configs[0].heads is not None:
        raise LitSahsError("the first configuration must be the unablated one ('none')")
    judge = judge or load_judge()
    decode = lambda ids: target.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    results, base_benign = [], None
    for cfg in configs:
        t0 = time.perf_counter()
        ablation = None
        if cfg.heads is not None:
            if cfg.mode == "mean" and store is None:
                raise LitSahsError("mean ablation needs a store (the benign mean comes from it)")
            means = benign_means(store, cfg.heads) if cfg.mode == "mean" else None
            ablation = HeadAblation(target.model, cfg.heads, cfg.mode, means, target.geometry)
        h_ans = generate_answers(target, harmful, max_new_tokens, batch_size, ablation)
        b_ans = generate_answers(target, benign, max_new_tokens, batch_size, ablation)
        if base_benign is None:
            base_benign = b_ans
        h_text, b_text = [decode(a) for a in h_ans], [decode(a) for a in b_ans]
        h_refused = judge_responses(judge, harmful, h_text)
        b_refused = judge_responses(judge, benign, b_text)
        nll, n = answer_nll(target, benign, base_benign, batch_size, ablation)
        exact, prefix = agreement(base_benign, b_ans)
        row = {"config": cfg.name, "kind": cfg.kind, "mode": cfg.mode if cfg.heads is not None else "-",
               "k": cfg.k, "seed": cfg.seed, "heads": cfg.heads.to_list() if cfg.heads is not None else [],
               "asr": 1.0 - float(np.mean(h_refused)), "benign_refused": float(np.mean(b_refused)),
               "exact": exact, "prefix": prefix, "ppl": math.exp(nll / max(n, 1)),
               "n_harmful": len(harmful), "n_benign": len(benign), "seconds": round(time.perf_counter() - t0, 1),
               "examples": {"harmful": h_text[:3], "benign": b_text[:2]}}
        results.append(row)
        if progress:
            print(f"{cfg.name:24s} ASR {row['asr']:.3f}  benign exact {exact:.3f} prefix {prefix:.3f} "
                  f"ppl {row['ppl']:.3f} refused {row['benign_refused']:.3f}  ({row['seconds']} s)", flush=True)
    return results


def summarise(results: Sequence[dict]) -> list[dict]:
    """Random-head rows averaged over seeds (mean and min-max of ASR); other rows as they are."""
    out, groups = [], {}
    for r in results:
        if r["kind"] == "random":
            groups.setdefault((r["k"], r["mode"]), []).append(r)
        else:
            out.append({**r, "seeds": 1})
    for (k, mode), rs in groups.items():
        asr = [r["asr"] for r in rs]
        out.append({"config": f"random-{k} {mode}", "kind": "random", "mode": mode, "k": k, "seeds": len(rs),
                    "asr": float(np.mean(asr)), "asr_range": (min(asr), max(asr)),
                    **{m: float(np.mean([r[m] for r in rs])) for m in ("benign_refused", "exact", "prefix", "ppl")}})
    kind_order = {"none": 0, "top": 1, "heads": 1, "effect": 1, "greedy": 1, "random": 2}
    return sorted(out, key=lambda r: (r["k"], r["mode"] if r["kind"] != "none" else "", kind_order[r["kind"]]))


def format_table(results: Sequence[dict]) -> str:
    lines = ["| ablation | k | mode | ASR (harmful not refused) | benign exact match | benign prefix kept | "
             "ppl of unablated answers | benign refused |", "|---|---|---|---|---|---|---|---|"]
    for r in summarise(results):
        asr = f"{r['asr']:.3f}"
        if r.get("asr_range"):
            lo, hi = r["asr_range"]
            asr += f" ({lo:.3f}–{hi:.3f}, {r['seeds']} seeds)"
        name = r["config"].split(" ")[0]
        lines.append(f"| {name} | {r['k']} | {r['mode']} | {asr} | {r['exact']:.3f} | {r['prefix']:.3f} | "
                     f"{r['ppl']:.3f} | {r['benign_refused']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- prompts

def held_out_prompts(source: str, n: int, exclude_texts: set[str], seed: int = 0) -> list[str]:
    """n prompts of a packaged source (or file:path), seeded, skipping texts in `exclude_texts`
    (normalised), e.g. every prompt the store (and so the ranking) was built from."""
    from lit_sahs.data.samples import normalise_text
    from lit_sahs.data.sources import load_source

    pool = [s.text for s in load_source(source) if normalise_text(s.text) not in exclude_texts]
    if len(pool) < n:
        raise LitSahsError(f"source {source!r} has only {len(pool)} prompts outside the store; ask for fewer")
    random.Random(f"ablate|{seed}|{source}").shuffle(pool)
    return pool[:n]


def _split_quota(names: Sequence[str], n: int) -> list[int]:
    q = [n // len(names)] * len(names)
    for i in range(n - sum(q)):
        q[i] += 1
    return q


def gather(names: Sequence[str], n: int, exclude: set[str], seed: int) -> list[str]:
    out = []
    for name, q in zip(names, _split_quota(names, n)):
        out += held_out_prompts(name, q, exclude, seed)
    return out
