"""Locate safety heads: one probe per (layer, head), all fitted at once, ranked by held-out AUROC."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet, TargetFingerprint


@dataclass
class HeadRanking:
    """Heads ordered best first. `scores` rows are dicts with layer, head, auroc, accuracy."""

    fingerprint: TargetFingerprint
    scores: list[dict]
    meta: dict = field(default_factory=dict)  # split, probe settings, store path

    def top_k(self, k: int) -> HeadSet:
        if not 1 <= k <= len(self.scores):
            raise LitSahsError(f"top_k={k} is outside 1..{len(self.scores)} ranked heads")
        return HeadSet((s["layer"], s["head"]) for s in self.scores[:k])

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint.to_dict(), "scores": self.scores, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadRanking":
        path = Path(path)
        if not path.exists():
            raise LitSahsError(f"no head ranking at {path}: run `python -m lit_sahs locate` first")
        try:
            d = json.loads(path.read_text())
            return cls(TargetFingerprint.from_dict(d["fingerprint"]), list(d["scores"]), d.get("meta", {}))
        except (ValueError, KeyError, TypeError) as e:
            raise LitSahsError(f"{path} is not a head ranking ({e})") from None
