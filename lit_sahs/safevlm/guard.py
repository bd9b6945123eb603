"""SafeVLMGuard: SafeVLM's inference — at the prefill of one ``generate`` call the safety head
classifies each prompt, then per prompt

* ``pass``: "safe", or a risk below the threshold — it decodes on from the KV cache exactly as a
  plain generate over the same (slot-carrying) sequence would;
* ``refuse``: the highest risk level — it stops at once and gets the refusal message;
* ``hint``: any other risk level — it stops at once and is generated again with a safety hint for
  its risk type in front of the prompt (the only prompts that cost a second prefill), stage II's LoRA
  kept or not as the first prefill decided for the prompt;
* ``answer``: with ``answer_below``, a passed prompt whose risk is below it, decoded with the refusal
  openings banned at its first position (``lit_sahs.answer_nudge``).

The classification reads the hooks of ``forward.SafetyForward`` during generate's own prefill
(a ``LogitsProcessor`` scores on its first call, like the safety-head guard), so a prompt that
passes costs no extra forward.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lit_sahs.answer_nudge import AnswerNudge, answer_settings
from lit_sahs.checks import JUDGE_OFF, judge_band_arg
from lit_sahs.errors import LitSahsError
from lit_sahs.choices import DEFAULT_REFUSAL
from lit_sahs.guarding import GuardResult, answered_rows, eos_token_id, threshold_override
from lit_sahs.prompts import encode_prompts
from lit_sahs.safevlm.forward import SafetyForward, model_inputs, with_slots
from lit_sahs.safevlm.lora_gate import LoRAGate, check_lora_threshold
from lit_sahs.safevlm.taxonomy import RISK_LEVELS, RISK_TYPES
from lit_sahs.targets.prompting import prefixed

HINT_TOPICS = {
    "physical_harm": "physical harm to people",
    "malicious_use": "malicious use such as cyber attacks",
    "financial_crime": "fraud or other financial crime",
    "hate_discrimination": "hateful or discriminatory content",
    "privacy": "someone's privacy or dangerous information",
    "misinformation_manipulation": "misinformation or manipulation",
}
HINT = ("Safety note: this request may involve {topic}. Answer only what is safe, lawful and honest, "
        "and decline any part that could cause harm.\n\n")
ACTIONS = ("pass", "answer", "hint", "refuse")


def hint_for(risk_type: str) -> str:
    return HINT.format(topic=HINT_TOPICS.get(risk_type, "harm"))


class SafetyGate(LogitsProcessor):
    """On generate's first call: classify from the prefill's hooks, keep per-row actions as
    tensors, and end every row that is not passed (EOS only); later calls re-apply that mask."""

    def __init__(self, det, fwd: SafetyForward, eos: int, threshold: Optional[float], fail_closed: bool = True):
        self.det, self.fwd, self.eos, self.threshold, self.fail_closed = det, fwd, int(eos), threshold, fail_closed
        self.risk = self.level = self.type = self.stop = None
        self.error: Optional[str] = None
        self._forced = None

    def __call__(self, input_ids, scores):
        if self.stop is None:
            batch, vocab = scores.shape
            try:
                level, rtype = self.det.classify_forward(self.fwd)
                risk = self.det.risk(level).to(scores.device)
                thr = float(self.det.threshold) if self.threshold is None else float(self.threshold)
                flagged = (risk >= thr) | torch.isnan(risk)
                self.level = (1 + level[:, 1:].argmax(-1)).to(scores.device)
                self.type = (1 + rtype[:, 1:].argmax(-1)).to(scores.device)
                self.risk, self.stop = risk, flagged
            except Exception as e:  # noqa: BLE001 - any scoring failure is handled the same way
                if not self.fail_closed:
                    raise LitSahsError(f"SafeVLM scoring failed ({type(e).__name__}: {e})") from e
                self.error = f"{type(e).__name__}: {e}"
                self.risk = torch.full((batch,), float("nan"), dtype=torch.float64, device=scores.device)
                self.stop = torch.ones(batch, dtype=torch.bool, device=scores.device)
                self.level = torch.full((batch,), len(RISK_LEVELS) - 1, device=scores.device)
                self.type = torch.zeros(batch, dtype=torch.long, device=scores.device)
            forced = torch.full((vocab,), float("-inf"), dtype=scores.dtype, device=scores.device)
            forced[self.eos] = 0.0
            self._forced = forced
        return torch.where(self.stop[:, None], self._forced, scores)


@dataclass
class SafeVLMResult(GuardResult):
    actions: Sequence[str] = ()
    levels: Sequence[str] = ()
    types: Sequence[str] = ()
    lora: Sequence[bool] = ()  # with a lora_threshold: whether the prompt decoded with stage II's adapter

    def decisions(self) -> list[str]:
        return list(self.actions)

    def rows(self) -> list[dict]:
        lora = list(self.lora) or [None] * len(self.actions)
        return [{**r, "action": a, "risk_level": lv, "risk_type": t, **({} if on is None else {"lora": on})}
                for r, a, lv, t, on in zip(super().rows(), self.actions, self.levels, self.types, lora)]


class SafeVLMGuard:
    """Generate with SafeVLM's safety modules (and its LoRA adapter, after stage II) in the target.
    target: a loaded ``Target``; detector: a loaded SafeVLM (``lit_sahs.guard.load_guard`` takes paths).
    lora_threshold: with a stage-II SafeVLM, decode with its LoRA adapter only the prompts whose risk is at
    least this (``lora_gate``); the others decode as stage I does. None: the artifact's own (fitted with
    ``lora_fpr`` or ``lora_tpr``), else the adapter is on for every prompt; 0 keeps it on for every prompt.
    answer_below: passed prompts whose risk is below it may not open with a refusal (None: the artifact's
    calibrated cut, if any; "off": none); answer_direction: a ``RefusalDirection`` (or its file) ablated
    while those prompts decode (None: the artifact's own, if any; "off": none)."""

    def __init__(self, target, detector, refusal: Optional[str] = None, threshold: Optional[float] = None,
                 fail_closed: bool = True, lora_threshold: Optional[float] = None, judge_band=None,
                 answer_below=None, answer_direction=None):
        if judge_band_arg(judge_band) not in (None, JUDGE_OFF):  # parsed first: a malformed band is reported as such
            raise LitSahsError("--judge_band applies to safety-head detectors; SafeVLM decides with its safety head")
        own = float(detector.lora_threshold)  # NaN: the artifact has no gate
        self.lora_threshold = check_lora_threshold(
            detector, own if lora_threshold is None and not math.isnan(own) else lora_threshold)
        self.answer_below, self.answer_direction = answer_settings(detector, answer_below, answer_direction, target)  # before the target changes
        detector.prepare(target)  # checks the fingerprint, puts the LoRA weights into the target
        self.detector, self.target = detector.to(target.device).eval(), target
        self.refusal = DEFAULT_REFUSAL if refusal is None else str(refusal)
        self.threshold, self.fail_closed = threshold_override(threshold), bool(fail_closed)

    @property
    def effective_threshold(self) -> float:
        return float(self.detector.threshold) if self.threshold is None else float(self.threshold)

    def _slots(self, texts, images, ids, max_new_tokens: int) -> dict:
        n = int(self.detector.hparams.num_safety_tokens)
        enc = encode_prompts(self.target, texts, images, ids, reserve=max_new_tokens + n, for_generate=True)
        return with_slots(enc, n, self.target.tokenizer.pad_token_id or 0)

    def _lora_gate(self, fwd: SafetyForward, decided=None):
        """The LoRA gate for one generate (its rows' decisions `decided`, when known), or nothing without
        a lora_threshold."""
        if self.lora_threshold is None:
            return contextlib.nullcontext()
        return LoRAGate(self.detector, fwd, self.lora_threshold, decided)

    @torch.no_grad()
    def _generate(self, batch: dict, max_new_tokens: int, gate: bool, lora=None, **kw):
        det, model = self.detector, self.target.model
        model.eval()  # LoRA dropout off: a guard decodes deterministically
        dev = self.target.device
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "position_ids"}  # generate derives them
        vision = det.safety.vision is not None and "pixel_values" in batch
        kw.setdefault("pad_token_id", self.target.tokenizer.pad_token_id)
        with det.safety_forward(batch, vision=vision) as fwd, self._lora_gate(fwd, lora) as lg:
            g = SafetyGate(det, fwd, eos_token_id(self.target), self.threshold, self.fail_closed) if gate else None
            nudge = AnswerNudge.for_target(self.target, lambda: g.risk, self.answer_below,
                                           self.answer_direction) if g else None
            procs = LogitsProcessorList([p for p in (g, nudge) if p is not None])  # the nudge reads the gate's risk
            with AnswerNudge.entered(nudge):
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=procs,
                                     **kw)
        return out[:, batch["input_ids"].shape[1]:], g, (None if lg is None else lg.engaged)

    def generate(self, texts: Sequence[str], images=None, ids=None, max_new_tokens: int = 128, **kw) -> SafeVLMResult:
        if isinstance(texts, str):
            texts = [texts]
        if max_new_tokens < 1:
            raise LitSahsError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        texts = list(texts)
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        images = list(images) if images is not None else [None] * len(texts)
        new, gate, engaged = self._generate(self._slots(texts, images, ids, max_new_tokens), max_new_tokens, True, **kw)
        lora = [] if engaged is None else [bool(e) for e in engaged.cpu().tolist()]
        tok = self.target.tokenizer
        stop, levels, types = gate.stop.cpu().tolist(), gate.level.cpu().tolist(), gate.type.cpu().tolist()
        scores = [None if math.isnan(r) else float(r) for r in gate.risk.cpu().tolist()]
        answered = answered_rows(scores, stop, self.answer_below)
        actions = [("answer" if answered and answered[i] else "pass") if not s else
                   ("refuse" if levels[i] == len(RISK_LEVELS) - 1 else "hint") for i, s in enumerate(stop)]
        responses = [tok.decode(row, skip_special_tokens=True).strip() for row in new.cpu()]
        hinted = [i for i, a in enumerate(actions) if a == "hint"]
        if hinted:
            again = [prefixed(texts[i], hint_for(RISK_TYPES[types[i]])) for i in hinted]
            batch = self._slots(again, [images[i] for i in hinted], [ids[i] for i in hinted], max_new_tokens)
            # the hint is ours, not the user's: the adapter stays as the first prefill decided for the prompt
            kept = None if engaged is None else engaged[torch.as_tensor(hinted, device=engaged.device)]
            second, _, _ = self._generate(batch, max_new_tokens, False, lora=kept, **kw)
            for i, row in zip(hinted, second.cpu()):
                responses[i] = tok.decode(row, skip_special_tokens=True).strip()
        for i, a in enumerate(actions):
            if a == "refuse":
                responses[i] = self.refusal
        return SafeVLMResult(ids=ids, prompts=texts, flagged=[bool(s) for s in stop],
                             scores=scores, responses=responses,
                             sequences=new, threshold=self.effective_threshold, scoring_error=gate.error,
                             actions=actions, levels=[RISK_LEVELS[lv] if s else "safe" for lv, s in zip(levels, stop)],
                             types=[RISK_TYPES[t] if s else "safe" for t, s in zip(types, stop)], lora=lora,
                             answered=answered)
