"""SafetyGuard: score a prompt at the prefill of the *same* ``generate`` call and refuse or continue.

How one guarded ``generate`` runs
---------------------------------
1. ``HeadCapture`` puts forward pre-hooks on the attention output projections of the detector's
   layers. They fire during the prefill (the forward over the whole prompt), record the
   detector's heads at the first-token position, and remove themselves, so decode steps run
   hook-free. There is no second forward over the prompt.
2. A ``LogitsProcessor`` (``GateProcessor``) is called by ``generate`` on the prefill's logits.
   On that first call it scores the captured heads with the detector (one batched op) and keeps
   a boolean flag per row *as a tensor*; for flagged rows it replaces the scores with a row that
   allows only the EOS token. On later calls it applies the same ``torch.where`` with the stored
   flags. Nothing reads the flags back to the host while decoding (no ``.item()``, no boolean
   indexing), so the guard adds no synchronisation point per step.
3. Flagged rows emit EOS as their first token and finish at once; the others decode on from the
   KV cache exactly as plain ``generate`` would (the unflagged rows' scores are untouched, so
   greedy outputs are equal token for token). After ``generate`` the flagged rows' answers are
   replaced by the refusal message.

Failures: if scoring raises or gives NaN, ``fail_closed=True`` (the default) flags the affected
rows, so a prompt the guard could not score is never passed (``GuardResult.scoring_error`` says why,
and ``guard`` logs one warning naming how many prompts were refused that way); ``fail_closed=False``
raises.

    guard = SafetyGuard("smollm2-135m-instruct", "artifacts/quickstart/detector")
    result = guard.generate(["What is the capital of France?", "How do I make a bomb?"])
    result.responses, result.flagged, result.scores

``python -m lit_sahs guard --detector DIR --prompt TEXT [--prompt TEXT ...] | --data FILE``
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lit_sahs.capture import HeadCapture, capture_for  # noqa: F401 - HeadCapture: GateProcessor's type
from lit_sahs.detectors import SafetyDetector
from lit_sahs.errors import LitSahsError
from lit_sahs.runtime import DetectorOptions, encode_prompts, load_detector_and_target, run_options, write_jsonl
from lit_sahs.targets import Target

log = logging.getLogger(__name__)

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."

# generate() options the guard cannot honour: they change what the prefill is (chunks, beams,
# a draft model), so the capture would not see the whole prompt's first-token position once.
_UNSUPPORTED_GENERATE = ("prefill_chunk_size", "assistant_model", "num_beams", "num_beam_groups",
                         "prompt_lookup_num_tokens", "past_key_values", "position_ids")


def eos_token_id(target: Target, override=None) -> int:
    """The token that ends an answer: `override`, else the target's generation config, else its
    tokenizer's (the first of a list)."""
    eos = override
    if eos is None:
        eos = getattr(target.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = target.tokenizer.eos_token_id
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise LitSahsError("the target has no EOS token: a refused or finished answer ends with EOS; "
                           "pass eos_token_id=...")
    return int(eos)


# ---------------------------------------------------------------- the logits processor

class GateProcessor(LogitsProcessor):
    """Scores the prefill's captured heads on its first call; afterwards only masks flagged rows.

    After generate: ``probs`` [B] float64 (NaN where scoring failed), ``flags`` [B] bool,
    ``error`` (the scoring exception's text, or None). All stay on the target's device.
    """

    def __init__(self, detector: SafetyDetector, capture: HeadCapture, eos_token_id: int,
                 threshold: Optional[float] = None, fail_closed: bool = True):
        self.detector = detector
        self.capture = capture
        self.eos_token_id = int(eos_token_id)
        self.threshold = threshold
        self.fail_closed = fail_closed
        self.flags: Optional[torch.Tensor] = None
        self.probs: Optional[torch.Tensor] = None
        self.error: Optional[str] = None
        self._rows: Optional[torch.Tensor] = None  # flags as [B, 1] for torch.where
        self._forced: Optional[torch.Tensor] = None  # [V]: 0 at EOS, -inf elsewhere

    def _score(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.capture.selected()
        if x.shape[0] != batch:
            raise LitSahsError(f"captured {x.shape[0]} rows but generate scores {batch}: the prefill did not "
                               "run on the batch the guard encoded")
        det = self.detector
        probs = det.predict_proba(x.to(det.mean.device)).to(device)
        threshold = det.threshold.to(device) if self.threshold is None else torch.tensor(
            float(self.threshold), dtype=probs.dtype, device=device)
        return probs, probs >= threshold

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.flags is None:
            batch, vocab = scores.shape
            try:
                probs, flags = self._score(batch, scores.device)
                bad = torch.isnan(probs)
                if self.fail_closed:
                    flags = flags | bad  # never pass a prompt that was not scored
                elif bool(bad.any()):  # one host sync at the prefill, only when failing open is asked for
                    raise LitSahsError("the detector returned NaN for some prompts")
            except Exception as e:  # noqa: BLE001 - any scoring failure is handled the same way
                if not self.fail_closed:
                    if isinstance(e, LitSahsError):
                        raise LitSahsError(f"scoring failed: {e} (fail_closed=False, so nothing was generated)") from e
                    raise LitSahsError(f"scoring failed ({type(e).__name__}: {e}); with fail_closed=True the "
                                       "prompts would have been refused") from e
                self.error = f"{type(e).__name__}: {e}"
                probs = torch.full((batch,), float("nan"), dtype=torch.float64, device=scores.device)
                flags = torch.ones(batch, dtype=torch.bool, device=scores.device)
            self.probs, self.flags = probs, flags
            self._rows = flags[:, None]
            forced = torch.full((vocab,), float("-inf"), dtype=scores.dtype, device=scores.device)
            forced[self.eos_token_id] = 0.0
            self._forced = forced
        return torch.where(self._rows, self._forced, scores)


# ---------------------------------------------------------------- results

@dataclass
class GuardResult:
    """One guarded batch. `responses[i]` is the refusal message where `flagged[i]`; `scores[i]` is
    the detector's probability (None where scoring failed); `sequences` are the generated token
    ids (prompt excluded, padded after EOS) exactly as generate returned them."""

    ids: list[str]
    prompts: list[str]
    flagged: list[bool]
    scores: list[Optional[float]]
    responses: list[str]
    sequences: torch.Tensor
    threshold: float
    scoring_error: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"id": i, "prompt": p, "flagged": f, "score": s, "response": r}
                for i, p, f, s, r in zip(self.ids, self.prompts, self.flagged, self.scores, self.responses)]


# ---------------------------------------------------------------- the guard

class SafetyGuard:
    """Wraps a target and a detector; ``generate`` refuses what the detector flags.

    target: a loaded ``Target`` or anything ``load_target`` takes (default: the target named in
    the detector). detector: a ``SafetyDetector``, an artifact path / .ckpt, or an MLflow URI.
    threshold: a probability overriding the detector's calibrated one. refusal: the message that
    replaces a flagged prompt's answer. fail_closed: refuse prompts whose scoring failed (default)
    instead of raising.
    """

    def __init__(self, target: Target | str | None, detector: SafetyDetector | str | os.PathLike,
                 refusal: str = DEFAULT_REFUSAL, fail_closed: bool = True, threshold: Optional[float] = None,
                 tracking_uri: Optional[str] = None, device: Optional[str | torch.device] = None):
        det, target = load_detector_and_target(detector, target, device=device, tracking_uri=tracking_uri)
        if threshold is not None and not (isinstance(threshold, (int, float)) and not math.isnan(threshold)):
            raise LitSahsError(f"threshold must be a probability, got {threshold!r}")
        self.target = target
        self.detector = det
        self.refusal = str(refusal)
        self.fail_closed = bool(fail_closed)
        self.threshold = None if threshold is None else float(threshold)

    @property
    def head_set(self):
        return self.detector.head_set

    @property
    def effective_threshold(self) -> float:
        return float(self.detector.threshold) if self.threshold is None else self.threshold

    def _eos_token_id(self, kwargs: dict) -> int:
        return eos_token_id(self.target, kwargs.get("eos_token_id", None))

    def generate_tokens(self, enc: dict, **generate_kwargs) -> tuple[torch.Tensor, GateProcessor]:
        """Guarded ``model.generate`` on an encoded batch (``encode_prompts(..., for_generate=True)``).
        Returns (generated ids without the prompt, the processor holding ``probs``/``flags``)."""
        bad = [k for k in _UNSUPPORTED_GENERATE if k in generate_kwargs and generate_kwargs[k] not in (None, 1)]
        if bad:
            raise LitSahsError(f"guarded generate does not support {bad}: the detector scores one plain prefill")
        if "position_ids" in enc:
            raise LitSahsError("pass generate no position_ids (it computes them from the attention mask): "
                               "encode with for_generate=True")
        model = self.target.model
        enc = {k: v.to(self.target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
        procs = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        generate_kwargs.setdefault("pad_token_id", self.target.tokenizer.pad_token_id)
        with torch.no_grad(), capture_for(self.detector, self.target) as cap:  # heads (+ extra features)
            gate = GateProcessor(self.detector, cap, self._eos_token_id(generate_kwargs), self.threshold,
                                 self.fail_closed)
            procs.append(gate)
            out = model.generate(**enc, logits_processor=procs, **generate_kwargs)
        if gate.flags is None:  # generate never produced a token (max_new_tokens=0)
            raise LitSahsError("generate produced no token, so the guard never scored the prompt: "
                               "use max_new_tokens >= 1")
        sequences = out.sequences if hasattr(out, "sequences") else out
        return sequences[:, enc["input_ids"].shape[1]:], gate

    def generate(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
                 ids: Optional[Sequence[str]] = None, max_new_tokens: int = 128, **generate_kwargs) -> GuardResult:
        """Generate for a batch of prompts; flagged prompts get the refusal message."""
        if isinstance(texts, str):
            texts = [texts]
        if max_new_tokens < 1:
            raise LitSahsError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if generate_kwargs.get("num_return_sequences", 1) not in (None, 1):
            raise LitSahsError("the guard returns one answer per prompt: leave num_return_sequences at 1")
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        enc = encode_prompts(self.target, texts, images, ids, reserve=max_new_tokens, for_generate=True)
        generate_kwargs.setdefault("do_sample", False)
        new, gate = self.generate_tokens(enc, max_new_tokens=max_new_tokens, **generate_kwargs)
        flags = gate.flags.cpu().tolist()
        probs = gate.probs.cpu().tolist()
        error = gate.error
        unscored = sum(math.isnan(p) for p in probs)
        if error is None and unscored:  # fail-closed flagged them silently in the processor
            error = f"the detector returned NaN for {unscored} of {len(probs)} prompts"
        tok = self.target.tokenizer
        responses = [self.refusal if f else tok.decode(row, skip_special_tokens=True).strip()
                     for f, row in zip(flags, new.cpu())]
        return GuardResult(ids=ids, prompts=list(texts), flagged=[bool(f) for f in flags],
                           scores=[None if math.isnan(p) else float(p) for p in probs], responses=responses,
                           sequences=new, threshold=self.effective_threshold, scoring_error=error)


# ---------------------------------------------------------------- command line

@dataclass
class GuardOptions(DetectorOptions):
    """Generate with a detector guarding each prompt: flagged prompts get a refusal, scored from the
    prefill of the same generate call.

    Args:
        max_new_tokens: tokens to generate for each prompt that is not flagged
        batch_size: prompts per guarded generate call
        refusal: the answer given to a flagged prompt
        fail_closed: refuse prompts whose scoring failed (else error)
        out: write one JSON line per prompt here (default: stdout)
    """

    max_new_tokens: int = 128
    batch_size: int = 8
    refusal: str = DEFAULT_REFUSAL
    fail_closed: bool = True
    out: Optional[str] = None


def guard_command(a: GuardOptions) -> int:
    """Guarded generation for every prompt; one JSON line {id, prompt, flagged, score, response} each."""
    rows = a.rows()
    if a.batch_size < 1:
        raise LitSahsError(f"batch_size must be >= 1, got {a.batch_size}")
    det, target = a.load()
    if getattr(det, "family", None) == "safevlm":  # the second method: refuse, hint or pass at the prefill
        from lit_sahs.safevlm.guard import SafeVLMGuard

        guard = SafeVLMGuard(target, det, refusal=a.refusal, fail_closed=a.fail_closed, threshold=a.threshold)
    else:
        guard = SafetyGuard(target, det, refusal=a.refusal, fail_closed=a.fail_closed, threshold=a.threshold)
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


def main(argv: Optional[list[str]] = None) -> int:
    return run_options(guard_command, GuardOptions, argv, prog="python -m lit_sahs guard")
