"""Detector families by name (the `detector` field of an artifact, the CLI's choices)."""
from __future__ import annotations

from lit_sahs.detectors.base import SafetyDetector
from lit_sahs.detectors.logistic import LogisticDetector
from lit_sahs.detectors.mlp import MLPDetector
from lit_sahs.detectors.sparse import SparseHeadDetector
from lit_sahs.errors import LitSahsError

DETECTORS: dict[str, type[SafetyDetector]] = {
    LogisticDetector.family: LogisticDetector,
    MLPDetector.family: MLPDetector,
    SparseHeadDetector.family: SparseHeadDetector,
}


def detector_class(name: str) -> type[SafetyDetector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise LitSahsError(f"unknown detector family {name!r}: use one of {', '.join(sorted(DETECTORS))}") from None
