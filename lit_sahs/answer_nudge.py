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

from lit_sahs.checks import ANSWER_OFF, answer_below_arg, answer_direction_arg
from lit_sahs.errors import LitSahsError
from lit_sahs.refusal import refusal_token_ids
from lit_sahs.refusal_direction import DirectionAblation, RefusalDirection

Direction = Union[None, str, Path, RefusalDirection]


def answer_settings(detector, answer_below=None, direction: Direction = None,
                    target=None) -> tuple[Optional[float], Optional[RefusalDirection]]:
    """A guard's answer side: (answer_below, refusal direction), each as given, else the detector's
    calibrated one (``lit_sahs.answer_cut``: ``detector.answer`` / ``detector.answer_direction``);
    ``"off"`` leaves the detector's unused. A direction acts on the rows ``answer_below`` picks, so it
    needs one; a path is loaded, and the direction must be `target`'s."""
    below = answer_below_arg(answer_below)
    direction = answer_direction_arg(direction, below)
    if below is None:
        below = (detector.answer or {}).get("answer_below")
    elif below == ANSWER_OFF:
        below = None
    if direction is None and below is not None:
        direction = detector.answer_direction
    if direction is None or direction == ANSWER_OFF:
        return below, None
    if below is None:
        raise LitSahsError("--answer_direction ablates the refusal direction for prompts scored below --answer_below: "
                           "set --answer_below too (or ship a calibrated cut: calibrate --answer_tpr)")
    loaded = direction if isinstance(direction, RefusalDirection) else RefusalDirection.load(direction)
    if target is not None:
        loaded.check(target)
    return float(below), loaded


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
