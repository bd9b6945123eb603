"""HeadRanking: heads ordered best first, as locate (per-head probes) or the effect ranking
(``lit_sahs.effect``) writes them, and as fit, ablate and the folds read them back (JSON)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet, TargetFingerprint
from lit_sahs.io import atomic_write_json


@dataclass
class HeadRanking:
    """Heads ordered best first. `method` "probe": rows with layer, head, auroc, accuracy; "effect"
    (``lit_sahs.effect``): rows with layer, head, drop (refusal drop when ablated), estimate, effect."""

    fingerprint: TargetFingerprint
    scores: list[dict]
    meta: dict = field(default_factory=dict)  # split, probe settings, store path
    method: str = "probe"

    @property
    def score_key(self) -> str:
        """The row field heads are ranked by (higher is better)."""
        return "drop" if self.method == "effect" else "auroc"

    def top_k(self, k: int, within=None) -> HeadSet:
        """The k best heads; with `within` (heads), the k best of those (e.g. the heads a store
        recorded at every token)."""
        scores = self.scores
        if within is not None:
            allowed = {tuple(h) for h in within}
            scores = [s for s in scores if (s["layer"], s["head"]) in allowed]
        if not 1 <= k <= len(scores):
            raise LitSahsError(f"top_k={k} is outside 1..{len(scores)} ranked heads"
                               + (" of those allowed" if within is not None else ""))
        return HeadSet((s["layer"], s["head"]) for s in scores[:k])

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint.to_dict(), "method": self.method, "scores": self.scores,
                "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadRanking":
        path = Path(path)
        if not path.exists():
            raise LitSahsError(f"no head ranking at {path}: run `python -m lit_sahs locate` first")
        try:
            d = json.loads(path.read_text())
            return cls(TargetFingerprint.from_dict(d["fingerprint"]), list(d["scores"]), d.get("meta", {}),
                       d.get("method", "probe"))
        except (ValueError, KeyError, TypeError) as e:
            raise LitSahsError(f"{path} is not a head ranking ({e})") from None
