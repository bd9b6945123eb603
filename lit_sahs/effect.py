"""Causal safety heads: rank every (layer, head) by what switching it off does to refusal.

The refusal score is the mean, over harmful prompts, of the refusal probability at the prefill
(``lit_sahs.refusal``). A head's *effect* is the change of that score when the head is ablated
(``capture.HeadAblation``: zero, or its benign mean, at every position); safety heads are the
ones whose ablation lowers it most, i.e. the largest ``drop = -effect``.

Scoring every head by real ablation costs one forward per head and batch. The first-order
estimate (attribution patching) costs one forward and one backward per batch for *all* heads:
with ``x`` the input of a layer's attention output projection split into heads (what
``HeadAblation`` rewrites) and ``g`` the gradient of the summed refusal probability with respect
to it, ablating head h changes the score by about

    sum over positions and head_dim of (fill - x_h) * g_h      (fill = 0, or the head's mean)

``locate_by_effect`` estimates all heads this way, confirms the `confirm_top` best candidates by
real ablation and ranks those by their real effect (then the others by estimate); with `greedy`
it also builds a head set step by step, each time adding the candidate that lowers the refusal
score most given the heads already off (effects need not add up).
"""
from __future__ import annotations

import random
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import ABLATION_MODES, HeadAblation
from lit_sahs.ranking import HeadRanking
from lit_sahs.refusal import REFUSAL_OPENINGS, encode_batches, first_token_logits, refusal_probability, \
    refusal_scores, refusal_token_ids
from lit_sahs.targets import sites

Head = tuple[int, int]


# ---------------------------------------------------------------- first-order estimate

class _GradTap:
    """Forward pre-hooks that put every attention output projection's input in the autograd graph
    and keep it, so one backward gives the gradient with respect to every head's output."""

    def __init__(self, model):
        self._projs = sites.output_projections(model)
        self._handles: list = []
        self.inputs: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:  # nothing upstream is tracked (the first layer): x is exact as a leaf
                x = x.detach().requires_grad_(True)
            self.inputs[layer] = x
            return (x,) + tuple(args[1:])

        return hook

    def __enter__(self) -> "_GradTap":
        self.inputs.clear()
        self._handles = [p.register_forward_pre_hook(self._hook(l)) for l, p in enumerate(self._projs)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def first_order_effects(target, batches: Sequence[dict], token_ids: Sequence[int], mode: str = "zero",
                        means: Optional[torch.Tensor] = None) -> tuple[np.ndarray, float]:
    """(estimated effect [layers, heads] of ablating each head alone on the mean refusal score,
    the unablated mean refusal score), from one forward + backward per batch."""
    g = target.geometry
    L, H, D = g.num_layers, g.num_heads, g.head_dim
    if mode not in ABLATION_MODES:
        raise LitSahsError(f"unknown ablation mode {mode!r}: use one of {', '.join(ABLATION_MODES)}")
    fills = [0.0] * L if mode == "zero" else [_checked_means(means, g)[l].reshape(H * D) for l in range(L)]
    est = torch.zeros(L, H, dtype=torch.float64)
    total, n = 0.0, 0
    for batch in batches:
        with _GradTap(target.model) as tap, torch.enable_grad():
            p = refusal_probability(first_token_logits(target.model, batch), token_ids)
            xs = [tap.inputs[l] for l in range(L)]
            grads = torch.autograd.grad(p.sum(), xs, allow_unused=True)
        for l, (x, grad) in enumerate(zip(xs, grads)):
            if grad is None:
                continue
            fill = fills[l] if mode == "zero" else fills[l].to(x)
            delta = (fill - x.detach()) * grad  # [batch, seq, heads * head_dim]
            est[l] += delta.reshape(-1, H, D).sum((0, 2)).double().cpu()
        total += float(p.detach().double().sum())
        n += p.shape[0]
        del xs, grads, p
    return (est / max(n, 1)).numpy(), total / max(n, 1)


def _checked_means(means, geometry) -> torch.Tensor:
    shape = geometry.shape
    if means is None:
        raise LitSahsError("mean ablation needs every head's mean output: pass means [layers, heads, head_dim] "
                           "(from a store's benign rows, e.g. with --store)")
    means = torch.as_tensor(means, dtype=torch.float32)
    if tuple(means.shape) != shape:
        raise LitSahsError(f"means have shape {tuple(means.shape)}, need {shape} [layers, heads, head_dim]")
    return means


# ---------------------------------------------------------------- real ablation

def ablation_scorer(target, batches: Sequence[dict], token_ids: Sequence[int], mode: str = "zero",
                    means: Optional[torch.Tensor] = None) -> Callable[[Sequence[Head]], float]:
    """A function: heads -> mean refusal score with those heads ablated (no heads: unablated)."""
    full = _checked_means(means, target.geometry) if mode == "mean" else None

    def score(heads: Sequence[Head]) -> float:
        ablation = None
        if heads:
            hs = HeadSet(heads)
            m = torch.stack([full[l, h] for l, h in hs]) if full is not None else None
            ablation = HeadAblation(target.model, hs, mode, m, target.geometry)
        return float(np.mean(refusal_scores(target, batches, token_ids, ablation=ablation)))

    return score


def greedy_heads(score: Callable[[Sequence[Head]], float], candidates: Sequence[Head], k: int) -> list[dict]:
    """Grow a head set one head at a time: each step adds the candidate whose ablation, together
    with the heads already chosen, gives the lowest refusal score. One dict per step."""
    chosen: list[Head] = []
    steps = []
    for _ in range(min(k, len(candidates))):
        tried = [(score(chosen + [c]), c) for c in candidates if c not in chosen]
        best, head = min(tried)
        chosen.append(head)
        steps.append({"head": list(head), "refusal": best})
    return steps


# ---------------------------------------------------------------- correlation

def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------- the ranking

def effect_rows(estimate: np.ndarray, effects: dict[Head, float]) -> list[dict]:
    """Score rows best first: confirmed heads by real drop, then the others by estimated drop."""
    L, H = estimate.shape
    rows = []
    for l in range(L):
        for h in range(H):
            real = effects.get((l, h))
            rows.append({"layer": l, "head": h, "estimate": float(estimate[l, h]),
                         "effect": None if real is None else float(real), "confirmed": real is not None,
                         "drop": -float(real if real is not None else estimate[l, h])})
    return sorted(rows, key=lambda r: (not r["confirmed"], -r["drop"], r["layer"], r["head"]))


def locate_by_effect(target, texts: Sequence[str], mode: str = "zero", means: Optional[torch.Tensor] = None,
                     confirm_top: int = 16, greedy: int = 0, greedy_candidates: int = 8, batch_size: int = 8,
                     openings: Sequence[str] = REFUSAL_OPENINGS, meta: Optional[dict] = None, progress: bool = False):
    """Rank every head of `target` by its effect on the refusal score over the harmful `texts`
    (a ``HeadRanking`` with ``method="effect"``; see the module docstring)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise LitSahsError("locating heads by effect needs harmful prompts: none were given")
    if confirm_top < 0 or greedy < 0:
        raise LitSahsError(f"confirm_top ({confirm_top}) and greedy ({greedy}) must be >= 0")
    if greedy and greedy_candidates < greedy:
        raise LitSahsError(f"greedy_candidates ({greedy_candidates}) must be at least greedy ({greedy})")
    if target.is_vision_language:
        raise LitSahsError(f"locating by effect is text-only; {target.name!r} is a vision-language target")
    extra = dict(meta or {})
    where = extra.pop("prompts", {})
    t0 = time.perf_counter()
    token_ids = refusal_token_ids(target.tokenizer, openings)
    batches = encode_batches(target, texts, batch_size)
    estimate, base = first_order_effects(target, batches, token_ids, mode, means)
    t_est = time.perf_counter() - t0
    say = print if progress else (lambda *a, **k: None)
    say(f"first-order estimate of {estimate.size} heads on {len(texts)} prompts: {t_est:.1f} s "
        f"(unablated refusal score {base:.4f}); confirming the best {min(confirm_top, estimate.size)}", flush=True)
    flat = sorted(((float(estimate[l, h]), (l, h)) for l in range(estimate.shape[0])
                   for h in range(estimate.shape[1])))  # most negative (largest estimated drop) first
    score = ablation_scorer(target, batches, token_ids, mode, means)
    effects = {head: score([head]) - base for _, head in tqdm(flat[:confirm_top], desc="confirming heads",
                                                               unit="head", disable=None if progress else True,
                                                               dynamic_ncols=True, leave=False)}
    t_conf = time.perf_counter() - t0 - t_est
    say(f"confirmed {len(effects)} heads by real ablation: {t_conf:.1f} s", flush=True)
    steps = greedy_heads(score, [head for _, head in flat[:greedy_candidates]], greedy) if greedy else []
    confirmed = list(effects)
    info = {
        "method": "effect",
        "refusal": {"openings": list(openings), "token_ids": token_ids,
                    "tokens": [target.tokenizer.decode([t]) for t in token_ids],
                    "score": "probability mass of the refusal tokens at the first generated position, "
                             "mean over the harmful prompts"},
        "mode": mode,
        "estimate": "first order (attribution patching): sum over positions and head_dim of (fill - x) * grad",
        "prompts": {"n": len(texts), "texts": list(texts), **where},
        "base_refusal": base,
        "confirm_top": len(confirmed),
        "spearman_estimate_vs_real": spearman([estimate[h] for h in confirmed], [effects[h] for h in confirmed]),
        "pearson_estimate_vs_real": pearson([estimate[h] for h in confirmed], [effects[h] for h in confirmed]),
        "greedy": {"heads": [s["head"] for s in steps], "refusal": [s["refusal"] for s in steps],
                   "candidates": min(greedy_candidates, len(flat)) if greedy else 0},
        "batch_size": batch_size,
        "seconds": {"estimate": round(t_est, 3), "confirm": round(t_conf, 3),
                    "greedy": round(time.perf_counter() - t0 - t_est - t_conf, 3)},
        **extra,
    }
    info["metrics"] = {k: v for k, v in (("base_refusal", base),
                                         ("spearman_estimate_vs_real", info["spearman_estimate_vs_real"]),
                                         ("greedy_refusal", steps[-1]["refusal"] if steps else None))
                       if v is not None and np.isfinite(v)}
    return HeadRanking(target.fingerprint, effect_rows(estimate, effects), info, method="effect")


# ---------------------------------------------------------------- prompts

def harmful_prompts(store=None, harmful: Optional[str] = None, n_prompts: int = 32, seed: int = 0,
                    split: Optional[dict] = None) -> tuple[list[str], dict]:
    """(harmful prompt texts, where they came from): `n_prompts` drawn (seeded) from the packaged or
    file sources named in `harmful` (comma-separated), else from the train split of `store`
    (``split``: keyword arguments of ``split_rows``). Rows with images are skipped (text-only)."""
    from lit_sahs.data.protocol import names, split_rows
    from lit_sahs.data.sources import load_source

    if n_prompts < 1:
        raise LitSahsError(f"n_prompts must be >= 1, got {n_prompts}")
    if harmful:
        pool = []
        for name in names(harmful):
            pool += [s.text for s in load_source(name) if int(s.label) == 1 and not s.image]
        where = {"source": harmful}
    elif store is not None:
        rows = store.index()
        if not any(int(r["label"]) == 1 for r in rows):
            raise LitSahsError(f"store {store.path} has no harmful rows (label 1) to measure refusal on: "
                               "extract harmful prompts into it or give --harmful SOURCE")
        train = split_rows(rows, **(split or {}))["train"]
        pool = [rows[i]["text"] for i in train if int(rows[i]["label"]) == 1 and not rows[i].get("image")]
        where = {"source": f"store train split ({store.path})"}
    else:
        raise LitSahsError("locating by effect needs harmful prompts: give --store (its train split) or --harmful")
    pool = sorted(set(t for t in pool if t and t.strip()))
    if not pool:
        raise LitSahsError(f"no text-only harmful prompts in {where['source']}")
    random.Random(f"effect|{seed}").shuffle(pool)
    return pool[:n_prompts], {**where, "seed": seed, "available": len(pool)}


def effect_ranking(store: Optional[str], target: Optional[str], harmful: Optional[str], n_prompts: int, mode: str,
                   confirm_top: int, greedy: int, greedy_candidates: int, batch_size: int, seed: int, dtype: str,
                   device: str, split: dict):
    """What ``locate --by effect`` runs: load the target (default: the store's), draw the prompts,
    take the benign means for mean ablation from the store, and rank."""
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.targets import load_target

    if mode not in ABLATION_MODES:
        raise LitSahsError(f"unknown ablation mode {mode!r}: use one of {', '.join(ABLATION_MODES)}")
    st = ActivationStore.open(store) if store else None
    if target is None and st is None:
        raise LitSahsError("--by effect needs a target: give --target or --store (its target)")
    if mode == "mean" and st is None:
        raise LitSahsError("mean ablation takes each head's benign mean from a store: give --store")
    texts, where = harmful_prompts(st, harmful, n_prompts, seed, split)
    tgt = load_target(target or st.fingerprint.name, dtype=dtype, device=device)
    means = None
    if st is not None:
        st.fingerprint.check(tgt.fingerprint, "the store")
        if mode == "mean":
            from lit_sahs.ablate import benign_means

            means = benign_means(st, HeadSet.all(tgt.geometry)).reshape(tgt.geometry.shape)
    return locate_by_effect(tgt, texts, mode, means, confirm_top, greedy, greedy_candidates, batch_size,
                            meta={"prompts": where, "store": str(st.path) if st is not None else None}, progress=True)
