"""What the language-model loss teaches: a refusal for harmful prompts and, for benign ones, the
target's *own* answer, generated once (greedy) and cached, so that training keeps the target's
behaviour on benign prompts instead of teaching it to refuse everything.

The target's own greedy answer to a benign prompt is itself a refusal often enough (Qwen2.5-Coder-0.5B:
27 of the 132 benign training answers of one draw, plain and PyRIT-wrapped alike) that training
towards it teaches the over-refusal the safety modules should avoid. ``compliant`` keeps the greedy
answer where the refusal judge passes it, else samples the target until one passes, else gives None
(the row then trains the safety head only).

The cache is one JSONL file per target (keyed by its weights hash), one line per (prompt, answer
length[, sampling]): ``{"key", "answer"}`` (``answer`` null: no compliant answer was found); it is
rewritten atomically when answers are added.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_text



def default_cache_dir() -> Path:
    return Path(os.environ.get("LIT_SAHS_CACHE", Path.home() / ".cache" / "lit_sahs")) / "answers"


class AnswerCache:
    def __init__(self, target, max_new_tokens: int = 32, path: Optional[str | os.PathLike] = None):
        if max_new_tokens < 1:
            raise LitSahsError(f"max_answer_tokens must be >= 1, got {max_new_tokens}")
        self.target, self.max_new_tokens = target, int(max_new_tokens)
        self.path = Path(path) if path else default_cache_dir() / f"{target.fingerprint.weights_hash[:24]}.jsonl"
        self._answers: dict[str, Optional[str]] = {}
        if self.path.is_file():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    d = json.loads(line)
                    a = d["answer"]
                    self._answers[str(d["key"])] = None if a is None else str(a)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LitSahsError(f"{self.path}, line {n}: not an answer-cache line: delete the file to "
                                       "regenerate the answers") from None

    def key(self, text: str, image: Optional[str] = None, sampling: str = "") -> str:
        head = f"{self.max_new_tokens}\x1f{image or ''}\x1f{text}"
        return hashlib.sha256((head + (f"\x1f{sampling}" if sampling else "")).encode()).hexdigest()[:24]

    @torch.no_grad()
    def _generate(self, texts: Sequence[str], images: Sequence[Optional[str]], idx: Sequence[int],
                  batch_size: int, desc: str, progress: bool, temperature: float = 0.0, seed: int = 0) -> dict[int, str]:
        """{i: answer} for prompts `idx`: greedy, or sampled at `temperature` (seeded per batch)."""
        from tqdm.auto import tqdm

        from lit_sahs.prompts import encode_prompts

        model, tok, out_answers = self.target.model, self.target.tokenizer, {}
        sample = {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {"do_sample": False}
        device = torch.device(self.target.device)
        # sampling seeds torch's generator per batch: fork it, so a fit that samples (cache miss) trains from the
        # same random state as one that does not (cache hit)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=temperature > 0), \
                tqdm(total=len(idx), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
            for s in range(0, len(idx), batch_size):
                part = list(idx[s:s + batch_size])
                enc = encode_prompts(self.target, [texts[i] for i in part], [images[i] for i in part],
                                     [str(i) for i in part], reserve=self.max_new_tokens, for_generate=True)
                enc = {k: v.to(self.target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
                if temperature > 0:
                    torch.manual_seed(seed * 1_000_003 + s)
                out = model.generate(**enc, max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, **sample)
                for i, row in zip(part, out[:, enc["input_ids"].shape[1]:].cpu()):
                    out_answers[i] = tok.decode(row, skip_special_tokens=True).strip()
                bar.update(len(part))
        return out_answers

    def answers(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
                batch_size: int = 8, progress: bool = True) -> list[str]:
        """The target's greedy answer to each prompt, generating (and caching) the missing ones."""
        images = list(images) if images is not None else [None] * len(texts)
        keys = [self.key(t, im) for t, im in zip(texts, images)]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._answers}.values(),
                      key=lambda i: len(texts[i]))
        if todo:
            for i, a in self._generate(texts, images, todo, batch_size, "benign answers", progress).items():
                self._answers[keys[i]] = a
            self._save()
        return [str(self._answers[k]) for k in keys]

    def compliant(self, texts: Sequence[str], refused: Callable[[str], bool], images: Optional[Sequence[Optional[str]]] = None,
                  tries: int = 6, temperature: float = 0.7, batch_size: int = 8, progress: bool = True) -> list[Optional[str]]:
        """Per prompt, the greedy answer if `refused` passes it, else the first of `tries` sampled answers
        (temperature `temperature`) it passes, else None. Cached like the greedy answers."""
        if tries < 0 or temperature <= 0:
            raise LitSahsError(f"compliant answers need tries >= 0 and temperature > 0, got {tries}, {temperature}")
        images = list(images) if images is not None else [None] * len(texts)
        greedy = self.answers(texts, images, batch_size, progress)
        out: list[Optional[str]] = [None if refused(a) else a for a in greedy]
        sampling = f"compliant:{tries}:{temperature}"
        keys = [self.key(t, im, sampling) for t, im in zip(texts, images)]
        todo = sorted({keys[i]: i for i, a in enumerate(out) if a is None and keys[i] not in self._answers}.values(),
                      key=lambda i: len(texts[i]))
        for round_ in range(tries):
            if not todo:
                break
            got = self._generate(texts, images, todo, batch_size, f"compliant answers, try {round_ + 1}/{tries}",
                                 progress, temperature, seed=round_ + 1)
            for i, a in got.items():
                if not refused(a):
                    self._answers[keys[i]] = a
            todo = [i for i in todo if keys[i] not in self._answers]
        for i in todo:  # every try refused: remembered, so the next fit does not sample again
            self._answers[keys[i]] = None
        if tries:
            self._save()
        return [a if a is not None else self._answers.get(k) for a, k in zip(out, keys)]

    def _save(self) -> None:
        text = "".join(json.dumps({"key": k, "answer": a}, ensure_ascii=False) + "\n"
                       for k, a in sorted(self._answers.items()))  # a None answer: no compliant one found
        atomic_write_text(self.path, text)
