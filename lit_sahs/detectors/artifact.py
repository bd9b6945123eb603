"""Detector artifacts without pickle: detector.safetensors (tensors) + detector.json (everything else).

    save_detector(detector, "out/det")      # out/det/detector.{safetensors,json}, written atomically
    det = load_detector("out/det")          # or ".../detector.json", or a Lightning .ckpt
    det = load_detector("models:/name@champion")   # MLflow registry (models:/name/3) or runs:/<id>/detector

A directory is written under a temporary name beside its destination and renamed into
place, so a reader never sees half an artifact. A .ckpt is read with
``torch.load(weights_only=True)``, which refuses any pickle that names a non-tensor global.
A models:/ or runs:/ URI is downloaded by lit_sahs.registry and must be a safetensors + JSON
directory: from a registry, nothing pickled is read at all.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lit_sahs
from lit_sahs.detectors.base import CHECKPOINT_KEY, SafetyDetector
from lit_sahs.detectors.registry import DETECTORS, detector_class
from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_dir

WEIGHTS_FILE = "detector.safetensors"
META_FILE = "detector.json"
FORMAT = "lit_sahs.detector"
FORMAT_VERSION = 1
# a probability; calibrate_threshold returns the float just above 1.0 to flag nothing when benign scores reach 1.0
MAX_THRESHOLD = math.nextafter(1.0, math.inf)


def check_threshold(value: Any, source: Any) -> float:
    """`value` as a float in [0, 1] (flag = probability >= threshold); anything else is refused."""
    try:
        t = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise LitSahsError(f"{source}: threshold {value!r} is not a number: the artifact is corrupt, re-save it") from None
    if not 0.0 <= t <= MAX_THRESHOLD:  # NaN fails both comparisons
        raise LitSahsError(f"{source}: threshold {t!r} is not a probability in [0, 1]: the artifact is corrupt; "
                           "calibrate the detector again (fit or validate) and re-save it")
    return t


def _init_args(hparams) -> dict[str, Any]:
    """Constructor arguments only: LightningCLI adds bookkeeping keys such as `_class_path`."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def detector_metadata(detector: SafetyDetector) -> dict[str, Any]:
    meta = detector.metadata()
    hparams = _init_args(detector.hparams)
    try:
        json.dumps(hparams, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LitSahsError(f"detector hyper-parameters are not plain JSON values ({e}): use numbers, strings and lists") from e
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "hparams": hparams,
        "threshold": check_threshold(detector.threshold, type(detector).__name__),
        **meta,
        "lit_sahs_version": lit_sahs.__version__,
    }


def save_detector(detector: SafetyDetector, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `directory`/detector.safetensors and detector.json atomically; returns the directory."""
    if getattr(detector, "family", None) == "safevlm":  # the second method: safety modules (+ LoRA)
        from lit_sahs.safevlm.artifact import safevlm_payload

        meta, tensors = safevlm_payload(detector)
    elif detector.family not in DETECTORS or DETECTORS[detector.family] is not type(detector):
        raise LitSahsError(f"{type(detector).__name__} is not a registered detector family: add it to DETECTORS")
    else:
        meta = detector_metadata(detector)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in detector.state_dict().items()}
    dest = Path(directory)
    if dest.exists() and not overwrite:
        raise LitSahsError(f"{dest} already exists: choose another directory or pass overwrite=True")
    if dest.exists() and not (dest / META_FILE).is_file():
        raise LitSahsError(f"{dest} exists and is not a detector artifact: refusing to replace it")

    def build(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "detector": detector.family})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")

    return atomic_dir(dest, build, replace=True)


def _state_error_reason(e: BaseException) -> str:
    """The reason of a load_state_dict error: torch's message opens with a header line
    ("Error(s) in loading state_dict for X:") and gives each reason on its own line after it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    if not lines:
        return repr(e)
    more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0][:300] + more


def _load_state(detector: SafetyDetector, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        detector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LitSahsError(f"{source} does not fit its own description ({_state_error_reason(e)}): "
                           "the artifact is corrupt, re-save it") from e
    check_threshold(detector.threshold, source)


def _from_artifact(directory: Path, map_location: str | torch.device) -> SafetyDetector:
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise LitSahsError(f"{p} is missing: {directory} is not a complete detector artifact (save it with save_detector)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LitSahsError(f"{meta_path} is not valid JSON ({e}): the artifact is corrupt, re-save it") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LitSahsError(f"{meta_path} is not a lit_sahs detector description")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, (int, float)) or math.isnan(version):
        raise LitSahsError(f"{meta_path}: format_version {version!r} is not a number: the artifact is corrupt, re-save it")
    if version > FORMAT_VERSION:
        raise LitSahsError(f"{meta_path} has format version {meta.get('format_version')}: upgrade lit_sahs to read it")
    if meta.get("detector") == "safevlm":
        from lit_sahs.safevlm.artifact import safevlm_from_artifact

        return safevlm_from_artifact(directory, meta, map_location)
    cls = detector_class(str(meta.get("detector")))
    detector = _instantiate(cls, meta.get("hparams", {}), meta_path)
    detector.bind_from_metadata(meta)
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LitSahsError(f"{weights_path} cannot be read ({e}): the artifact is corrupt, re-save it") from e
    _load_state(detector, state, weights_path)
    thr = meta.get("threshold")
    if thr is not None and not math.isclose(check_threshold(thr, meta_path), float(detector.threshold),
                                            rel_tol=0, abs_tol=1e-9):
        raise LitSahsError(f"{directory}: threshold in {META_FILE} and {WEIGHTS_FILE} disagree: the artifact is corrupt")
    return detector.to(map_location).eval()


def _instantiate(cls: type[SafetyDetector], hparams: Any, source: Path) -> SafetyDetector:
    if not isinstance(hparams, dict):
        raise LitSahsError(f"{source}: hyper-parameters are not a mapping: the artifact is corrupt")
    try:
        return cls(**_init_args(hparams))
    except TypeError as e:
        raise LitSahsError(f"{source}: hyper-parameters do not fit {cls.__name__} ({e}): was it written by another lit_sahs version?") from e


def _from_checkpoint(path: Path, map_location: str | torch.device) -> SafetyDetector:
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError... all mean "not loadable safely"
        first = (str(e).strip().splitlines() or [repr(e)])[0]
        raise LitSahsError(
            f"{path} cannot be loaded as a plain-tensor checkpoint ({type(e).__name__}: {first[:200]}): "
            "only checkpoints without arbitrary Python objects are accepted; export it with save_detector"
        ) from e
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise LitSahsError(f"{path} is not a lit_sahs detector checkpoint (no {CHECKPOINT_KEY!r} metadata)")
    meta = ckpt[CHECKPOINT_KEY]
    cls = detector_class(str(meta.get("detector")))
    detector = _instantiate(cls, ckpt.get("hyper_parameters", {}), path)
    detector.bind_from_metadata(meta)
    _load_state(detector, ckpt["state_dict"], path)
    return detector.to(map_location).eval()


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  tracking_uri: str | None = None) -> SafetyDetector:
    """Load a detector (eval mode) from an artifact directory, its detector.json/.safetensors, a .ckpt,
    or an MLflow URI: models:/<name>/<version>, models:/<name>@<alias>, runs:/<run_id>/<path>
    (tracking/registry URI: `tracking_uri`, else MLFLOW_TRACKING_URI, else the SQLite store in mlruns/)."""
    if isinstance(path, str) and path.startswith(("models:/", "runs:/")):
        from lit_sahs.registry import load_uri  # late: the registry needs mlflow, plain loads do not

        return load_uri(path, map_location, tracking_uri)
    p = Path(path)
    if not p.exists():
        raise LitSahsError(f"{p} does not exist: pass a directory written by save_detector or a Lightning .ckpt")
    if p.is_dir():
        return _from_artifact(p, map_location)
    if p.name in (META_FILE, WEIGHTS_FILE):
        return _from_artifact(p.parent, map_location)
    if p.suffix == ".ckpt":
        return _from_checkpoint(p, map_location)
    raise LitSahsError(f"{p} is neither a detector directory nor a .ckpt: pass a directory written by save_detector")
