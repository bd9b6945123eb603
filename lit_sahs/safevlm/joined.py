"""Joined heads: the located safety heads' first-token outputs, read in SafeVLM's own forward, as
extra inputs of its safety head (``modules.JoinedHeads``); this module loads and checks the fitted
detector they start from.

The two methods see different things: the safety-head detector reads a few attention heads at the
first-token position (what the target already computes), SafeVLM's head attends over a projection
of one layer's hidden states. ``JoinedHeads`` gives the safety head both. From the heads' outputs
[B, k, D] (normalised like the detector's inputs) it makes

* k extra keys/values for the safety head's attention (one per head, through a ``SafetyProjector``);
* a logit ``s``: a logistic score over the flattened heads, initialised from a fitted logistic
  safety-head detector (weights, bias and its train-split normalisation).

``join_level_logits`` adds ``s`` to the attention head's unsafe-vs-safe logit, so the risk is
sigmoid(s + u). ``SafetyModules`` starts its level classifier at u = 0 when heads are joined: at
initialisation the risk is the detector's probability on the head outputs SafeVLM's forward reads
(which carry the safety tokens in front of the prompt, so they differ slightly from a plain
forward's), and training moves both paths from there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_sahs.artifact_format import read_artifact
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet, TargetFingerprint


def load_head_detector(path: str, fingerprint: TargetFingerprint, heads: Optional[HeadSet]):
    """The fitted logistic safety-head detector at `path` (an artifact directory), checked against
    the target and, when given, the heads to join; returns (detector, its HeadSet)."""
    from lit_sahs.detectors.logistic import LogisticDetector

    source = f"head_keys_init {path}"
    directory = Path(path).parent if Path(path).is_file() else Path(path)
    try:
        meta, tensors = read_artifact(directory)
    except LitSahsError as e:
        raise LitSahsError(f"{source}: {e}") from None
    if meta.get("detector") != LogisticDetector.family:
        raise LitSahsError(f"{source} holds a {meta.get('detector')} detector: joined heads start from a logistic "
                           "safety-head detector (fit one with configs/quickstart.yaml or evaluate's logistic)")
    det = LogisticDetector.from_artifact(meta, tensors, str(path))
    if det.feature_spec:
        raise LitSahsError(f"{source} reads extra features {list(det.feature_spec.names)} beside its heads: "
                           "joined heads start from a detector on heads alone")
    try:
        det.check_target(fingerprint)
    except LitSahsError as e:
        raise LitSahsError(f"{source}: {e}") from None
    if heads is not None and tuple(heads) != tuple(det.head_set):
        raise LitSahsError(f"{source} reads heads {det.head_set.spec()} but head_keys are {heads.spec()}: "
                           "leave head_keys empty to take the detector's, or give the same heads")
    return det.eval(), det.head_set
