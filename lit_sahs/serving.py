"""What the guard service does, without HTTP: ``GuardService`` holds one detector and its target and
answers moderation (score prompts, no generation) and guarded chat (the family's guard in the prefill
of the target's own generate), one batch at a time; ``Batcher`` gathers concurrent requests into those
batches (dynamic batching on an asyncio loop, the model run in one worker thread).

Both paths go through the code the commands use: prompts (texts or chat conversations) are checked and
encoded by ``prompts.encode_prompts`` / ``targets.prompting`` (chat template, left padding, the one
first-token position), scores come from ``ModelFamily.score_encoded`` (what ``screen`` runs), guarded
answers from ``ModelFamily.make_guard(...).generate`` (what ``guard`` runs). ``lit_sahs.serve`` puts
this behind OpenAI-compatible endpoints.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np

from lit_sahs.answer_nudge import answer_settings
from lit_sahs.checks import ANSWER_OFF, answer_below_arg, answer_direction_arg, optional_probability
from lit_sahs.errors import LitSahsError
from lit_sahs.choices import DEFAULT_REFUSAL
from lit_sahs.guarding import eos_token_id
from lit_sahs.loading import load_detector_and_target
from lit_sahs.prompts import encode_prompts
from lit_sahs.self_judge import band_decisions, judge_rule, row_judge

log = logging.getLogger(__name__)

UNSAFE = "unsafe"  # the one category of a family without per-category scores


class GuardService:
    """One detector and its target, answering moderation and guarded chat batches.

    detector: an artifact dir, .ckpt, models:/ or runs:/ URI, or a loaded detector; target: override
    of the target the detector names; threshold: a probability replacing the calibrated threshold;
    answer_below: chat prompts scored below it may not open with a refusal (``lit_sahs.answer_nudge``; None:
    the detector's calibrated cut, if any; "off": none); answer_direction: a refusal direction file ablated
    while those prompts decode (``lit_sahs.refusal_direction``; None: the detector's own, if any; "off": none)."""

    def __init__(self, detector, target=None, threshold: Optional[float] = None, refusal: str = DEFAULT_REFUSAL,
                 device: str = "cpu", dtype: Optional[str] = None, tracking_uri: Optional[str] = None,
                 answer_below=None, answer_direction=None):
        override = optional_probability(threshold, "threshold")
        answer_direction_arg(answer_direction, answer_below_arg(answer_below))  # bad values fail before loading
        self.detector, self.target = load_detector_and_target(detector, target, device=device, dtype=dtype,
                                                              tracking_uri=tracking_uri)
        self.threshold = float(self.detector.threshold) if override is None else override
        # the answer side as the guard applies it (given, else the artifact's calibrated one), for metadata
        self.answer_below, self.answer_direction = answer_settings(self.detector, answer_below, answer_direction,
                                                                   self.target)
        side = {} if self.answer_below is None and not self.detector.answer else {
            "answer_below": ANSWER_OFF if self.answer_below is None else self.answer_below,
            "answer_direction": ANSWER_OFF if self.answer_direction is None else self.answer_direction}
        self.guard = self.detector.make_guard(self.target, refusal=refusal, threshold=override, fail_closed=True,
                                              **side)
        self.categories = list(self.detector.categories()) or [UNSAFE]
        self.judge_rule = judge_rule(None, self.detector.judge)  # what the guard applies too
        self.eos = eos_token_id(self.target)

    def metadata(self) -> dict[str, Any]:
        """What a client needs to know about the detector it talks to."""
        det, fp = self.detector, self.detector.fingerprint
        return {"target": self.target.name, "detector": {**det.describe(), "class": type(det).__name__},
                "family": det.family, "threshold": self.threshold, "calibrated_threshold": float(det.threshold),
                "fingerprint": fp.to_dict() if fp is not None else None, "categories": self.categories,
                "answer_below": self.answer_below,
                "answer_direction": None if self.answer_direction is None else {
                    "layer": self.answer_direction.layer, "rows": self.answer_direction.rows},
                "judge_band": None if self.judge_rule is None else {"band": list(self.judge_rule.band),
                                                                    "cut": self.judge_rule.cut}}

    # ------------------------------------------------------------------ checks, one request at a time

    def check(self, prompt, reserve: int = 0) -> int:
        """Tokens of one prompt (a text or a conversation) as the target sees it; a LitSahsError when
        it is empty, malformed or does not fit the target's context with `reserve` new tokens."""
        enc = encode_prompts(self.target, [prompt], reserve=reserve, for_generate=True)
        return int(enc["attention_mask"].sum())

    # ------------------------------------------------------------------ batches

    def moderate(self, texts: Sequence[str]) -> list[dict]:
        """One result {flagged, score, categories, category_scores} per text, scored in one batch."""
        enc = encode_prompts(self.target, list(texts))
        scores = np.asarray(self.detector.score_prompts(self.target, enc, list(texts)), dtype=np.float64)
        per_cat = self.detector.category_scores(self.target, enc) if self.detector.categories() else None
        flags = ~(scores < self.threshold)  # NaN (not scored) is flagged, as screen does
        flags, _, _ = band_decisions(scores, flags, self.judge_rule,  # the calibrated second stage, if any
                                     row_judge(self.target, list(texts)))
        out = []
        for i, s in enumerate(scores.tolist()):
            flagged = bool(flags[i])
            if per_cat is None:
                cat_scores = {UNSAFE: None if math.isnan(s) else float(s)}
                cats = {UNSAFE: flagged}
            else:
                row = [float(v) for v in per_cat[i]]
                top = int(np.argmax(row)) if row else -1
                cat_scores = dict(zip(self.categories, row))
                cats = {c: bool(flagged and j == top) for j, c in enumerate(self.categories)}
            out.append({"flagged": flagged, "score": None if math.isnan(s) else float(s),
                        "categories": cats, "category_scores": cat_scores})
        return out

    def chat(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[dict]:
        """One guarded answer {content, flagged, score, finish_reason, completion_tokens} per
        conversation, generated in one batch (greedy)."""
        res = self.guard.generate(list(conversations), max_new_tokens=max_new_tokens)
        out = []
        for i, row in enumerate(res.sequences.cpu().tolist()):
            ended = self.eos in row
            n = row.index(self.eos) if ended else len(row)
            flagged = bool(res.flagged[i])
            out.append({"content": res.responses[i], "flagged": flagged, "score": res.scores[i],
                        "finish_reason": "content_filter" if flagged else ("stop" if ended else "length"),
                        "completion_tokens": 0 if flagged else n})
        return out


# ---------------------------------------------------------------- dynamic batching

@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Gathers concurrent submissions into batches for ``run(key, items) -> results``.

    Items with the same `key` (the work they need: moderation, or chat with one max_new_tokens) are
    batched together: a batch starts with the oldest waiting item and closes when it holds as many
    items as are expected, or `batch_timeout` seconds have passed; while one batch runs (in a worker
    thread, so the loop keeps accepting requests) the next gathers. Expected: the items waiting when
    the last batch ended plus that batch's size (at most `max_batch_size`), since clients answered
    usually send again. So a lone client never waits for a batch to fill, and clients answered
    together are batched together again instead of splitting into a late small batch and a large one.
    A LitSahsError from a batch of several items is retried item by item, so one bad prompt fails only
    its own request."""

    def __init__(self, run: Callable[[Hashable, list], list], max_batch_size: int = 16, batch_timeout: float = 0.05):
        if max_batch_size < 1:
            raise LitSahsError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not batch_timeout >= 0:
            raise LitSahsError(f"batch_timeout must be >= 0 seconds, got {batch_timeout}")
        self.run, self.max_batch_size, self.batch_timeout = run, int(max_batch_size), float(batch_timeout)
        self.pending: collections.deque[_Pending] = collections.deque()
        self.batches = 0  # batches run and the largest of them (health reports them)
        self.largest_batch = 0
        self._expected = 1
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, key: Hashable, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(key, item, fut))
        self._wake.set()
        return await fut

    def _same(self, key: Hashable) -> list[_Pending]:
        return [p for p in self.pending if p.key == key][: self.max_batch_size]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            key = self.pending[0].key
            deadline = loop.time() + self.batch_timeout
            target = min(self.max_batch_size, max(1, self._expected))
            while len(self._same(key)) < target and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._same(key)
            for p in batch:
                self.pending.remove(p)
            batch = [p for p in batch if not p.future.done()]  # a client that went away
            if batch:
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                await self._run(key, batch)
                self._expected = len(self.pending) + len(batch)

    async def _run(self, key: Hashable, batch: list[_Pending]) -> None:
        try:
            results = await asyncio.to_thread(self.run, key, [p.item for p in batch])
        except LitSahsError as e:
            if len(batch) == 1:
                _settle(batch[0].future, error=e)
                return
            for p in batch:  # find the item that failed: each alone
                await self._run(key, [p])
            return
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            log.exception("batch of %d failed", len(batch))
            for p in batch:
                _settle(p.future, error=e)
            return
        for p, r in zip(batch, results):
            _settle(p.future, result=r)


def _settle(fut: asyncio.Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
