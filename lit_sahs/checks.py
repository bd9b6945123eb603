"""Checks of numbers a user gives (options, files): each refuses a bad value with one LitSahsError
that names the option, the value and what it must be, before any work starts."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from lit_sahs.errors import LitSahsError


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise LitSahsError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise LitSahsError(f"{what} must be a number, got {value!r}") from None


def probability(value: Any, what: str = "--threshold") -> float:
    """`value` as a float in [0, 1]; NaN, infinities and anything outside are refused (a threshold
    above 1 would pass every prompt, one below 0 would refuse every prompt)."""
    t = _number(value, what)
    if not 0.0 <= t <= 1.0:  # NaN fails both comparisons
        raise LitSahsError(f"{what} must be a probability in [0, 1], got {value!r}")
    return t


def optional_probability(value: Any, what: str = "--threshold") -> Optional[float]:
    return None if value is None else probability(value, what)


ANSWER_OFF = "off"  # --answer_below / --answer_direction: leave the artifact's calibrated answer side unused


def _off(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == ANSWER_OFF


def answer_below_arg(value: Any) -> Any:
    """A guard's ``answer_below`` (``lit_sahs.answer_nudge``): None (the detector's calibrated one, if
    any), ``"off"``, or a probability in [0, 1]."""
    return ANSWER_OFF if _off(value) else optional_probability(value, "--answer_below")


def answer_tpr_arg(value: Any, what: str = "--answer_tpr") -> float:
    """The share of harmful prompts an answer cut keeps at or above it (``lit_sahs.answer_cut``): in (0, 1]."""
    share = probability(value, what)
    if share == 0.0:
        raise LitSahsError(f"{what} must be above 0: it is the share of harmful prompts kept above the cut")
    return share


def answer_direction_arg(value: Any, answer_below: Any) -> Any:
    """A guard's ``answer_direction`` as given (None: the detector's own, if any; ``"off"``: none): it acts
    on the prompts ``answer_below`` picks, so the answer side must not be turned off."""
    if _off(value):
        return ANSWER_OFF
    if value is not None and answer_below_arg(answer_below) == ANSWER_OFF:
        raise LitSahsError("--answer_direction acts on the prompts below --answer_below, and --answer_below off "
                           "turns the answer side off: drop one of them")
    return value


def at_least(values: Mapping[str, Any], minimum: int) -> None:
    """Each named integer (option -> value; None: not given) must be an int >= `minimum`."""
    for what, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise LitSahsError(f"{what} must be a whole number >= {minimum}, got {value!r}")
        if value < minimum:
            raise LitSahsError(f"{what} must be >= {minimum}, got {value}")



#: ``judge_band`` value that turns the judge's second stage off, even where the detector carries one.
JUDGE_OFF = "off"


def judge_band_arg(value: Any) -> Any:
    """A ``--judge_band`` value checked: ``"off"``, or 'LO,HI' as (lo, hi), or None (the detector's own)."""
    if isinstance(value, str) and value.strip().lower() == JUDGE_OFF:
        return JUDGE_OFF
    return probability_band(value)


def probability_band(value: Any, what: str = "--judge_band") -> Optional[tuple[float, float]]:
    """'LO,HI' (or a pair) as two probabilities with LO <= HI; None or '' is no band."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if len(parts) != 2:
        raise LitSahsError(f"{what} must be two probabilities LO,HI (e.g. 0.2,0.8), got {value!r}")
    lo, hi = (probability(p.strip() if isinstance(p, str) else p, what) for p in parts)
    if lo > hi:
        raise LitSahsError(f"{what} must have LO <= HI, got {value!r}")
    return lo, hi
