"""The answer side's cut, calibrated and shipped in the artifact: which prompts a guard answers for sure.

A guard's answer side (``lit_sahs.answer_nudge``) lets prompts scored below ``answer_below`` decode
without refusal openings (and, with a refusal direction, without the direction the target refuses
along). Where that cut may sit is a harmful-side question: every harmful prompt below it loses the
target's own refusal. So the cut is the highest score that keeps ``answer_tpr`` of the harmful prompts
of sources the detector never read at or above it, every source weighing the same
(``detectors.metrics.keep_share_threshold``, the rule of SafeVLM's ``lora_tpr`` gate). Its scores come
from the same place as the threshold's: the cross-fitted out-of-source scores of the detector's store
(``crossfit.CrossFitThreshold.harmful``), or, for a family that trains on no store (SafeVLM), the
detector's live scores of held-out sources the user names.

    record = fit_answer_cut(harmful_by_source, 0.9, benign_by_source)   # det.answer = record
    python -m lit_sahs calibrate --detector D --store S --answer_tpr 0.9 [--answer_direction F]

The record (and the refusal direction, when one is shipped) is written into the detector artifact by
``lit_sahs.artifact``; guards, ``serve`` and the MLflow model use it by default (``answer_settings``
in ``lit_sahs.answer_nudge``); ``--answer_below off`` turns it off.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from lit_sahs.artifact_format import SIDE_PREFIX
from lit_sahs.checks import answer_tpr_arg
from lit_sahs.detectors.metrics import keep_share_threshold
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import TargetFingerprint
from lit_sahs.refusal_direction import RefusalDirection

FROM_STORE = "from_store"          # the direction fitted on the store's training rows (``shipped_direction``)
CROSSFIT = "crossfit_sources"      # out-of-source scores of the cross-fitted fold fits
LIVE = "held_out_sources"          # the shipped detector's scores of sources the user names
DIRECTION_TENSOR = SIDE_PREFIX + "refusal_direction"  # the direction's key in detector.safetensors


def fit_answer_cut(harmful: Mapping[str, Any], answer_tpr: float, benign: Optional[Mapping[str, Any]] = None,
                   method: str = CROSSFIT) -> dict:
    """The calibration record: ``answer_below`` keeps `answer_tpr` of the `harmful` scores (source -> scores)
    at or above it, sources weighing the same; per source the share of harmful rows kept and, with
    `benign`, the share of benign rows below the cut (answered for sure); their means over sources."""
    share = answer_tpr_arg(answer_tpr)
    harmful = {s: np.asarray(v, dtype=np.float64) for s, v in harmful.items() if len(v)}
    cut = min(1.0, max(0.0, keep_share_threshold(harmful, share)))  # refuses no rows and NaN scores
    kept = {s: {"rows": int(len(v)), "kept": float((v >= cut).mean())} for s, v in sorted(harmful.items())}
    record = {"method": method, "answer_tpr": share, "answer_below": float(cut), "harmful": kept,
              "kept": float(np.mean([v["kept"] for v in kept.values()]))}
    benign = {s: np.asarray(v, dtype=np.float64) for s, v in (benign or {}).items() if len(v)}
    if benign:
        answered = {s: {"rows": int(len(v)), "answered": float((v < cut).mean())} for s, v in sorted(benign.items())}
        record["benign"] = answered
        record["answered"] = float(np.mean([v["answered"] for v in answered.values()]))
    return record


def shipped_direction(spec: str, det, store=None, held_out=None, device: str = "auto",
                      option: str = "--answer_direction") -> RefusalDirection:
    """The refusal direction shipped with the answer cut: the file `spec` (checked against `det`'s target), or
    ``from_store``: fitted on `store`'s rows outside `held_out`, its layer picked by effect on `det`'s target
    (loaded here; ``refusal_direction.select_layer``), so a recipe needs no direction file made beforehand."""
    if spec != FROM_STORE:
        direction = RefusalDirection.load(spec)
        direction.fingerprint.check(det.fingerprint, option)
        return direction
    if store is None:
        raise LitSahsError(f"{option} {FROM_STORE} fits the direction on the training rows of a store: give the store")
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.devices import resolve_device
    from lit_sahs.refusal_direction import recorded_layers, select_layer
    from lit_sahs.targets import load_target

    opened = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    opened.fingerprint.check(det.fingerprint, f"store {opened.path}")
    recorded_layers(opened)  # a store without residual layers fails before the target loads
    target = load_target(det.fingerprint.name, device=resolve_device(device))
    return select_layer(target, opened, held_out, progress=True)


def stored_answer(record: Any, source: Any) -> Optional[dict]:
    """An artifact's answer record checked (None: none); anything malformed is one error naming `source`."""
    if record is None:
        return None
    try:
        if not isinstance(record, dict):
            raise ValueError("not an object")
        below, share = record["answer_below"], record["answer_tpr"]
        for v in (below, share):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{v!r} is not a probability")
        direction = record.get("direction")
        if direction is not None and not (isinstance(direction, dict) and isinstance(direction.get("layer"), int)):
            raise ValueError("its refusal direction has no layer")
    except (KeyError, ValueError) as e:
        raise LitSahsError(f"{source}: the answer-side calibration is corrupt ({e}); calibrate it again") from None
    return dict(record)


def answer_to_artifact(record: Optional[dict], direction: Optional[RefusalDirection]) -> tuple[Optional[dict], dict]:
    """(the record to write into detector.json, the tensors to add to detector.safetensors)."""
    if direction is not None and record is None:
        raise LitSahsError("a refusal direction is shipped with an answer cut: calibrate with --answer_tpr too")
    if record is None:
        return None, {}
    record = dict(record)
    record.pop("direction", None)
    if direction is None:
        return record, {}
    record["direction"] = {"layer": int(direction.layer), "rows": dict(direction.rows),
                           "selection": {str(k): float(v) for k, v in direction.selection.items()},
                           "fingerprint": direction.fingerprint.to_dict()}
    return record, {DIRECTION_TENSOR: direction.vector.float().contiguous()}


def answer_from_artifact(record: Optional[dict], vector, fingerprint: Optional[TargetFingerprint],
                         source: Any) -> tuple[Optional[dict], Optional[RefusalDirection]]:
    """The answer record (checked by ``stored_answer``) and the refusal direction an artifact carries
    (`vector`: its tensor, or None). A direction for another target than the detector's is refused."""
    spec = (record or {}).get("direction")
    if (vector is None) != (spec is None):
        raise LitSahsError(f"{source}: the answer-side refusal direction is half there (vector and description "
                           "must both be present): the artifact is corrupt, calibrate it again")
    if vector is None:
        return record, None
    record = {k: v for k, v in record.items() if k != "direction"}  # in memory the direction is its own object
    try:
        fp = TargetFingerprint.from_dict(spec["fingerprint"])
        rows = dict(spec.get("rows") or {})
        selection = {int(k): float(v) for k, v in (spec.get("selection") or {}).items()}
    except (KeyError, TypeError, ValueError, OverflowError, LitSahsError) as e:
        raise LitSahsError(f"{source}: the answer-side refusal direction's description is corrupt ({e})") from None
    if vector.ndim != 1 or not vector.numel() or not math.isfinite(float(vector.norm())) or float(vector.norm()) == 0:
        raise LitSahsError(f"{source}: the answer-side refusal direction is not one finite non-zero vector")
    if fingerprint is not None:
        fp.check(fingerprint, f"{source}: the answer-side refusal direction")
    return record, RefusalDirection(vector.float() / vector.norm(), int(spec["layer"]), fp, rows, selection)


def summary(record: Optional[dict], direction: Optional[RefusalDirection] = None) -> Optional[dict]:
    """The record's headline figures for a command's JSON line."""
    if record is None:
        return None
    keys = ("method", "answer_tpr", "answer_below", "kept", "answered")
    out = {k: record[k] for k in keys if k in record}
    if direction is not None:
        out["direction_layer"] = direction.layer
    return out
