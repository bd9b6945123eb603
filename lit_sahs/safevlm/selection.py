"""The number SafeVLM's checkpoints and early stopping are chosen by: refusals on held-out sources.

A guard is judged by what it flags (refuses or hints) at its threshold: harmful prompts it should
stop, benign ones it should answer. ``selection_margin`` = harmful flagged rate - benign flagged
rate, on the validation split (``SafetyDataModule(val_sources=...)``: sources never trained on).

The threshold cannot be calibrated on the benign rows it is judged on (their flagged rate would be
``target_fpr`` by construction), so it is cross-fitted over the validation's benign sources: each
benign source is judged at the threshold that flags ``target_fpr`` of the *other* benign sources'
rows (each weighing the same, as ``per_source_threshold``, the shipped threshold, weighs them), as an
unseen collection would be; the harmful rate is taken at each of those thresholds, and
both rates are averaged over the benign sources (each weighs the same). With one benign source
there is nothing to leave out: the threshold is calibrated on it, and the margin is the harmful
rate at the target FPR minus that FPR.

Stage II freezes the head, so ``selection_margin`` cannot move there; what moves is the language
model's own answer. ``answer_margin`` measures it from the validation forward the LM loss runs
anyway: the refusal-opening mass where the answer starts, harmful minus benign.
With a LoRA gate (``lora_tpr`` / ``lora_fpr``) ``gated_answer_margin`` takes each row's mass from the
model the gate ships (the adapter for rows at or above the gate, stage I's model for the rest; the
latter from a second, adapter-off forward).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_sahs.detectors.metrics import keep_share_threshold, weighted_threshold
from lit_sahs.errors import LitSahsError
from lit_sahs.refusal import refusal_probability
from lit_sahs.safevlm.forward import IGNORE_INDEX

NAN = float("nan")


def selection_margin(scores: Tensor, labels: Tensor, sources: Tensor, target_fpr: float) -> dict[str, float]:
    """{"margin", "harmful_flagged", "benign_flagged"} for risk `scores` [n], `labels` [n] (1 harmful)
    and `sources` [n] (any ids, e.g. indices of source names); NaN where a class is missing."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().long()
    sources = torch.as_tensor(sources).flatten().long()
    if not scores.shape == labels.shape == sources.shape:
        raise LitSahsError(f"selection_margin needs one label and one source per score, got {scores.numel()} scores, "
                           f"{labels.numel()} labels and {sources.numel()} sources")
    harmful, by_source = scores[labels == 1], _by_source(scores, labels, sources)
    if not harmful.numel() or not by_source:
        return {"margin": NAN, "harmful_flagged": NAN, "benign_flagged": NAN}
    if len(by_source) == 1:
        folds = [(by_source, next(iter(by_source.values())))]
    else:
        folds = [({o: v for o, v in by_source.items() if o != g}, by_source[g]) for g in by_source]
    h_rates, b_rates = [], []
    for calibrate_on, judged in folds:
        t = weighted_threshold(calibrate_on, target_fpr)
        b_rates.append(float((judged >= t).double().mean()))
        h_rates.append(float((harmful >= t).double().mean()))
    h, b = sum(h_rates) / len(h_rates), sum(b_rates) / len(b_rates)
    return {"margin": h - b, "harmful_flagged": h, "benign_flagged": b}


def _by_source(scores: Tensor, labels: Tensor, sources: Tensor, label: int = 0) -> dict[int, Tensor]:
    rows = labels == label
    return {int(g): scores[rows & (sources == g)] for g in sorted(set(sources[rows].tolist()))}


def per_source_threshold(scores: Tensor, labels: Tensor, sources: Tensor, target_fpr: float) -> float:
    """SafeVLM's level threshold: it flags `target_fpr` of the benign validation rows with every source
    weighing the same (``detectors.metrics.weighted_threshold``, the detectors' cross-fitted rule), so a
    large benign source does not set it alone. With ``val_sources`` these are sources never trained on:
    the held-out calibration the detectors get by cross-fitting, without fitting SafeVLM once per fold."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    return weighted_threshold(_by_source(scores, torch.as_tensor(labels).flatten().long(),
                                                torch.as_tensor(sources).flatten().long()), target_fpr)


def check_gate_shares(stage: int, lora_fpr: Optional[float], lora_tpr: Optional[float]) -> None:
    """SafeVLM's LoRA-gate settings: at most one, a share in (0, 1), and only in stage II."""
    for name, share in (("lora_fpr", lora_fpr), ("lora_tpr", lora_tpr)):
        if share is not None and (stage != 2 or not 0.0 < float(share) < 1.0):
            raise LitSahsError(f"{name} gates stage II's adapter: a share in (0, 1) in stage 2, got {share} in stage {stage}")
    if lora_fpr is not None and lora_tpr is not None:
        raise LitSahsError("the LoRA gate takes one rule: set lora_fpr (a benign share) or lora_tpr (a harmful share), not both")


def gate_threshold(scores: Tensor, labels: Tensor, sources: Tensor, lora_fpr: Optional[float] = None,
                   lora_tpr: Optional[float] = None) -> Optional[float]:
    """The risk at and above which stage II's adapter stays on (``safevlm.lora_gate``), from validation
    rows, every source weighing the same; None without a rule. `lora_fpr`: the risk that flags that share
    of the benign rows (``per_source_threshold``). `lora_tpr`: the highest risk that keeps the adapter for
    at least that share of the harmful rows. The benign rule follows the head's scores on alarming but
    innocent prompts, which can sit far below the test prompts' (half of them under 0.015 in one measured
    run, so nearly every prompt kept the adapter); the harmful rule follows the prompts the adapter is for."""
    if lora_fpr is None and lora_tpr is None:
        return None
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels, sources = torch.as_tensor(labels).flatten().long(), torch.as_tensor(sources).flatten().long()
    if lora_fpr is not None:
        return per_source_threshold(scores, labels, sources, float(lora_fpr))
    harmful = _by_source(scores, labels, sources, label=1)
    if not harmful:
        raise LitSahsError("lora_tpr calibrates the LoRA gate on harmful validation rows, and the validation split has none")
    return keep_share_threshold(harmful, float(lora_tpr))  # the harmful rows below it lose the adapter


def finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if not math.isnan(v)}


def answer_refusal(logits: Tensor, batch: dict, token_ids: Sequence[int]) -> Tensor:
    """[B] probability mass of refusal openings (``refusal.refusal_token_ids``) where each row's answer
    starts, at the batch's ``first_pos`` (``forward.with_slots``), from the logits [B, K, V] of its last K
    positions (``forward.answer_logits``); NaN for a row without an answer. This is what the language
    model itself would open with, the part of a stage-II refusal the frozen head cannot see."""
    first = batch["first_pos"].to(logits.device) - (batch["input_ids"].shape[1] - logits.shape[1])
    mass = refusal_probability(logits[torch.arange(logits.shape[0], device=logits.device), first], token_ids)
    answered = (batch["labels"] != IGNORE_INDEX).any(1).to(mass.device)
    return torch.where(answered, mass, torch.full_like(mass, NAN))


def answer_margin(refusal: Tensor, labels: Tensor) -> dict[str, float]:
    """{"answer_margin", "answer_refusal_harmful", "answer_refusal_benign"}: the mean refusal mass at the
    answer's start over harmful minus over benign validation rows (rows without an answer left out; NaN
    for a class without rows). Stage II's selection number: its LoRA moves the answers while the head
    (``selection_margin``) is frozen."""
    refusal = torch.as_tensor(refusal, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().long().to(refusal.device)
    ok = ~torch.isnan(refusal)
    h, b = (float(refusal[ok & (labels == c)].mean()) for c in (1, 0))  # the mean of no rows is NaN
    return {"answer_margin": h - b, "answer_refusal_harmful": h, "answer_refusal_benign": b}


def gated_answer_margin(on: Tensor, off: Tensor, scores: Tensor, labels: Tensor, gate: float) -> dict[str, float]:
    """``answer_margin`` of the model the gate ships: each row's refusal mass with the adapter (`on`) where
    its risk is at least `gate` (or unknown: the gate fails towards the adapter), else without it (`off`),
    as ``lora_gate.LoRAGate`` decodes. Keys prefixed ``gated_``. An ungated margin charges the adapter for
    every benign row it moves, though the gate keeps most of them from it."""
    on, off = (torch.as_tensor(t, dtype=torch.float64).flatten() for t in (on, off))
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().to(on.device)
    keep = (scores >= float(gate)) | torch.isnan(scores)
    picked = answer_margin(torch.where(keep, on, off.to(on.device)), labels)
    return {f"gated_{k}": v for k, v in picked.items()}
