"""Sample: one labelled prompt, the unit every stage passes along."""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Optional

MALICIOUS, BENIGN = 1, 0


def normalise_text(text: str) -> str:
    """Text key for deduplication: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"[^\w\s]", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def clean_text(value) -> str:
    """A text field as read from a file or package: stripped, '' when missing or not text."""
    return value.strip() if isinstance(value, str) else ""


def stable_id(*parts: str) -> str:
    """Deterministic short id from content, so re-runs and resumes agree on sample identity."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return h[:16]


@dataclass(frozen=True)
class Sample:
    """A prompt with its label. `image` is a file path (or None); `attack` names the transform applied
    (`plain` for none) and `attack_family` groups attacks that a zero-shot split holds out together."""

    id: str
    text: str
    label: int
    source: str
    attack: str = "plain"
    attack_family: str = "plain"
    category: str = ""
    image: Optional[str] = None
    base_id: str = ""  # id of the un-attacked base prompt, so splits keep an attacked prompt with its base
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.label not in (MALICIOUS, BENIGN):
            raise ValueError(f"sample {self.id}: label must be 0 (benign) or 1 (malicious), got {self.label!r}")

    @classmethod
    def make(cls, text: str, label: int, source: str, **kw) -> "Sample":
        """Build a sample whose id derives from its content (text, image, attack)."""
        attack = kw.get("attack", "plain")
        image = kw.get("image") or ""
        sid = stable_id(text, str(image), attack)
        kw.setdefault("base_id", sid)
        return cls(id=sid, text=text, label=int(label), source=source, **kw)

    def with_(self, **changes) -> "Sample":
        return replace(self, **changes)

    def index_row(self) -> dict:
        """What the activation store's index keeps about a sample."""
        d = asdict(self)
        d.pop("meta")
        return d


def dedupe_key(sample: Sample) -> tuple[str, str]:
    # image is part of the key: one text over different images is different input to a vision target
    return normalise_text(sample.text), sample.image or ""


def dedupe(samples: Iterable[Sample]) -> list[Sample]:
    """Drop repeats of a prompt (same normalised text and image), keeping the first, across sources.

    A prompt that appears with BOTH labels (e.g. one dataset calls it harmful, another benign) is
    dropped entirely: any label we kept would be wrong for one of its sources, and a contradictory
    pair would only teach the detector noise.
    """
    samples = list(samples)
    labels: dict[tuple[str, str], set[int]] = defaultdict(set)
    for s in samples:
        labels[dedupe_key(s)].add(s.label)
    seen: set[tuple[str, str]] = set()
    out = []
    for s in samples:
        key = dedupe_key(s)
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            out.append(s)
    return out
