"""The safety-head detector families: cheap classifiers on a few heads' activations at the
first-token position. Each registers itself with ``lit_sahs.family.register_family``.

base.py       SafetyDetector (LightningModule shared by every head family: normalisation, metrics,
              threshold calibration, checkpoint metadata, the ModelFamily interface)
logistic.py   LogisticDetector (full-batch LBFGS or Adam)
mlp.py        MLPDetector
sparse.py     SparseHeadDetector (group lasso over all heads: picks heads and classifier jointly)
attnpool.py   AttentionPoolDetector (a learned attention pooling per head over every prompt token)
metrics.py    TPRAtFPR, FPRAtTPR, detection_metrics(), compute_report()
guard.py      SafetyGuard: score at the prefill of the same generate call, refuse or continue

Saving and loading (any family): ``lit_sahs.artifact.save_detector`` / ``load_detector``.
"""
from lit_sahs.detectors.attnpool import AttentionPoolDetector
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
from lit_sahs.detectors.sparse import SparseHeadDetector

__all__ = [
    "AttentionPoolDetector",
    "FPRAtTPR",
    "LogisticDetector",
    "MLPDetector",
    "SafetyDetector",
    "SparseHeadDetector",
    "TPRAtFPR",
    "calibrate_threshold",
    "compute_report",
    "detection_metrics",
]
