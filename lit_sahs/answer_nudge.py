"""The answer side of a guard: a prompt its detector scores as clearly benign may not open its answer
with a refusal.

A guard's gate refuses prompts whose risk reaches its threshold. At the other end, prompts whose risk is
below ``answer_below`` are ones the detector is confident about; the target still refuses some of them
by itself (over-refusal: a benign request inside a jailbreak template, alarming words). For those rows
``AnswerNudge`` removes the refusal openings (``refusal.refusal_token_ids``) from the first generated
position only, so the answer starts with something else; every later position, and every other row,
decodes as before. It is a nudge, not a guarantee: a refusal that opens differently ("Unfortunately,
...") still gets through, which is why what it changes is measured with the generated-text judge.

With a refusal direction (``answer_direction``, ``lit_sahs.refusal_direction``) the same rows also decode
every later position with that direction ablated, which reaches refusals the first-position ban does not
(a persona tag before "I'm sorry"). The guard enters the nudge as a context around ``generate``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from transformers import LogitsProcessor

from lit_sahs.checks import answer_direction_arg
from lit_sahs.refusal import refusal_token_ids
from lit_sahs.refusal_direction import DirectionAblation, RefusalDirection

Direction = Union[None, str, Path, RefusalDirection]


def load_answer_direction(direction: Direction, answer_below: Optional[float], target) -> Optional[RefusalDirection]:
    """A guard's ``answer_direction``: None, or a ``RefusalDirection`` (a path is loaded) fitted on `target`;
    it acts on the rows ``answer_below`` picks, so it needs one."""
    if answer_direction_arg(direction, answer_below) is None:
        return None
    loaded = direction if isinstance(direction, RefusalDirection) else RefusalDirection.load(direction)
    loaded.check(target)
    return loaded


class AnswerNudge(LogitsProcessor):
    """Runs after the gate in generate's processor list. On its first call it reads the gate's per-row
    risk (`risk()`: a [B] tensor, NaN where scoring failed: left alone) and bans `token_ids` for the rows
    below `below`; later calls pass scores through. ``rows`` [B] bool says which rows it nudged.
    `ablation`: a ``DirectionAblation`` hooked while the nudge is entered as a context; it acts on the
    nudged rows from the first decode step on."""

    def __init__(self, risk: Callable[[], torch.Tensor], below: float, token_ids: Sequence[int],
                 ablation: Optional[DirectionAblation] = None):
        self.risk, self.below = risk, float(below)
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.rows: Optional[torch.Tensor] = None
        self.ablation = ablation

    @classmethod
    def for_target(cls, target, risk: Callable[[], torch.Tensor], below: Optional[float],
                   direction: Optional[RefusalDirection] = None) -> Optional["AnswerNudge"]:
        if below is None:
            return None
        ablation = None if direction is None else DirectionAblation(target.model, direction)
        return cls(risk, below, refusal_token_ids(target.tokenizer), ablation)

    @staticmethod
    def entered(nudge: Optional["AnswerNudge"]):
        """The context a guard wraps ``generate`` in: the nudge's ablation hooks, or nothing."""
        return contextlib.nullcontext() if nudge is None or nudge.ablation is None else nudge.ablation

    def __call__(self, input_ids, scores):
        if self.rows is not None:
            return scores
        risk = self.risk().to(scores.device)
        self.rows = (risk < self.below) & ~torch.isnan(risk)
        if self.ablation is not None:
            self.ablation.rows = self.rows  # every later forward (the decode steps) ablates these rows
        banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[self.token_ids.to(scores.device)] = True
        return scores.masked_fill(self.rows[:, None] & banned[None, :], float("-inf"))
