"""The search space of a tune study: `detector` (families), `k` (heads from the ranking),
`<family>.<hyper-parameter>` entries, each a list (categorical), `{low, high[, log, step, type]}`
or a fixed scalar, and optionally `features`: the extra features served after the heads
(lit_sahs.data.extra_features), a list such as `[none, resid, refusal, "resid,refusal"]` — `none`
is heads only. Checked against the detector classes (and, in `run_tune`, the store) before any
study is created; the default `k` range is cut to the store's ranked heads."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Optional

from lit_sahs.errors import LitSahsError

DEFAULT_SPACE: dict[str, Any] = {
    "detector": ["logistic", "mlp", "sparse"],
    "k": {"low": 1, "high": 32, "log": True},
    "logistic.l2": {"low": 1e-5, "high": 1.0, "log": True},
    "mlp.hidden": {"low": 16, "high": 256, "log": True},
    "mlp.lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "mlp.weight_decay": {"low": 1e-5, "high": 1e-1, "log": True},
    "sparse.group_lasso": {"low": 1e-3, "high": 0.3, "log": True},
}


@dataclass(frozen=True)
class Dim:
    name: str
    kind: str  # categorical | int | float | fixed
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None
    value: Any = None

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        if self.kind == "fixed":
            return {"value": self.value}
        d = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step) if self.step else 1)
        if self.kind == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)
        return self.value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dim(name: str, spec: Any) -> Dim:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise LitSahsError(f"search space entry {name!r} is an empty list: give at least one choice")
        for c in spec:
            if not isinstance(c, (str, int, float, bool)) and c is not None:
                raise LitSahsError(f"search space entry {name!r}: choices must be strings or numbers, got {c!r}")
        return Dim(name, "categorical", choices=tuple(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step", "type"}
        if unknown or "low" not in spec or "high" not in spec:
            raise LitSahsError(f"search space entry {name!r} must be {{low, high[, log, step, type]}}, got {spec}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise LitSahsError(f"search space entry {name!r}: low and high must be numbers, got {low!r}, {high!r}")
        kind = spec.get("type") or ("int" if _is_int(low) and _is_int(high) else "float")
        if kind not in ("int", "float"):
            raise LitSahsError(f"search space entry {name!r}: type must be int or float, got {kind!r}")
        log_ = bool(spec.get("log", False))
        if not low < high:
            raise LitSahsError(f"search space entry {name!r}: low ({low}) must be below high ({high})")
        if log_ and low <= 0:
            raise LitSahsError(f"search space entry {name!r}: a log scale needs low > 0, got {low}")
        if log_ and spec.get("step") is not None:
            raise LitSahsError(f"search space entry {name!r}: log and step cannot be combined")
        if kind == "int":
            low, high = int(low), int(high)
        else:
            low, high = float(low), float(high)
        return Dim(name, kind, low=low, high=high, log=log_, step=spec.get("step"))
    if isinstance(spec, (str, int, float, bool)) or spec is None:
        return Dim(name, "fixed", value=spec)
    raise LitSahsError(f"search space entry {name!r}: use a list, {{low, high}} or a fixed value, got {spec!r}")


NO_FEATURES = "none"  # a `features` choice: heads only


def feature_choice(value: Any) -> Optional[str]:
    """A sampled `features` value as the DataModule's spec: None for heads only."""
    if value is None:
        return None
    value = str(value).strip()
    return None if value in ("", NO_FEATURES) else value


@dataclass
class SearchSpace:
    detectors: Dim
    k: Dim
    params: dict[str, dict[str, Dim]]  # family -> hparam -> Dim
    features: Dim = Dim("features", "fixed", value=None)  # extra features after the heads (None: heads only)

    @classmethod
    def parse(cls, space: dict, max_heads: int) -> "SearchSpace":
        from lit_sahs.families import trainable_families

        DETECTORS = trainable_families()

        if not isinstance(space, dict) or not space:
            raise LitSahsError("the search space is empty: give at least 'detector' and 'k'")
        space = dict(space)
        det = _dim("detector", space.pop("detector", list(DETECTORS)))
        if det.kind == "fixed":
            det = Dim("detector", "categorical", choices=(det.value,))
        if det.kind != "categorical":
            raise LitSahsError("search space 'detector' must be a list of detector families")
        unknown = [d for d in det.choices if d not in DETECTORS]
        if unknown:
            raise LitSahsError(f"search space 'detector' names unknown families {unknown}: use {sorted(DETECTORS)}")
        if "k" not in space:
            raise LitSahsError("the search space needs 'k' (number of heads from the ranking), e.g. {low: 1, high: 32}")
        k_spec = space.pop("k")
        if k_spec == DEFAULT_SPACE["k"] and max_heads < k_spec["high"]:  # the default fits any store
            k_spec = {**k_spec, "high": max_heads} if max_heads > k_spec["low"] else k_spec["low"]
        k = _dim("k", k_spec)
        features = _dim("features", space.pop("features", None))
        if features.kind not in ("categorical", "fixed") or not all(
                c is None or isinstance(c, str) for c in (features.choices or (features.value,))):
            raise LitSahsError("search space 'features' must be a list of feature specs such as "
                               f"[none, resid, refusal, \"resid,refusal\"], got {features.to_dict()}")
        from lit_sahs.data.extra_features import parse_names

        for c in features.choices or (features.value,):
            parse_names(feature_choice(c))  # unknown names: one clear error
        without = [c for c in features.choices or (features.value,) if "tokens" not in parse_names(feature_choice(c))]
        if "attnpool" in det.choices and without:
            raise LitSahsError(f"search space: the attnpool detector reads heads at every prompt token, but the "
                               f"features choices {without} lack 'tokens': give features such as [tokens, \"tokens,mean\"]")
        ks = list(k.choices) if k.kind == "categorical" else [k.value] if k.kind == "fixed" else [k.low, k.high]
        if k.kind == "float" or not all(_is_int(v) for v in ks):
            raise LitSahsError(f"search space 'k' must be integers, got {k.to_dict()}")
        if min(ks) < 1 or max(ks) > max_heads:
            raise LitSahsError(f"search space 'k' must lie in 1..{max_heads} (the ranked heads), got {k.to_dict()}")
        params: dict[str, dict[str, Dim]] = {d: {} for d in det.choices}
        for key, spec in space.items():
            fam, _, hp = str(key).partition(".")
            if not hp:
                raise LitSahsError(f"search space entry {key!r}: name detector hyper-parameters '<family>.<name>', "
                                   f"e.g. 'logistic.l2'")
            if fam not in DETECTORS:
                raise LitSahsError(f"search space entry {key!r}: unknown detector family {fam!r}; use {sorted(DETECTORS)}")
            allowed = [n for n in inspect.signature(DETECTORS[fam].__init__).parameters if n != "self"]
            if hp not in allowed:
                raise LitSahsError(f"search space entry {key!r}: {DETECTORS[fam].__name__} has no hyper-parameter {hp!r}; "
                                   f"it takes {allowed}")
            if fam in params:
                params[fam][hp] = _dim(key, spec)
        return cls(det, k, params, features)

    def feature_specs(self) -> list[Optional[str]]:
        """Every `features` value a trial can draw, as DataModule specs (None: heads only)."""
        return [feature_choice(c) for c in (self.features.choices or (self.features.value,))]

    def to_dict(self) -> dict:
        """Canonical JSON-able form: what the study records and compares."""
        out = {"detector": self.detectors.to_dict(), "k": self.k.to_dict()}
        if self.features.kind != "fixed" or self.features.value is not None:  # older studies: no entry
            out["features"] = self.features.to_dict()
        for fam in sorted(self.params):
            for hp in sorted(self.params[fam]):
                out[f"{fam}.{hp}"] = self.params[fam][hp].to_dict()
        return json.loads(json.dumps(out))

    def sample(self, trial) -> tuple[str, int, dict, Optional[str]]:
        """(family, k, hparams, features) for a trial; features None: heads only."""
        fam = self.detectors.suggest(trial)
        k = int(self.k.suggest(trial))
        hparams = {hp: d.suggest(trial) for hp, d in self.params.get(fam, {}).items()}
        return fam, k, hparams, feature_choice(self.features.suggest(trial))

    @staticmethod
    def from_params(params: dict, space: "SearchSpace") -> tuple[str, int, dict, Optional[str]]:
        """(family, k, hparams, features) of a finished trial: its sampled params plus the space's fixed values."""
        fam = params.get("detector", space.detectors.choices[0])
        k = int(params.get("k", space.k.value if space.k.kind == "fixed" else 0))
        hparams = {}
        for hp, d in space.params.get(fam, {}).items():
            hparams[hp] = params.get(f"{fam}.{hp}", d.value)
        return fam, k, hparams, feature_choice(params.get("features", space.features.value))
