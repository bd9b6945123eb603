"""Holdout: what a split or a fold keeps out of training — attack families and/or sources — as one
value from the config to the folds, the splits, the report's label and the ROC title."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

from lit_sahs.errors import LitSahsError


def _names(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return tuple(str(n) for n in value)


@dataclass(frozen=True)
class Holdout:
    """What one fold keeps out: attack families and/or sources (both empty: a random test split)."""

    # a comma-separated string is accepted too (``--held_out.sources a,b`` on the command line)
    families: Union[tuple[str, ...], str] = ()
    sources: Union[tuple[str, ...], str] = ()

    def __post_init__(self) -> None:  # lists, "a,b" strings and None become tuples of names
        object.__setattr__(self, "families", _names(self.families))
        object.__setattr__(self, "sources", _names(self.sources))

    @classmethod
    def of(cls, value: "Holdout | Sequence[str] | str | None") -> "Holdout":
        """A Holdout as it is, or held-out attack families given by name."""
        return value if isinstance(value, Holdout) else cls(families=_names(value))

    def keeps(self, rows: Sequence[dict]) -> list[bool]:
        """Per row: outside every held-out family and source (a row without a family is ``plain``). A name
        no row carries is an error, as in ``protocol.split_rows``: a typo would otherwise hold out nothing."""
        check_names(rows, self.families, self.sources)
        return [r.get("attack_family", "plain") not in self.families and r.get("source", "") not in self.sources
                for r in rows]

    @property
    def name(self) -> str:
        """The fold's name, usable as an MLflow metric key part (letters, digits, _ - . : / and space)."""
        parts = list(self.families) + list(self.sources)
        return re.sub(r"[^\w\-. :/]", "_", "__".join(parts)) if parts else "random"

    @property
    def label(self) -> str:
        """For people: every held-out family and source, comma-separated ("random" when none)."""
        return ", ".join(list(self.families) + list(self.sources)) or "random"


def check_names(rows: Sequence[dict], families: Sequence[str] = (), sources: Sequence[str] = ()) -> None:
    """Every named attack family and source must be carried by some row (a row without a family is
    ``plain``): a typo would otherwise hold out, or validate on, nothing."""
    present_families = {r.get("attack_family", "plain") for r in rows}
    present_sources = {r.get("source", "") for r in rows}
    for name, known, what in [(f, present_families, "attack family") for f in families] + \
                             [(s, present_sources, "source") for s in sources]:
        if name not in known:
            raise LitSahsError(f"held-out {what} {name!r} has no rows in this data; present: {sorted(known)}")
