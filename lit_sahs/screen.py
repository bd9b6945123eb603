"""Screening: score prompts with a detector without generating, running the target only up to the
deepest layer the detector reads (early exit).

The detector needs the heads of its HeadSet at the first-token position and nothing after them.
``EarlyExit`` registers a forward pre-hook on the deepest needed layer's attention output
projection, *after* HeadCapture's hooks, that raises ``StopForward`` once that layer's heads are
recorded; the forward is abandoned there. Layers past it, the final norm and the LM head never
run, and the activations are those of a full forward bit for bit (the same ops on the same
inputs), which a test checks. Raising from a hook works for every architecture that
``targets.sites`` knows, vision-language ones included (the vision tower runs first), and leaves
the module tree untouched.

With the deepest selected layer at two thirds of the depth, a screen costs about two thirds of a
full forward: see experiments/benchmarks/guard.py.

    screener = Screener("smollm2-135m-instruct", "artifacts/quickstart/detector")
    result = screener.score(["What is the capital of France?", "How do I make a bomb?"])

``python -m lit_sahs screen --detector DIR --data prompts.jsonl --out scores.jsonl``
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from lit_sahs.capture import HeadCapture
from lit_sahs.detectors import SafetyDetector
from lit_sahs.errors import LitSahsError
from lit_sahs.guard import encode_prompts, gather_prompts, resolve_detector, write_jsonl
from lit_sahs.heads import HeadSet
from lit_sahs.targets import Target, load_target, sites


class StopForward(Exception):
    """Raised by EarlyExit's hook to abandon a forward once the needed layers have run."""


class EarlyExit:
    """Context manager: a forward on `model` stops at the attention output projection of `layer`
    (its input, i.e. that layer's head outputs, has been computed; nothing after it runs). Enter
    it *after* the HeadCapture whose hooks must see that input. Call the model through ``run``,
    which swallows the StopForward."""

    def __init__(self, model: nn.Module, layer: int):
        projs = sites.output_projections(model)
        if not 0 <= layer < len(projs):
            raise LitSahsError(f"early exit at layer {layer} is outside the target's {len(projs)} layers")
        self.model, self.layer, self._proj = model, layer, projs[layer]
        self._handle = None
        self.stopped = False

    def _hook(self, module, args):
        self.stopped = True
        raise StopForward()

    def __enter__(self) -> "EarlyExit":
        self.stopped = False
        self._handle = self._proj.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc[0] is StopForward  # a StopForward escaping a `with` block is the expected exit

    def run(self, **inputs) -> None:
        try:
            self.model(**inputs)
        except StopForward:
            pass
        if not self.stopped:
            raise LitSahsError(f"the forward never reached layer {self.layer}: early exit did not fire")


@torch.no_grad()
def head_activations(target: Target, enc: dict, heads: HeadSet, early_exit: bool = True) -> torch.Tensor:
    """[batch, k, head_dim] of `heads` at the first-token position for an encoded batch, running
    the target only up to the deepest layer of `heads` (or fully with ``early_exit=False``)."""
    heads = heads.validate(target.geometry)
    model = target.model
    enc = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
    with HeadCapture(model, heads, target.geometry) as cap:
        if early_exit:
            with EarlyExit(model, max(heads.layers)) as stop:
                stop.run(**enc, use_cache=False)
        else:
            model(**enc, use_cache=False, logits_to_keep=1)
    return cap.selected()


@dataclass
class ScreenResult:
    ids: list[str]
    scores: np.ndarray  # probabilities, NaN where the detector gave NaN
    flagged: np.ndarray  # bool; NaN scores are flagged (a prompt that was not scored is not passed)
    threshold: float

    def rows(self) -> list[dict]:
        return [{"id": i, "score": None if math.isnan(s) else float(s), "flagged": bool(f)}
                for i, s, f in zip(self.ids, self.scores.tolist(), self.flagged.tolist())]


class Screener:
    """Scores prompts with a detector, early-exiting the target after the detector's deepest layer.
    Prompts are batched by length (less padding) and results come back in input order."""

    def __init__(self, target: Target | str | None, detector: SafetyDetector | str | os.PathLike,
                 threshold: Optional[float] = None, batch_size: int = 16, tracking_uri: Optional[str] = None,
                 device: Optional[str | torch.device] = None):
        det = resolve_detector(detector, tracking_uri=tracking_uri)
        if not det.is_bound:
            raise LitSahsError("the detector is not fitted: fit it or load a saved one")
        if not isinstance(target, Target):
            target = load_target(target or det.fingerprint.name, device=device or "cpu")
        det.check_target(target.fingerprint)
        det.head_set.validate(target.geometry)
        if batch_size < 1:
            raise LitSahsError(f"batch_size must be >= 1, got {batch_size}")
        self.target, self.detector = target, det.to(target.device).eval()
        self.threshold = float(det.threshold) if threshold is None else float(threshold)
        self.batch_size = batch_size

    @property
    def layers_run(self) -> int:
        return max(self.detector.head_set.layers) + 1

    def score(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
              ids: Optional[Sequence[str]] = None) -> ScreenResult:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        images = list(images) if images is not None else [None] * len(texts)
        if not texts:
            raise LitSahsError("no prompts given: pass at least one non-empty prompt")
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        scores = np.full(len(texts), np.nan)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = encode_prompts(self.target, [texts[i] for i in idx], [images[i] for i in idx], [ids[i] for i in idx])
            x = head_activations(self.target, enc, self.detector.head_set)
            scores[idx] = self.detector.predict_proba(x.to(self.detector.mean.device)).cpu().numpy()
        flagged = ~(scores < self.threshold)  # NaN -> flagged
        return ScreenResult(ids, scores, flagged, self.threshold)


# ---------------------------------------------------------------- command line

def screen_parser():
    from jsonargparse import ArgumentParser

    from lit_sahs.guard import add_detector_prompt_args

    p = ArgumentParser(prog="python -m lit_sahs screen",
                       description="Score prompts with a detector without generating (the target runs only up to "
                                   "the detector's deepest layer).")
    add_detector_prompt_args(p, data_help=".jsonl/.csv (text[, id, image, label]) or .txt of prompts")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default=None, help="write one JSON line per prompt (id, score, flagged) here")
    p.add_argument("--passed", default=None, help="write the rows that were NOT flagged here (bulk filtering)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from lit_sahs.guard import _flatten

    a = screen_parser().parse_args(argv)
    rows = gather_prompts(_flatten(a.prompt), a.data, _flatten(a.image))
    det = resolve_detector(a.detector, tracking_uri=a.tracking_uri)
    target = load_target(a.target or det.fingerprint.name, dtype=a.dtype, device=a.device)
    screener = Screener(target, det, threshold=a.threshold, batch_size=a.batch_size)
    res = screener.score([r["text"] for r in rows], [r["image"] for r in rows], [r["id"] for r in rows])
    scored = [{**r, **s} for r, s in zip(rows, res.rows())]
    summary = {"prompts": len(rows), "flagged": int(res.flagged.sum()), "threshold": res.threshold,
               "layers_run": f"{screener.layers_run}/{target.geometry.num_layers}"}
    labels = [r.get("label") for r in rows]
    if all(l is not None for l in labels):
        from lit_sahs.detectors import compute_report

        try:
            y = np.array([int(l) for l in labels])
        except (TypeError, ValueError):
            raise LitSahsError("labels must be 0 (benign) or 1 (malicious)") from None
        if set(y.tolist()) <= {0, 1} and len(set(y.tolist())) == 2 and not np.isnan(res.scores).any():
            rep = compute_report(res.scores, y, threshold=res.threshold)["overall"]
            summary["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rep.items()
                                  if k in ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "fpr_at_95tpr", "n")}
    if a.out:
        write_jsonl(a.out, [{k: v for k, v in r.items() if k != "image" or v} for r in scored])
        summary["out"] = a.out
    if a.passed:
        write_jsonl(a.passed, [{k: v for k, v in r.items() if k not in ("score", "flagged") and (k != "image" or v)}
                               for r in scored if not r["flagged"]])
        summary["passed"] = a.passed
    if not a.out:
        for r in scored:
            print(json.dumps({"id": r["id"], "score": r["score"], "flagged": r["flagged"]}))
    print(json.dumps(summary))
    return 0
