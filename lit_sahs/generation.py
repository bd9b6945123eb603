"""Greedy answers of a target, batched: the reference generation that ablation and the SafeVLM
comparisons score against (a guard's own generate lives with the guard)."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from lit_sahs.prompts import encode_prompts

if TYPE_CHECKING:
    from lit_sahs.targets import Target


def eos_ids(target: Target) -> set[int]:
    """Every token that ends an answer (the generation config's list, else the tokenizer's EOS)."""
    eos = getattr(target.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = target.tokenizer.eos_token_id
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(e) for e in eos if e is not None}


def trim_answer(ids: Sequence[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (what follows is padding)."""
    out = []
    for t in ids:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


@torch.no_grad()
def greedy_answers(target: Target, texts: Sequence[str], max_new_tokens: int, batch_size: int = 16, *,
                   truncate: Optional[str] = None, by_length: bool = False,
                   during: Optional[AbstractContextManager] = None) -> list[list[int]]:
    """Greedy answers as token ids, cut after the first EOS, in the order of `texts`.

    `truncate` cuts a prompt that leaves no room for the answer (``encode_prompts``); `by_length`
    batches prompts of similar length together (less padding; batches differ, so answers may differ
    in the last bits); `during` is a context entered around each batch's generate (an ablation)."""
    eos = eos_ids(target)
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i)) if by_length else list(range(len(texts)))
    answers: list[list[int]] = [[] for _ in texts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = encode_prompts(target, [texts[i] for i in idx], reserve=max_new_tokens, for_generate=True,
                             truncate=truncate)
        enc = {k: v.to(target.device) for k, v in enc.items()}
        with during if during is not None else nullcontext():
            out = target.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=target.tokenizer.pad_token_id)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:].cpu().tolist()):
            answers[i] = trim_answer(row, eos)
    return answers
