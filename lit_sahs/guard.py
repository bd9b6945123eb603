"""``python -m lit_sahs guard``: generation guarded by a detector of any family.

The guard itself is the family's (``ModelFamily.make_guard``): the safety-head detectors score
their heads at the prefill of the same ``generate`` call (``lit_sahs.detectors.guard``), SafeVLM
classifies with its safety head and refuses, hints or passes (``lit_sahs.safevlm.guard``).

    guard = load_guard("smollm2-135m-instruct", "artifacts/quickstart/detector")
    result = guard.generate(["What is the capital of France?", "How do I make a bomb?"])
    result.responses, result.flagged, result.scores

``python -m lit_sahs guard --detector DIR --prompt TEXT [--prompt TEXT ...] | --data FILE``
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import torch

from lit_sahs.checks import optional_probability
from lit_sahs.errors import LitSahsError
from lit_sahs.guarding import optional_guard_args
from lit_sahs.choices import DEFAULT_REFUSAL
from lit_sahs.loading import load_detector_and_target
from lit_sahs.options import GuardOptions
from lit_sahs.outputs import check_outputs
from lit_sahs.prompts import write_jsonl

log = logging.getLogger(__name__)


def load_guard(target, detector, refusal: str = DEFAULT_REFUSAL, fail_closed: bool = True,
               threshold: Optional[float] = None, tracking_uri: Optional[str] = None,
               device: Optional[str | torch.device] = None, answer_below=None, answer_direction=None):
    """The guard of `detector`'s family on `target`. target: a loaded ``Target`` or anything
    ``load_target`` takes (default: the target named in the detector); detector: a fitted detector,
    an artifact path / .ckpt, or an MLflow URI. threshold: a probability overriding the calibrated one;
    refusal: the answer a flagged prompt gets; fail_closed: refuse prompts whose scoring failed;
    answer_below: prompts scored below it may not open with a refusal (``lit_sahs.answer_nudge``; None: the
    cut ``calibrate --answer_tpr`` shipped in the detector, if any; "off": none); answer_direction: a refusal
    direction file ablated while those prompts decode (``lit_sahs.refusal_direction``; None: the detector's
    own, if any; "off": none)."""
    det, target = load_detector_and_target(detector, target, device=device, tracking_uri=tracking_uri)
    return det.make_guard(target, refusal=refusal, threshold=threshold, fail_closed=fail_closed,
                          **optional_guard_args(answer_below=answer_below, answer_direction=answer_direction))


# ---------------------------------------------------------------- command line (options: lit_sahs.options)

def guard_command(a: GuardOptions) -> int:
    """Guarded generation for every prompt; one JSON line {id, prompt, flagged, score, response} each."""
    check_outputs(files={"--out": a.out})
    optional_probability(a.threshold)  # above 1 would pass every prompt, below 0 refuse every one
    rows = a.rows()
    if a.batch_size < 1:
        raise LitSahsError(f"batch_size must be >= 1, got {a.batch_size}")
    det, target = a.load()
    guard = det.make_guard(target, refusal=a.refusal, fail_closed=a.fail_closed, threshold=a.threshold,
                           **optional_guard_args(judge_band=a.band(), answer_below=a.answer_below,
                                                 answer_direction=a.answer_direction))
    out, unscored, reasons = [], 0, []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(rows), a.batch_size), desc="guarding", unit="batch", disable=None, dynamic_ncols=True,
                  leave=False):
        chunk = rows[i:i + a.batch_size]
        res = guard.generate([r["text"] for r in chunk], [r["image"] for r in chunk], [r["id"] for r in chunk],
                             max_new_tokens=a.max_new_tokens)
        out.extend(res.rows())
        if res.scoring_error:  # fail-closed: the prompts it could not score were refused
            unscored += sum(s is None for s in res.scores)
            reasons += [] if res.scoring_error in reasons else [res.scoring_error]
    if unscored:
        log.warning("%d of %d prompts were refused because the detector could not score them (fail-closed): %s",
                    unscored, len(out), "; ".join(reasons))
    if a.out:
        write_jsonl(a.out, out)
        print(json.dumps({"out": a.out, "prompts": len(out), "flagged": sum(r["flagged"] for r in out)}))
    else:
        for r in out:
            print(json.dumps(r, ensure_ascii=False))
    return 0

