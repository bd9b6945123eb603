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


def at_least(values: Mapping[str, Any], minimum: int) -> None:
    """Each named integer (option -> value; None: not given) must be an int >= `minimum`."""
    for what, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise LitSahsError(f"{what} must be a whole number >= {minimum}, got {value!r}")
        if value < minimum:
            raise LitSahsError(f"{what} must be >= {minimum}, got {value}")

