"""A detector and the target it reads, loaded together: what guard, screen, ablate and evaluate's
``score_file`` start from. ``resolve_detector`` takes an instance, an artifact dir / .ckpt, or a
models:/ / runs:/ URI; ``load_detector_and_target`` is the one sequence "detector, then the target it
names (or an override), then the family's own checks against that target (``ModelFamily.prepare``)"."""
from __future__ import annotations

import os
from typing import Optional

import torch

from lit_sahs.artifact import load_detector
from lit_sahs.devices import resolve_device
from lit_sahs.errors import LitSahsError
from lit_sahs.family import ModelFamily
from lit_sahs.targets import Target, load_target
from lit_sahs.targets.registry import parse_device_map


def resolve_detector(spec: str | os.PathLike | ModelFamily, tracking_uri: Optional[str] = None,
                     map_location: str | torch.device = "cpu") -> ModelFamily:
    """A detector from an instance, an artifact directory / detector.json / .ckpt, or a registry URI
    (``models:/name/1``, ``models:/name@champion``, ``runs:/<id>/detector``; fetched by
    ``lit_sahs.model_uri``, which accepts only safetensors + JSON artifacts)."""
    if isinstance(spec, ModelFamily):
        return spec.to(map_location).eval()
    return load_detector(str(spec), map_location=map_location, tracking_uri=tracking_uri)


def load_detector_and_target(detector: str | os.PathLike | ModelFamily, target: Target | str | None = None,
                             device: Optional[str | torch.device] = "auto", dtype: Optional[str] = None,
                             tracking_uri: Optional[str] = None, device_map=None,
                             offload_folder: Optional[str] = None) -> tuple[ModelFamily, Target]:
    """(detector in eval mode on the target's device, target). The target is `target` when it is a
    loaded ``Target``, else loaded by that name or, by default, the name the detector records;
    `device_map` / `offload_folder` place a target larger than one device (``load_target``).
    A detector made for another target (fingerprint), or one that does not fit it (e.g. heads outside
    its geometry), is a LitSahsError: its scores would be meaningless."""
    det = resolve_detector(detector, tracking_uri=tracking_uri)
    if not det.is_bound:
        raise LitSahsError("the detector is not fitted: fit it or load a saved one")
    if not isinstance(target, Target):
        device = device if isinstance(device, torch.device) else resolve_device(device)
        target = load_target(target or det.fingerprint.name, dtype=dtype, device=device,
                             device_map=parse_device_map(device_map), offload_folder=offload_folder)
    det.prepare(target)
    return det.to(target.device).eval(), target
