"""Save and load detectors of any family, without pickle.

    save_detector(detector, "out/det")      # out/det/detector.{safetensors,json}, written atomically
    det = load_detector("out/det")          # or ".../detector.json", or a Lightning .ckpt
    det = load_detector("models:/name@champion")   # MLflow registry (models:/name/3) or runs:/<id>/detector

The files and their checks are ``lit_sahs.artifact_format``; which class reads them is the family
registry's answer for the ``detector`` field (``lit_sahs.families``), and the class's own
``from_artifact`` rebuilds it. A .ckpt is read with ``torch.load(weights_only=True)``, which refuses
any pickle that names a non-tensor global. A models:/ or runs:/ URI is downloaded by
``lit_sahs.model_uri`` and must be a safetensors + JSON directory.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lit_sahs.answer_cut import DIRECTION_TENSOR, answer_from_artifact, answer_to_artifact, stored_answer
from lit_sahs.artifact_format import (META_FILE, SIDE_PREFIX, WEIGHTS_FILE, check_threshold, family_tensors, read_meta,
                                      read_tensors, write_artifact)
from lit_sahs.errors import LitSahsError
from lit_sahs.families import family_class
from lit_sahs.family import CHECKPOINT_KEY, ModelFamily, require_family


def save_detector(detector: ModelFamily, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `directory`/detector.safetensors and detector.json atomically; returns the directory."""
    det = require_family(detector)
    meta = dict(det.artifact_metadata())
    meta["threshold"] = check_threshold(det.threshold, type(det).__name__)
    tensors = dict(det.artifact_tensors())
    answer, extra = answer_to_artifact(det.answer, det.answer_direction)  # the answer side (lit_sahs.answer_cut)
    if answer is not None:
        meta["answer"] = answer
    clash = sorted(k for k in tensors if k.startswith(SIDE_PREFIX))
    if clash:
        raise LitSahsError(f"{type(det).__name__} writes a tensor named {clash[0]!r}: names starting with "
                           f"{SIDE_PREFIX!r} are the artifact's own (the answer side), rename it")
    return write_artifact(directory, det.family, meta, {**tensors, **extra}, overwrite=overwrite)


def _from_directory(directory: Path, map_location) -> ModelFamily:
    meta, tensors = read_meta(directory), read_tensors(directory)
    cls = family_class(str(meta.get("detector")))
    answer = stored_answer(meta.get("answer"), directory / META_FILE)  # checked before the family's work
    vector = tensors.get(DIRECTION_TENSOR)
    det = cls.from_artifact(meta, family_tensors(tensors), str(directory))
    det.answer, det.answer_direction = answer_from_artifact(answer, vector, det.fingerprint, directory)
    thr = meta.get("threshold")
    if thr is not None and not math.isclose(check_threshold(thr, directory / META_FILE), float(det.threshold),
                                            rel_tol=0, abs_tol=1e-9):
        raise LitSahsError(f"{directory}: threshold in {META_FILE} and {WEIGHTS_FILE} disagree: the artifact is corrupt")
    check_threshold(det.threshold, directory / WEIGHTS_FILE)
    return det.to(map_location).eval()


def _from_checkpoint(path: Path, map_location) -> ModelFamily:
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
    cls = family_class(str(meta.get("detector")) if isinstance(meta, dict) else "")
    return cls.from_checkpoint(ckpt, str(path)).to(map_location).eval()


def _from_uri(uri: str, map_location, tracking_uri) -> ModelFamily:
    from lit_sahs.model_uri import TAG_FINGERPRINT, download

    tmp = tempfile.mkdtemp(prefix="lit_sahs-detector-")
    try:
        _, directory, mv = download(uri, tmp, tracking_uri)
        det = _from_directory(directory, map_location)
        want = (mv.tags or {}).get(TAG_FINGERPRINT) if mv is not None else None
        if want and want != det.fingerprint.weights_hash:
            raise LitSahsError(f"{uri}: the artifact's target ({det.fingerprint.weights_hash[:24]}) differs from the "
                               f"version's {TAG_FINGERPRINT} tag ({want[:24]}): the registry entry is inconsistent")
        return det
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  tracking_uri: str | None = None) -> ModelFamily:
    """Load a detector (eval mode) from an artifact directory, its detector.json/.safetensors, a .ckpt,
    a lit_sahs MLflow pyfunc model directory (its detector artifact is read), or an MLflow URI: models:/<name>/<version>, models:/<name>@<alias>, runs:/<run_id>/<path>
    (tracking/registry URI: `tracking_uri`, else MLFLOW_TRACKING_URI, else the SQLite store in mlruns/)."""
    if isinstance(path, str) and path.startswith(("models:/", "runs:/")):
        return _from_uri(path, map_location, tracking_uri)
    p = Path(path)
    if not p.exists():
        raise LitSahsError(f"{p} does not exist: pass a directory written by save_detector or a Lightning .ckpt")
    if p.is_dir():
        inner = p / "artifacts" / "detector"  # a lit_sahs pyfunc model: read the artifact inside, never its code
        if not (p / META_FILE).exists() and (p / "MLmodel").is_file() and inner.is_dir():
            p = inner
        return _from_directory(p, map_location)
    if p.name in (META_FILE, WEIGHTS_FILE):
        return _from_directory(p.parent, map_location)
    if p.suffix == ".ckpt":
        return _from_checkpoint(p, map_location)
    raise LitSahsError(f"{p} is neither a detector directory nor a .ckpt: pass a directory written by save_detector")
