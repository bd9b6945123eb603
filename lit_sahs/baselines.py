"""Baselines every report shows next to the head detectors, on the same rows:

- `tfidf`: TF-IDF word and character n-grams + logistic regression on the prompt text;
- `residual`: logistic regression on the last-layer residual stream at the first-token position;
- `perplexity`: the prompt's mean token NLL under the target (a perplexity filter's score).

The residual and NLL are recorded by extraction (store extras), so baselines cost no forward.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError

BASELINES = ("tfidf", "residual", "perplexity")


def tfidf_scores(train_texts: Sequence[str], y_train: np.ndarray, eval_texts: Sequence[str], seed: int = 0) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True))
    clf = make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000, random_state=seed))
    clf.fit(list(train_texts), y_train)
    return clf.predict_proba(list(eval_texts))[:, 1]


def residual_scores(r_train: np.ndarray, y_train: np.ndarray, r_eval: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, random_state=seed))
    clf.fit(r_train.astype(np.float32), y_train)
    return clf.predict_proba(r_eval.astype(np.float32))[:, 1]


def baseline_scores(store: ActivationStore, train_rows: np.ndarray, eval_rows: np.ndarray,
                    names: Sequence[str] = BASELINES, seed: int = 0) -> dict[str, np.ndarray]:
    """Scores (higher = more malicious) of each baseline for `eval_rows`, trained on `train_rows`."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise LitSahsError(f"unknown baselines {unknown}: use {', '.join(BASELINES)}")
    index = store.index()
    y = np.array([int(r["label"]) for r in index])
    if len(set(y[train_rows].tolist())) < 2:
        raise LitSahsError("baseline training rows hold a single class: a classifier needs both")
    out = {}
    for name in names:
        if name == "tfidf":
            out[name] = tfidf_scores([index[i]["text"] for i in train_rows], y[train_rows],
                                     [index[i]["text"] for i in eval_rows], seed)
        elif name in ("residual", "perplexity"):
            extra = "residual" if name == "residual" else "prompt_nll"
            if extra not in store.extra_names():
                continue  # a store extracted without baselines: the report says which are missing
            if name == "residual":
                r = store.read_extra("residual")
                out[name] = residual_scores(r[train_rows], y[train_rows], r[eval_rows], seed)
            else:
                out[name] = store.read_extra("prompt_nll")[eval_rows].astype(np.float64)
    return out
