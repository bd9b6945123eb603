"""What every family's guard shares: the EOS token a refused answer ends
with, the result type, the generate() options no guard can honour, and the threshold override check.
Families build their guards on this (``ModelFamily.make_guard``); ``lit_sahs.guard`` is the command."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from lit_sahs.errors import LitSahsError

if TYPE_CHECKING:
    import torch


# generate() options the guard cannot honour: they change what the prefill is (chunks, beams,
# a draft model), so the capture would not see the whole prompt's first-token position once.
UNSUPPORTED_GENERATE = ("prefill_chunk_size", "assistant_model", "num_beams", "num_beam_groups",
                        "prompt_lookup_num_tokens", "past_key_values", "position_ids")


def threshold_override(value: Any) -> Optional[float]:
    """A threshold override from Python: None or a finite number (above 1 flags nothing, which benchmarks
    use to measure the guard's cost; the command line accepts only probabilities in [0, 1])."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LitSahsError(f"threshold must be a probability, got {value!r}")
    return float(value)


def optional_guard_args(**options) -> dict:
    """The guard options that are set (not None): a plug-in family's ``make_guard`` written before an
    option existed sees it only when a user gives it."""
    return {k: v for k, v in options.items() if v is not None}


def answered_rows(scores, flagged, answer_below: Optional[float]) -> Optional[list[bool]]:
    """Which rows ``answer_nudge.AnswerNudge`` nudged: scored below `answer_below` and not flagged (a flagged
    row is refused); None without it. Derived from the same scores the nudge compared."""
    if answer_below is None:
        return None
    return [s is not None and s < answer_below and not f for s, f in zip(scores, flagged)]


def eos_token_id(target, override=None) -> int:
    """The token that ends an answer: `override`, else the target's generation config, else its
    tokenizer's (the first of a list)."""
    eos = override
    if eos is None:
        eos = getattr(target.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = target.tokenizer.eos_token_id
    if type(eos).__module__.startswith("torch"):  # a tensor (torch is not imported for the check)
        eos = eos.flatten().tolist()
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise LitSahsError("the target has no EOS token: a refused or finished answer ends with EOS; "
                           "pass eos_token_id=...")
    return int(eos)


@dataclass
class GuardResult:
    """One guarded batch. `responses[i]` is the refusal message where `flagged[i]`; `scores[i]` is
    the detector's probability (None where scoring failed); `sequences` are the generated token
    ids (prompt excluded, padded after EOS) exactly as generate returned them."""

    ids: list[str]
    prompts: list[str]
    flagged: list[bool]
    scores: list[Optional[float]]
    responses: list[str]
    sequences: torch.Tensor
    threshold: float
    scoring_error: Optional[str] = None
    extra: dict = field(default_factory=dict)
    judged: Optional[list[bool]] = None  # with a judge band: the rows the target's own verdict decided
    answered: Optional[list[bool]] = None  # with answer_below: the rows whose refusal openings were banned

    def decisions(self) -> list[str]:
        """Per prompt, what the guard did ("refuse", "answer": passed with refusal openings banned
        (``answer_nudge``), or "pass"; a family with more actions says which)."""
        answered = self.answered or [False] * len(self.flagged)
        return ["refuse" if f else ("answer" if a else "pass") for f, a in zip(self.flagged, answered)]

    def rows(self) -> list[dict]:
        rows = [{"id": i, "prompt": p, "flagged": f, "score": s, "response": r}
                for i, p, f, s, r in zip(self.ids, self.prompts, self.flagged, self.scores, self.responses)]
        if self.judged is not None:
            for row, j in zip(rows, self.judged):
                row["judged"] = bool(j)
        if self.answered is not None:
            for row, a in zip(rows, self.answered):
                row["answered"] = bool(a)
        return rows
