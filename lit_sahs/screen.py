"""Screening: score prompts with a detector without generating, running the target only up to the
deepest layer the detector reads (early exit).

Each family decides what one forward runs (``ModelFamily.score_encoded``). A safety-head detector needs the heads of its HeadSet at the first-token position and nothing after them.
``EarlyExit`` (in ``lit_sahs.hooks``, beside the capture forward) registers a forward pre-hook on the deepest needed layer's attention output
projection, *after* HeadCapture's hooks, that raises ``StopForward`` once that layer's heads are
recorded; the forward is abandoned there. Layers past it, the final norm and the LM head never
run, and the activations are those of a full forward bit for bit (the same ops on the same
inputs), which a test checks. Raising from a hook works for every architecture that
``targets.sites`` knows, vision-language ones included (the vision tower runs first), and leaves
the module tree untouched.

With the deepest selected layer at two thirds of the depth, a screen costs about two thirds of a
full forward: see experiments/benchmarks/guard.py. A detector fitted with extra features
(``--data.features resid,refusal``) gets them from the same forward, run to the end: the refusal
probability needs the logits; the judge feature runs its own short prefill (``lit_sahs.self_judge``).

A judge band makes the target's own verdict a second stage: prompts whose detector score lies in the
band are decided by the judge prefill (flagged where its log-odds of "unsafe" reach the calibrated
cut), the others by the detector alone; ``ScreenResult.judged`` marks which. A detector calibrated
with ``calibrate --judge_band LO,HI`` carries band and cut and uses them by default; ``--judge_band off``
turns them off (``lit_sahs.self_judge.judge_rule``).

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
from tqdm.auto import tqdm

from lit_sahs.checks import optional_probability
from lit_sahs.data.user_files import parse_label
from lit_sahs.detectors.metrics import summary_metrics
from lit_sahs.errors import LitSahsError
from lit_sahs.family import ModelFamily
from lit_sahs.guarding import threshold_override
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import capture_forward
from lit_sahs.hooks import EarlyExit, StopForward  # noqa: F401 - defined beside capture_forward, part of screen's API
from lit_sahs.loading import load_detector_and_target
from lit_sahs.options import ScreenOptions
from lit_sahs.outputs import check_outputs
from lit_sahs.prompts import encode_prompts, write_jsonl
from lit_sahs.self_judge import band_decisions, judge_rule, row_judge
from lit_sahs.targets import Target


def head_activations(target: Target, enc: dict, heads: HeadSet, early_exit: bool = True,
                     features=None) -> torch.Tensor:
    """[batch, k, head_dim] of `heads` at the first-token position for an encoded batch, running
    the target only up to the deepest layer of `heads` (or fully with ``early_exit=False``, or with
    extra ``features``, which follow the heads: see ``runtime.capture_forward``)."""
    return capture_forward(target, enc, heads, early_exit=early_exit, features=features)


@dataclass
class ScreenResult:
    ids: list[str]
    scores: np.ndarray  # probabilities, NaN where the detector gave NaN
    flagged: np.ndarray  # bool; NaN scores are flagged (a prompt that was not scored is not passed)
    threshold: float
    judged: Optional[np.ndarray] = None  # with a judge band: bool, the rows the judge decided
    judge_logodds: Optional[np.ndarray] = None  # its log-odds of "unsafe" (NaN where not judged)

    def rows(self) -> list[dict]:
        rows = [{"id": i, "score": None if math.isnan(s) else float(s), "flagged": bool(f)}
                for i, s, f in zip(self.ids, self.scores.tolist(), self.flagged.tolist())]
        if self.judged is not None:
            for r, j, v in zip(rows, self.judged.tolist(), self.judge_logodds.tolist()):
                r["judged"] = bool(j)
                if j:
                    r["judge_logodds"] = None if math.isnan(v) else float(v)
        return rows


class Screener:
    """Scores prompts with a detector, early-exiting the target after the detector's deepest layer.
    Prompts are batched by length (less padding) and results come back in input order."""

    def __init__(self, target: Target | str | None, detector: ModelFamily | str | os.PathLike,
                 threshold: Optional[float] = None, batch_size: int = 16, tracking_uri: Optional[str] = None,
                 device: Optional[str | torch.device] = None, judge_band=None, judge_cut: Optional[float] = None):
        det, target = load_detector_and_target(detector, target, device=device, tracking_uri=tracking_uri)
        if batch_size < 1:
            raise LitSahsError(f"batch_size must be >= 1, got {batch_size}")
        self.target, self.detector = target, det
        override = threshold_override(threshold)
        self.threshold = float(det.threshold) if override is None else override
        self.batch_size = batch_size
        self.judge_rule = judge_rule(judge_band, det.judge, judge_cut)  # the band the target's own verdict decides

    @property
    def layers_run(self) -> int:
        """Decoder layers one forward runs (the detector's family decides: e.g. up to its deepest head)."""
        return self.detector.layers_run(self.target)

    def score(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
              ids: Optional[Sequence[str]] = None, progress: bool = False) -> ScreenResult:
        """`progress`: a bar over the prompts on stderr (when it is a terminal)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        images = list(images) if images is not None else [None] * len(texts)
        if not texts:
            raise LitSahsError("no prompts given: pass at least one non-empty prompt")
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        scores = np.full(len(texts), np.nan)
        bar = tqdm(total=len(texts), desc="screening", unit="prompt", disable=None if progress else True,
                   dynamic_ncols=True, leave=False)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = encode_prompts(self.target, [texts[i] for i in idx], [images[i] for i in idx], [ids[i] for i in idx])
            scores[idx] = self.detector.score_prompts(self.target, enc, [texts[i] for i in idx])
            bar.update(len(idx))
        bar.close()
        flagged = ~(scores < self.threshold)  # NaN -> flagged
        if self.judge_rule is None:
            return ScreenResult(ids, scores, flagged, self.threshold)

        # the judge prefill for the band's rows only, batched
        flagged, judged, logodds = band_decisions(scores, flagged, self.judge_rule,
                                                  row_judge(self.target, texts, self.batch_size))
        return ScreenResult(ids, scores, flagged, self.threshold, judged, logodds)


# ---------------------------------------------------------------- command line (options: lit_sahs.options)

def screen_command(a: ScreenOptions) -> int:
    """Score every prompt; the last stdout line is a summary (with AUROC etc. when every row has a label)."""
    check_outputs(files={"--out": a.out, "--passed": a.passed})
    optional_probability(a.threshold)  # above 1 would pass every prompt, below 0 flag every one
    rows = a.rows()
    det, target = a.load()
    screener = Screener(target, det, threshold=a.threshold, batch_size=a.batch_size, judge_band=a.band())
    res = screener.score([r["text"] for r in rows], [r["image"] for r in rows], [r["id"] for r in rows], progress=True)
    scored = [{**r, **s} for r, s in zip(rows, res.rows())]
    summary = {"prompts": len(rows), "flagged": int(res.flagged.sum()), "threshold": res.threshold,
               "layers_run": f"{screener.layers_run}/{target.geometry.num_layers}"}
    if res.judged is not None:
        summary["judged"] = int(res.judged.sum())
    labels = [r.get("label") for r in rows]
    if all(l is not None for l in labels):
        from lit_sahs.detectors import compute_report

        parsed = [parse_label(l) for l in labels]
        if any(l is None for l in parsed):
            raise LitSahsError("labels must be 0 (benign) or 1 (malicious)")
        y = np.array(parsed)
        if set(y.tolist()) <= {0, 1} and len(set(y.tolist())) == 2 and not np.isnan(res.scores).any():
            summary["metrics"] = summary_metrics(compute_report(res.scores, y, threshold=res.threshold)["overall"])
        if res.judged is not None and set(y.tolist()) == {0, 1}:  # what the two stages flag together
            summary["flagged_tpr"] = float(res.flagged[y == 1].mean())
            summary["flagged_fpr"] = float(res.flagged[y == 0].mean())
    if a.out:
        write_jsonl(a.out, [{k: v for k, v in r.items() if k != "image" or v} for r in scored])
        summary["out"] = a.out
    if a.passed:
        write_jsonl(a.passed, [{k: v for k, v in r.items()
                                if k not in ("score", "flagged", "judged", "judge_logodds") and (k != "image" or v)}
                               for r in scored if not r["flagged"]])
        summary["passed"] = a.passed
    if not a.out:
        for r in scored:
            print(json.dumps({k: r[k] for k in ("id", "score", "flagged", "judged", "judge_logodds") if k in r}))
    print(json.dumps(summary))
    return 0

