"""The detector artifact format, family-agnostic: ``detector.safetensors`` (tensors) + ``detector.json``
(everything else), no pickle anywhere.

This module reads and writes the two files and checks what every family shares (the format header,
a finite threshold in [0, 1], finite tensors); what the files mean is each family's
``from_artifact``. It sits low (errors and io only), so families can read a stage-I artifact of their
own without reaching up to the loader.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_dir

WEIGHTS_FILE = "detector.safetensors"
META_FILE = "detector.json"
FORMAT = "lit_sahs.detector"
FORMAT_VERSION = 1
# tensors an artifact carries beside the family's own (the answer side's refusal direction,
# ``lit_sahs.answer_cut``): a family's loader never sees them
SIDE_PREFIX = "answer_side."
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


def init_args(hparams) -> dict[str, Any]:
    """Constructor arguments only: LightningCLI adds bookkeeping keys such as `_class_path`."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def state_error_reason(e: BaseException) -> str:
    """The reason of a load_state_dict error: torch's message opens with a header line
    ("Error(s) in loading state_dict for X:") and gives each reason on its own line after it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    if not lines:
        return repr(e)
    more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0][:300] + more


def check_finite(tensors: Mapping[str, torch.Tensor], source: Any) -> None:
    """Refuse NaN / inf in any floating tensor: a detector with them flags (or passes) everything."""
    for name, t in tensors.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise LitSahsError(f"{source}: tensor {name!r} holds NaN or inf values: the artifact is corrupt, "
                               "fit the detector again and re-save it")


def write_artifact(directory: str | os.PathLike, family: str, meta: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor], overwrite: bool = False) -> Path:
    """Write `directory`/detector.{safetensors,json} atomically (a reader never sees half an artifact)."""
    import lit_sahs

    dest = Path(directory)
    if dest.exists() and not overwrite:
        raise LitSahsError(f"{dest} already exists: choose another directory or pass overwrite=True")
    if dest.exists() and not (dest / META_FILE).is_file():
        raise LitSahsError(f"{dest} exists and is not a detector artifact: refusing to replace it")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(meta), "detector": family,
            "lit_sahs_version": lit_sahs.__version__}
    try:
        text = json.dumps(full, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise LitSahsError(f"detector description is not plain JSON values ({e}): use numbers, strings and lists") from e
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def build(tmp: Path) -> None:
        save_file(cpu, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "detector": family})
        (tmp / META_FILE).write_text(text)

    return atomic_dir(dest, build, replace=True)


def read_meta(directory: Path) -> dict[str, Any]:
    """detector.json of an artifact directory, with its format header checked."""
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
    return meta


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """detector.safetensors of an artifact directory (CPU), finite values checked."""
    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LitSahsError(f"{weights_path} cannot be read ({e}): the artifact is corrupt, re-save it") from e
    check_finite(tensors, weights_path)
    return tensors


def read_artifact(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(detector.json, the family's tensors) of an artifact directory, format checked; which family reads
    them is the loader's business (``meta["detector"]``)."""
    directory = Path(directory)
    meta = read_meta(directory)
    return meta, family_tensors(read_tensors(directory))


def family_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An artifact's tensors without those beside the family's own (``SIDE_PREFIX``)."""
    return {k: v for k, v in tensors.items() if not k.startswith(SIDE_PREFIX)}
