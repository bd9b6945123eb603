"""SafeVLM artifacts: the safety modules and (after stage II) the LoRA tensors in one
``detector.safetensors``, everything else in ``detector.json`` (format ``lit_sahs.detector``,
``"detector": "safevlm"``), so the registry, ``evaluate``, ``screen`` and ``guard`` load it like any
detector, with no pickle anywhere. ``SafeVLM.from_artifact`` calls ``rebuild``; stage II reads its
stage-I artifact with ``load_stage_one``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from lit_sahs.artifact_format import check_threshold, read_artifact, state_error_reason
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import TargetFingerprint
from lit_sahs.safevlm.taxonomy import RISK_LEVELS, RISK_TYPES

LORA_PREFIX = "lora."
SAFETY_PREFIX = "safety."


def check_lora(lora: Any, source: str) -> None:
    """The LoRA description of an artifact, checked before peft sees it: positive integer rank and
    alpha, a dropout in [0, 1), and module names that are dotted Python identifiers."""
    if lora is None:
        return
    if not isinstance(lora, dict) or set(lora) != {"rank", "alpha", "dropout", "modules"}:
        raise LitSahsError(f"{source}: the LoRA description must have rank, alpha, dropout and modules: "
                           "the artifact is corrupt")
    for key in ("rank", "alpha"):
        v = lora[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65536:
            raise LitSahsError(f"{source}: LoRA {key} {v!r} is not a positive integer: the artifact is corrupt")
    d = lora["dropout"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) < 1.0:
        raise LitSahsError(f"{source}: LoRA dropout {d!r} is not in [0, 1): the artifact is corrupt")
    mods = lora["modules"]
    if not isinstance(mods, list) or not mods or not all(
            isinstance(m, str) and m and all(part.isidentifier() or part.isdigit() for part in m.split("."))
            for m in mods):
        raise LitSahsError(f"{source}: LoRA module names must be a non-empty list of dotted names: the artifact is corrupt")


def rebuild(cls, meta: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str):
    """A `cls` (SafeVLM) from a parsed detector.json and its tensors."""
    try:
        hp = {k: v for k, v in dict(meta["hparams"]).items() if not str(k).startswith("_")}
        hp["stage"] = 1  # stage and init_from describe how it was trained, not what to load
        hp["init_from"] = None
        hp["head_keys_init"] = None  # the joined heads' weights are in the tensors
        hp["lora_fpr"] = hp["lora_tpr"] = None  # so is the gate's risk (stage-II settings; this loads as stage 1)
        det = cls(**hp)
        fingerprint = TargetFingerprint.from_dict(meta["fingerprint"])
        dims = {k: int(v) for k, v in dict(meta["dims"]).items()}
        levels, types = list(meta["levels"]), list(meta["types"])
        lora, stages = meta.get("lora"), [int(s) for s in meta.get("stages", [])]
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise LitSahsError(f"{source}: SafeVLM description is incomplete or corrupt ({e!r}): re-save it") from None
    if (levels, types) != (list(RISK_LEVELS), list(RISK_TYPES)):
        raise LitSahsError(f"{source} was built for risk levels {levels} and types {types}; this lit_sahs uses "
                           f"{list(RISK_LEVELS)} and {list(RISK_TYPES)}")
    check_lora(lora, source)
    det.build(fingerprint, dims)
    safety = {k[len(SAFETY_PREFIX):]: v for k, v in state.items() if k.startswith(SAFETY_PREFIX)}
    try:
        det.safety.load_state_dict(safety, strict=True)
    except RuntimeError as e:
        raise LitSahsError(f"{source} does not fit its own description ({state_error_reason(e)}): "
                           "the artifact is corrupt") from None
    if "threshold" not in state:
        raise LitSahsError(f"{source} has no threshold: the artifact is corrupt, re-save it")
    det.threshold.copy_(state["threshold"].to(torch.float64))
    check_threshold(det.threshold, source)
    if "lora_threshold" in state:  # only a stage II fitted with lora_fpr has one
        det.lora_threshold.copy_(state["lora_threshold"].to(torch.float64))
    det.lora = lora
    det.lora_state = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
    if bool(lora) != bool(det.lora_state):
        raise LitSahsError(f"{source}: LoRA description and tensors disagree: the artifact is corrupt")
    det.trained_stages, det.families = stages, list(meta.get("families", []))
    return det


def load_stage_one(cls, spec: str, tracking_uri=None):
    """The stage-I SafeVLM that stage II starts from: an artifact directory or a models:/ / runs:/ URI;
    an artifact of another family is refused."""
    tmp = None
    try:
        if str(spec).startswith(("models:/", "runs:/")):
            from lit_sahs.model_uri import download

            tmp = tempfile.mkdtemp(prefix="lit_sahs-stage1-")
            directory = download(str(spec), tmp, tracking_uri)[1]
        else:
            directory = Path(spec)
            if directory.is_file():
                directory = directory.parent
        meta, tensors = read_artifact(directory)
        if meta.get("detector") != cls.family:
            raise LitSahsError(f"{spec} holds a {meta.get('detector')} detector, not SafeVLM safety modules: "
                               "point init_from at a SafeVLM stage-I artifact")
        return rebuild(cls, meta, tensors, str(spec)).eval()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
