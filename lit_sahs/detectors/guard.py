"""SafetyGuard: a safety-head detector scores a prompt at the prefill of the *same* ``generate``
call, which then refuses or continues.

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

A judge band: rows whose score lies in it are decided by the target's own verdict
(``lit_sahs.self_judge``), a second short prefill over those rows only, run by the gate at the prefill
(one host sync there); ``GuardResult.judged`` says which rows it decided. A detector calibrated with
``calibrate --judge_band`` carries its band and cut and uses them by default (``judge_band="off"``
turns them off); ``judge_band=(lo, hi)`` must be that band unless ``judge_cut`` gives the cut.

Failures: if scoring raises or gives NaN, ``fail_closed=True`` (the default) flags the affected
rows, so a prompt the guard could not score is never passed (``GuardResult.scoring_error`` says why);
``fail_closed=False`` raises.

    guard = SafetyGuard(target, detector)          # loaded objects; lit_sahs.guard.load_guard takes paths
    result = guard.generate(["What is the capital of France?", "How do I make a bomb?"])
    result.responses, result.flagged, result.scores
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lit_sahs.hooks import HeadCapture, capture_for  # noqa: F401 - HeadCapture: GateProcessor's type
from lit_sahs.errors import LitSahsError
from lit_sahs.choices import DEFAULT_REFUSAL
from lit_sahs.guarding import UNSUPPORTED_GENERATE, GuardResult, answered_rows, eos_token_id, threshold_override
from lit_sahs.answer_nudge import AnswerNudge, answer_settings
from lit_sahs.prompts import encode_prompts
from lit_sahs.self_judge import JudgeRule, band_decisions, judge_rule, row_judge


# ---------------------------------------------------------------- the logits processor

class GateProcessor(LogitsProcessor):
    """Scores the prefill's captured heads on its first call; afterwards only masks flagged rows.

    After generate: ``probs`` [B] float64 (NaN where scoring failed), ``flags`` [B] bool,
    ``error`` (the scoring exception's text, or None). All stay on the target's device.
    """

    def __init__(self, detector, capture: HeadCapture, eos_token_id: int,
                 threshold: Optional[float] = None, fail_closed: bool = True,
                 rule: Optional[JudgeRule] = None, judge=None):
        self.detector = detector
        self.rule, self.judge = rule, judge  # judge: row positions -> the judge prefill's log-odds
        self.judged: Optional[torch.Tensor] = None
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
        flags = probs >= threshold
        if self.rule is not None:  # the uncertain band goes to the judge: one host sync, at the prefill
            flags, judged, _ = band_decisions(probs.cpu().numpy(), flags.cpu().numpy(), self.rule, self.judge)
            self.judged = torch.from_numpy(judged)
            flags = torch.from_numpy(flags).to(device)
        return probs, flags

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


# ---------------------------------------------------------------- the guard

class SafetyGuard:
    """Wraps a target and a detector; ``generate`` refuses what the detector flags.

    target: a loaded ``Target``; detector: a fitted ``SafetyDetector`` made for it
    (``lit_sahs.guard.load_guard`` loads both from names, paths and registry URIs). threshold: a probability overriding the detector's calibrated one. refusal: the message that
    replaces a flagged prompt's answer. fail_closed: refuse prompts whose scoring failed (default)
    instead of raising. judge_band / judge_cut: the second stage (``self_judge.judge_rule``; default: the
    detector's calibrated one, if any). answer_below: prompts scored below it may not open their answer
    with a refusal (``lit_sahs.answer_nudge``; None: the detector's calibrated cut, if any; "off": none);
    answer_direction: a ``RefusalDirection`` (or its file) ablated while those prompts decode
    (``lit_sahs.refusal_direction``; None: the detector's own, if any; "off": none).
    """

    def __init__(self, target, detector, refusal: Optional[str] = None, fail_closed: bool = True,
                 threshold: Optional[float] = None, judge_band=None, judge_cut: Optional[float] = None,
                 answer_below=None, answer_direction=None):
        detector.prepare(target)  # made for this target, heads inside its geometry
        self.answer_below, self.answer_direction = answer_settings(detector, answer_below, answer_direction, target)
        self.judge_rule = judge_rule(judge_band, detector.judge, judge_cut)  # the band the target's verdict decides
        self.target = target
        self.detector = detector.to(target.device).eval()
        self.refusal = DEFAULT_REFUSAL if refusal is None else str(refusal)
        self.fail_closed = bool(fail_closed)
        self.threshold = threshold_override(threshold)

    @property
    def head_set(self):
        return self.detector.head_set

    @property
    def effective_threshold(self) -> float:
        return float(self.detector.threshold) if self.threshold is None else self.threshold

    def _eos_token_id(self, kwargs: dict) -> int:
        return eos_token_id(self.target, kwargs.get("eos_token_id", None))

    def generate_tokens(self, enc: dict, texts=None, **generate_kwargs) -> tuple[torch.Tensor, GateProcessor]:
        """Guarded ``model.generate`` on an encoded batch (``encode_prompts(..., for_generate=True)``).
        Returns (generated ids without the prompt, the processor holding ``probs``/``flags``).
        `texts`: the batch's prompts, which the judge feature and the judge band read."""
        bad = [k for k in UNSUPPORTED_GENERATE if k in generate_kwargs and generate_kwargs[k] not in (None, 1)]
        if bad:
            raise LitSahsError(f"guarded generate does not support {bad}: the detector scores one plain prefill")
        if "position_ids" in enc:
            raise LitSahsError("pass generate no position_ids (it computes them from the attention mask): "
                               "encode with for_generate=True")
        model = self.target.model
        enc = {k: v.to(self.target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
        procs = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        generate_kwargs.setdefault("pad_token_id", self.target.tokenizer.pad_token_id)
        if self.judge_rule is not None and texts is None:
            raise LitSahsError("a judge band needs the prompts' texts: pass texts=...")
        with torch.no_grad(), capture_for(self.target, self.detector.head_set, self.detector.feature_spec,
                                          texts) as cap:  # heads (+ extra features)
            gate = GateProcessor(self.detector, cap, self._eos_token_id(generate_kwargs), self.threshold,
                                 self.fail_closed, self.judge_rule, self._judge(cap, texts))
            procs.append(gate)
            nudge = AnswerNudge.for_target(self.target, lambda: gate.probs, self.answer_below, self.answer_direction)
            if nudge is not None:
                procs.append(nudge)  # after the gate: it reads the gate's scores
            with AnswerNudge.entered(nudge):
                out = model.generate(**enc, logits_processor=procs, **generate_kwargs)
        if gate.flags is None:  # generate never produced a token (max_new_tokens=0)
            raise LitSahsError("generate produced no token, so the guard never scored the prompt: "
                               "use max_new_tokens >= 1")
        sequences = out.sequences if hasattr(out, "sequences") else out
        return sequences[:, enc["input_ids"].shape[1]:], gate

    def _judge(self, cap, texts):
        """Row positions -> the judge's log-odds: the values the judge feature already computed, else a
        judge prefill over those rows alone."""
        if self.judge_rule is None:
            return None
        known = getattr(cap, "judge", None)
        if known is not None:
            return lambda rows: known.reshape(-1)[rows].numpy()
        return row_judge(self.target, texts)

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
        new, gate = self.generate_tokens(enc, texts=list(texts), max_new_tokens=max_new_tokens, **generate_kwargs)
        flags = gate.flags.cpu().tolist()
        probs = gate.probs.cpu().tolist()
        error = gate.error
        unscored = sum(math.isnan(p) for p in probs)
        if error is None and unscored:  # fail-closed flagged them silently in the processor
            error = f"the detector returned NaN for {unscored} of {len(probs)} prompts"
        tok = self.target.tokenizer
        responses = [self.refusal if f else tok.decode(row, skip_special_tokens=True).strip()
                     for f, row in zip(flags, new.cpu())]
        scores = [None if math.isnan(p) else float(p) for p in probs]
        return GuardResult(ids=ids, prompts=list(texts), flagged=[bool(f) for f in flags],
                           scores=scores, responses=responses,
                           sequences=new, threshold=self.effective_threshold, scoring_error=error,
                           judged=None if self.judge_rule is None else
                           (gate.judged.tolist() if gate.judged is not None else [False] * len(flags)),
                           answered=answered_rows(scores, flags, self.answer_below))
