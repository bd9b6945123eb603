"""Baselines every report shows next to the head detectors, on the same rows:

- `tfidf`: TF-IDF word and character n-grams + logistic regression on the prompt text;
- `text_embedding`: logistic regression on a sentence encoder's embedding of the prompt text
  (all-MiniLM-L6-v2 from an installed package, ``lit_sahs.text_embedding``): a semantic text
  classifier that never runs the target; left out where the package is not installed;
- `residual`: logistic regression on the last-layer residual stream at the first-token position;
- `perplexity`: the prompt's mean token NLL under the target (a perplexity filter's score);
- `harm_direction`: one "harm direction" per residual layer (difference of the class means of the
  training rows), the prompt's projection on it; the layer is chosen on the training rows only
  (2-fold inside them);
- `resid_layers`: logistic regression on the residual stream at every recorded layer, concatenated;
- `refusal`: the target's own refusal-token probability at the first generated position;
- `judge`: the target asked whether the prompt is safe or unsafe to answer (``lit_sahs.self_judge``),
  the log-odds of "unsafe": a store extracted with ``--judge`` only.

The residuals, NLL and refusal probability are recorded by extraction (store extras), so baselines
cost no forward; a store extracted before an extra existed simply lacks that column.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lit_sahs.data.store import ActivationStore
from lit_sahs import text_embedding
from lit_sahs.errors import LitSahsError

BASELINES = ("tfidf", "text_embedding", "residual", "perplexity", "harm_direction", "resid_layers", "refusal", "judge")
# the store extra each column needs (the TEXT columns read the index text)
NEEDS = {"residual": "residual", "perplexity": "prompt_nll", "harm_direction": "residual_layers",
         "resid_layers": "residual_layers", "refusal": "refusal_prob", "judge": "judge_logodds"}


def tfidf_scores(train_texts: Sequence[str], y_train: np.ndarray, eval_texts: Sequence[str], seed: int = 0) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True))
    clf = make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000, random_state=seed))
    clf.fit(list(train_texts), y_train)
    return clf.predict_proba(list(eval_texts))[:, 1]


def text_embedding_scores(train_texts: Sequence[str], y_train: np.ndarray, eval_texts: Sequence[str],
                          seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    from lit_sahs.text_embedding import embed

    clf = LogisticRegression(C=1.0, max_iter=3000, random_state=seed)  # unit vectors: no scaling needed
    clf.fit(embed(train_texts), y_train)
    return clf.predict_proba(embed(eval_texts))[:, 1]


def residual_scores(r_train: np.ndarray, y_train: np.ndarray, r_eval: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, random_state=seed))
    clf.fit(r_train.astype(np.float32), y_train)
    return clf.predict_proba(r_eval.astype(np.float32))[:, 1]


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(set(y.tolist())) == 2 else 0.5


def harm_direction(r_train: np.ndarray, y_train: np.ndarray) -> np.ndarray:
    """The difference of class means (malicious - benign) of training rows [n, width]."""
    r = r_train.astype(np.float64)
    return r[y_train == 1].mean(0) - r[y_train == 0].mean(0)


def choose_direction_layer(r_train: np.ndarray, y_train: np.ndarray, seed: int = 0) -> tuple[int, list[float]]:
    """The layer (index into r_train's axis 1, [n, layers, width]) whose harm direction, fitted on
    one half of the training rows, best ranks the other half (mean AUROC of both ways round);
    returns it and the per-layer AUROCs. Only training rows are read."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(y_train), dtype=bool)
    for c in (0, 1):  # stratified halves
        idx = np.flatnonzero(y_train == c)
        half[rng.permutation(idx)[: len(idx) // 2]] = True
    aurocs = []
    for j in range(r_train.shape[1]):
        a = []
        for fit, score in ((half, ~half), (~half, half)):
            if len(set(y_train[fit].tolist())) < 2:
                continue
            d = harm_direction(r_train[fit, j], y_train[fit])
            a.append(_auroc(r_train[score, j].astype(np.float64) @ d, y_train[score]))
        aurocs.append(float(np.mean(a)) if a else 0.5)
    return int(np.argmax(aurocs)), aurocs


def harm_direction_scores(r_train: np.ndarray, y_train: np.ndarray, r_eval: np.ndarray, seed: int = 0) -> np.ndarray:
    """[n, layers, width] residuals: projection of the eval rows on the chosen layer's harm direction."""
    j, _ = choose_direction_layer(r_train, y_train, seed)
    return r_eval[:, j].astype(np.float64) @ harm_direction(r_train[:, j], y_train)


TEXT = {"tfidf": tfidf_scores, "text_embedding": text_embedding_scores}  # columns that read the prompt text only


def text_baseline_scores(train_texts: Sequence[str], y_train: np.ndarray, eval_texts: Sequence[str],
                         names: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """The columns of `names` that read the prompt text only (the encoder's column where its package is installed)."""
    return {name: TEXT[name](train_texts, y_train, eval_texts, seed) for name in names
            if name in TEXT and (name != "text_embedding" or text_embedding.available())}


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
        if name in TEXT:
            out.update(text_baseline_scores([index[i]["text"] for i in train_rows], y[train_rows],
                                            [index[i]["text"] for i in eval_rows], [name], seed))
        else:
            if NEEDS[name] not in store.extra_names():
                continue  # a store extracted without this extra: the report says which are missing
            r = store.read_extra(NEEDS[name])
            if name == "residual":
                out[name] = residual_scores(r[train_rows], y[train_rows], r[eval_rows], seed)
            elif name == "resid_layers":
                out[name] = residual_scores(r[train_rows].reshape(len(train_rows), -1), y[train_rows],
                                            r[eval_rows].reshape(len(eval_rows), -1), seed)
            elif name == "harm_direction":
                out[name] = harm_direction_scores(r[train_rows], y[train_rows], r[eval_rows], seed)
            else:  # perplexity, refusal, judge: the score itself, no training
                out[name] = r[eval_rows].astype(np.float64)
    return out
