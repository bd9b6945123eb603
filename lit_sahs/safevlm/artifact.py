"""SafeVLM artifacts: the safety modules and (after stage II) the LoRA tensors in one
``detector.safetensors``, everything else in ``detector.json`` (format ``lit_sahs.detector``,
``"detector": "safevlm"``), so the registry, ``evaluate --detector`` and ``guard --detector`` load
it like any detector, with no pickle anywhere."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import TargetFingerprint


def safevlm_payload(det) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(detector.json contents, tensors) of a SafeVLM; ``save_detector`` writes them."""
    from lit_sahs.detectors.artifact import FORMAT, FORMAT_VERSION, _init_args, check_threshold

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": f"{type(det).__module__}.{type(det).__qualname__}",
            "hparams": _init_args(det.hparams), "threshold": check_threshold(det.threshold, "SafeVLM"), **det.metadata()}
    return meta, det.tensors()


def safevlm_from_artifact(directory: Path, meta: dict[str, Any], map_location="cpu"):
    """Rebuild a SafeVLM from its artifact directory (``meta``: the parsed detector.json)."""
    from lit_sahs.detectors.artifact import WEIGHTS_FILE, _state_error_reason, check_threshold
    from lit_sahs.safevlm.module import LORA_PREFIX, SAFETY_PREFIX, SafeVLM
    from lit_sahs.safevlm.taxonomy import RISK_LEVELS, RISK_TYPES

    src = directory / WEIGHTS_FILE
    try:
        hp = {k: v for k, v in dict(meta["hparams"]).items() if not str(k).startswith("_")}
        hp["stage"] = 1  # stage and init_from describe how it was trained, not what to load
        hp["init_from"] = None
        det = SafeVLM(**hp)
        fingerprint = TargetFingerprint.from_dict(meta["fingerprint"])
        dims = {k: int(v) for k, v in dict(meta["dims"]).items()}
        levels, types = list(meta["levels"]), list(meta["types"])
        lora, stages = meta.get("lora"), [int(s) for s in meta.get("stages", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise LitSahsError(f"{directory}: SafeVLM description is incomplete or corrupt ({e!r}): re-save it") from None
    if (levels, types) != (list(RISK_LEVELS), list(RISK_TYPES)):
        raise LitSahsError(f"{directory} was built for risk levels {levels} and types {types}; this lit_sahs uses "
                           f"{list(RISK_LEVELS)} and {list(RISK_TYPES)}")
    det.build(fingerprint, dims)
    try:
        state = load_file(str(src), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LitSahsError(f"{src} cannot be read ({e}): the artifact is corrupt, re-save it") from e
    safety = {k[len(SAFETY_PREFIX):]: v for k, v in state.items() if k.startswith(SAFETY_PREFIX)}
    try:
        det.safety.load_state_dict(safety, strict=True)
    except RuntimeError as e:
        raise LitSahsError(f"{src} does not fit its own description ({_state_error_reason(e)}): "
                           "the artifact is corrupt") from None
    if "threshold" not in state:
        raise LitSahsError(f"{src} has no threshold: the artifact is corrupt, re-save it")
    det.threshold.copy_(state["threshold"].to(torch.float64))
    check_threshold(det.threshold, src)
    det.lora = lora
    det.lora_state = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
    if bool(lora) != bool(det.lora_state):
        raise LitSahsError(f"{src}: LoRA description and tensors disagree: the artifact is corrupt")
    det.trained_stages, det.families = stages, list(meta.get("families", []))
    return det.to(map_location).eval()


def load_safevlm(path: str | os.PathLike, map_location="cpu", tracking_uri=None):
    """A SafeVLM from an artifact directory or a models:/ / runs:/ URI; anything else is refused."""
    from lit_sahs.detectors.artifact import load_detector
    from lit_sahs.safevlm.module import SafeVLM

    det = load_detector(str(path), map_location=map_location, tracking_uri=tracking_uri)
    if not isinstance(det, SafeVLM):
        raise LitSahsError(f"{path} holds a {getattr(det, 'family', type(det).__name__)} detector, not SafeVLM "
                           "safety modules: point init_from at a SafeVLM stage-I artifact")
    return det
