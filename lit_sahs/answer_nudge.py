"""The answer side of a guard: a prompt its detector scores as clearly benign may not open its answer
with a refusal.

A guard's gate refuses prompts whose risk reaches its threshold. At the other end, prompts whose risk is
below ``answer_below`` are ones the detector is confident about; the target still refuses some of them
by itself (over-refusal: a benign request inside a jailbreak template, alarming words). For those rows
``AnswerNudge`` removes the refusal openings (``refusal.refusal_token_ids``) from the first generated
position only, so the answer starts with something else; every later position, and every other row,
decodes as before. It is a nudge, not a guarantee: a refusal that opens differently ("Unfortunately,
...") still gets through, which is why what it changes is measured with the generated-text judge.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from transformers import LogitsProcessor

from lit_sahs.refusal import refusal_token_ids


class AnswerNudge(LogitsProcessor):
    """Runs after the gate in generate's processor list. On its first call it reads the gate's per-row
    risk (`risk()`: a [B] tensor, NaN where scoring failed: left alone) and bans `token_ids` for the rows
    below `below`; later calls pass scores through. ``rows`` [B] bool says which rows it nudged."""

    def __init__(self, risk: Callable[[], torch.Tensor], below: float, token_ids: Sequence[int]):
        self.risk, self.below = risk, float(below)
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.rows: Optional[torch.Tensor] = None

    @classmethod
    def for_target(cls, target, risk: Callable[[], torch.Tensor], below: Optional[float]) -> Optional["AnswerNudge"]:
        return None if below is None else cls(risk, below, refusal_token_ids(target.tokenizer))

    def __call__(self, input_ids, scores):
        if self.rows is not None:
            return scores
        risk = self.risk().to(scores.device)
        self.rows = (risk < self.below) & ~torch.isnan(risk)
        banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[self.token_ids.to(scores.device)] = True
        return scores.masked_fill(self.rows[:, None] & banned[None, :], float("-inf"))
