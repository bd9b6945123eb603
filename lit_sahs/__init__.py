"""lit_sahs: safety-head detectors for (vision-)language models.

The Python API in one import::

    from lit_sahs import load_target, build_dataset, run_extraction, locate_heads, Engine

Names resolve on first use (module ``__getattr__``), so ``import lit_sahs`` loads neither torch nor
Lightning and ``python -m lit_sahs --help`` stays fast. ``API`` maps each public name to the module
that defines it and the name there; a name that moves needs only its entry here changed.
No public name equals a submodule's name (``extract``, ``locate``…): once a submodule is imported
Python binds it on the package, so such a name would mean one thing or the other depending on what
ran first.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute in that module)
API: dict[str, tuple[str, str]] = {
    # targets, heads and the hooks that read them
    "load_target": ("lit_sahs.targets.registry", "load_target"),
    "Target": ("lit_sahs.targets.registry", "Target"),
    "HeadSet": ("lit_sahs.heads", "HeadSet"),
    "Holdout": ("lit_sahs.data.holdout", "Holdout"),
    "Geometry": ("lit_sahs.heads", "Geometry"),
    "TargetFingerprint": ("lit_sahs.heads", "TargetFingerprint"),
    "HeadCapture": ("lit_sahs.hooks", "HeadCapture"),
    "HeadAblation": ("lit_sahs.hooks", "HeadAblation"),
    # prompts
    "Sample": ("lit_sahs.data.samples", "Sample"),
    "load_source": ("lit_sahs.data.sources", "load_source"),
    "load_user_file": ("lit_sahs.data.user_files", "load_user_file"),
    "build_dataset": ("lit_sahs.data.protocol", "build_dataset"),
    # extraction, the store, locating heads
    "run_extraction": ("lit_sahs.extract", "run_extraction"),
    "ActivationStore": ("lit_sahs.data.store", "ActivationStore"),
    "locate_heads": ("lit_sahs.locate", "locate"),
    "locate_by_effect": ("lit_sahs.effect", "locate_by_effect"),
    "HeadRanking": ("lit_sahs.ranking", "HeadRanking"),
    # data modules, detectors, fitting
    "CachedActivationDataModule": ("lit_sahs.data.datamodules", "CachedActivationDataModule"),
    "LiveActivationDataModule": ("lit_sahs.data.datamodules", "LiveActivationDataModule"),
    "SafetyDetector": ("lit_sahs.detectors", "SafetyDetector"),
    "LogisticDetector": ("lit_sahs.detectors", "LogisticDetector"),
    "MLPDetector": ("lit_sahs.detectors", "MLPDetector"),
    "SparseHeadDetector": ("lit_sahs.detectors", "SparseHeadDetector"),
    "METRIC_FACTORIES": ("lit_sahs.detectors.metrics", "METRIC_FACTORIES"),
    "calibrate_threshold": ("lit_sahs.detectors", "calibrate_threshold"),
    "Engine": ("lit_sahs.engine", "Engine"),
    "FitResult": ("lit_sahs.engine", "FitResult"),
    "load_detector": ("lit_sahs.artifact", "load_detector"),
    "save_detector": ("lit_sahs.artifact", "save_detector"),
    # evaluation, tuning, the registry
    "score_file": ("lit_sahs.evaluate", "score_file"),
    "source_protocol": ("lit_sahs.generalisation", "source_protocol"),
    "TuneConfig": ("lit_sahs.tune", "TuneConfig"),
    "run_tune": ("lit_sahs.tune", "run_tune"),
    "register_detector": ("lit_sahs.registry", "register_detector"),
    # serving a detector
    "SafetyGuard": ("lit_sahs.detectors.guard", "SafetyGuard"),
    "load_guard": ("lit_sahs.guard", "load_guard"),
    "GuardResult": ("lit_sahs.guarding", "GuardResult"),
    "Screener": ("lit_sahs.screen", "Screener"),
    "ScreenResult": ("lit_sahs.screen", "ScreenResult"),
    # SafeVLM, the second method
    "SafeVLM": ("lit_sahs.safevlm", "SafeVLM"),
    "SafetyDataModule": ("lit_sahs.safevlm", "SafetyDataModule"),
    "SafeVLMGuard": ("lit_sahs.safevlm.guard", "SafeVLMGuard"),
    # the one error type
    "LitSahsError": ("lit_sahs.errors", "LitSahsError"),
    "ModelFamily": ("lit_sahs.family", "ModelFamily"),
    "register_family": ("lit_sahs.family", "register_family"),
}

__all__ = sorted(API)


def __getattr__(name: str) -> Any:
    try:
        module, attr = API[name]
    except KeyError:
        raise AttributeError(f"module 'lit_sahs' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
