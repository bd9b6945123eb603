"""What the language-model loss teaches: a refusal for harmful prompts and, for benign ones, the
target's *own* answer, generated once (greedy) and cached, so that training keeps the target's
behaviour on benign prompts instead of teaching it to refuse everything.

The cache is one JSONL file per target (keyed by its weights hash), one line per (prompt, answer
length): ``{"key", "answer"}``; it is rewritten atomically when answers are added.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

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
        self._answers: dict[str, str] = {}
        if self.path.is_file():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    d = json.loads(line)
                    self._answers[str(d["key"])] = str(d["answer"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LitSahsError(f"{self.path}, line {n}: not an answer-cache line: delete the file to "
                                       "regenerate the answers") from None

    def key(self, text: str, image: Optional[str] = None) -> str:
        return hashlib.sha256(f"{self.max_new_tokens}\x1f{image or ''}\x1f{text}".encode()).hexdigest()[:24]

    @torch.no_grad()
    def answers(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
                batch_size: int = 8, progress: bool = True) -> list[str]:
        """The target's greedy answer to each prompt, generating (and caching) the missing ones."""
        from tqdm.auto import tqdm

        from lit_sahs.prompts import encode_prompts

        images = list(images) if images is not None else [None] * len(texts)
        keys = [self.key(t, im) for t, im in zip(texts, images)]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._answers}.values(),
                      key=lambda i: len(texts[i]))
        if todo:
            model, tok = self.target.model, self.target.tokenizer
            with tqdm(total=len(todo), desc="benign answers", unit="prompt", disable=not progress,
                      dynamic_ncols=True) as bar:
                for s in range(0, len(todo), batch_size):
                    idx = todo[s:s + batch_size]
                    enc = encode_prompts(self.target, [texts[i] for i in idx], [images[i] for i in idx],
                                         [str(i) for i in idx], reserve=self.max_new_tokens, for_generate=True)
                    enc = {k: v.to(self.target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
                    out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                    for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:].cpu()):
                        self._answers[keys[i]] = tok.decode(row, skip_special_tokens=True).strip()
                    bar.update(len(idx))
            self._save()
        return [self._answers[k] for k in keys]

    def _save(self) -> None:
        text = "".join(json.dumps({"key": k, "answer": a}, ensure_ascii=False) + "\n"
                       for k, a in sorted(self._answers.items()))
        atomic_write_text(self.path, text)
