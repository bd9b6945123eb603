"""Detectors: cheap classifiers on a few heads' activations at the first-token position.

base.py       SafetyDetector (LightningModule shared by every family: normalisation, metrics,
              threshold calibration, checkpoint metadata)
logistic.py   LogisticDetector (full-batch LBFGS or Adam)
mlp.py        MLPDetector
sparse.py     SparseHeadDetector (group lasso over all heads: picks heads and classifier jointly)
metrics.py    TPRAtFPR, FPRAtTPR, detection_metrics(), compute_report()
artifact.py   save_detector / load_detector (safetensors + JSON, no pickle)
registry.py   DETECTORS by family name
"""
from lit_sahs.detectors.artifact import load_detector, save_detector
from lit_sahs.detectors.base import SafetyDetector
from lit_sahs.detectors.logistic import LogisticDetector
from lit_sahs.detectors.metrics import (
    FPRAtTPR,
    TPRAtFPR,
    calibrate_threshold,
    compute_report,
    detection_metrics,
)
from lit_sahs.detectors.mlp import MLPDetector
from lit_sahs.detectors.registry import DETECTORS, detector_class
from lit_sahs.detectors.sparse import SparseHeadDetector

__all__ = [
    "DETECTORS",
    "FPRAtTPR",
    "LogisticDetector",
    "MLPDetector",
    "SafetyDetector",
    "SparseHeadDetector",
    "TPRAtFPR",
    "calibrate_threshold",
    "compute_report",
    "detection_metrics",
    "detector_class",
    "load_detector",
    "save_detector",
]
