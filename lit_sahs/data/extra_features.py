"""Features beyond heads: what a detector may read next to head activations, from the same prefill.

Names (a *feature spec* is a comma-separated list of them):

* ``resid:<layer>`` — the residual stream after decoder layer ``<layer>`` at the first-token
  position (store extra ``residual_layers``, layer ids in ``residual_layer_ids``);
* ``resid`` — every residual layer the store recorded (expanded to ``resid:<layer>`` names);
* ``refusal`` — the target's own behaviour: the log-odds of the probability mass of
  refusal-opening tokens in the first-token distribution (store extra ``refusal_prob``,
  ``lit_sahs.refusal``'s token set);
* ``judge`` — the target asked whether the prompt is safe or unsafe to answer, in a second short
  prefill: the log-odds of an "unsafe" over a "safe" first answer token (store extra ``judge_logodds``,
  written by ``extract --judge``; ``lit_sahs.self_judge``); guard, screen and live DataModules run
  that prefill beside the detector's own;
* ``mean:<layer>.<head>`` / ``max:<layer>.<head>`` — that head's output averaged (max-pooled) over
  the prompt's own tokens, chat template excluded (store extras ``pool_mean`` / ``pool_max``, written
  by ``extract --pool mean,max``); ``mean`` / ``max`` — the detector's own heads, pooled. A store
  serves them; guard and screen cannot compute them from a prefill yet.

Detectors keep one input layout, raw ``[B, k, D]``: each feature is packed after the heads into
``ceil(width / D)`` slots of ``D = head_dim`` values, zero-padded (a zero column normalises to 0
and carries no weight). ``FeatureSpec`` records the names and widths, so a fitted detector knows
its layout, its artifact records it, and ``hooks.FeatureCapture`` computes the same features from the
same forward (``from_forward``). The sparse detector treats each feature as one group.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from lit_sahs.errors import LitSahsError

RESIDUAL_EXTRA, LAYER_IDS_EXTRA, REFUSAL_EXTRA = "residual_layers", "residual_layer_ids", "refusal_prob"
JUDGE_EXTRA = "judge_logodds"  # [n] float32, written only by `extract --judge` (a second prefill)
_NAME = re.compile(r"^(resid:\d+|resid|refusal|judge|(mean|max)(:\d+\.\d+)?)$")
POOLS = ("mean", "max")  # poolings over the prompt's own tokens a store can record
REEXTRACT = ("re-extract into a new store with this version of `python -m lit_sahs extract` "
             "(it records residual_layers, residual_layer_ids and refusal_prob)")
PROB_EPS = 1e-6


def default_residual_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """The residual layers extraction records by default: `count` evenly spaced decoder layers ending
    with the last, 30 layers -> (6, 14, 21, 29)."""
    if num_layers < 1:
        raise LitSahsError(f"a target needs at least one layer, got {num_layers}")
    return tuple(sorted({max(0, round(num_layers * i / count) - 1) for i in range(1, count + 1)}))


def parse_names(spec: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """Feature names from 'resid,refusal' or a list; unknown names are refused."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [str(s).strip() for s in items if str(s).strip()]
    bad = [s for s in out if not _NAME.match(s)]
    if bad:
        raise LitSahsError(f"unknown features {bad}: use resid (every stored residual layer), resid:<layer>, "
                           "refusal, judge, mean or max (the heads pooled over the prompt), comma-separated")
    return tuple(dict.fromkeys(out))


def _layer(name: str) -> int:
    return int(name.split(":")[1])


def pool_extra(pool: str) -> str:
    """The store extra holding every head pooled by `pool` ([n, layers, heads, head_dim])."""
    return f"pool_{pool}"


def _pooled(name: str) -> Optional[tuple[str, int, int]]:
    """(pool, layer, head) of a ``mean:<l>.<h>`` / ``max:<l>.<h>`` name, else None."""
    pool, _, where = name.partition(":")
    if pool not in POOLS or not where:
        return None
    layer, head = where.split(".")
    return pool, int(layer), int(head)


def check_pools(pools: Sequence[str]) -> tuple[str, ...]:
    """Pooling names (mean, max), each once; an empty or unknown one is refused."""
    pools = tuple(dict.fromkeys(pools))
    bad = [p for p in pools if p not in POOLS]
    if bad:
        raise LitSahsError(f"unknown pooling {bad}: use {' and/or '.join(POOLS)}")
    return pools


def check_store_pooling(store_path, pool: Sequence[str]) -> None:
    """A store keeps one pooling choice for all its rows: extracting more rows into a store with
    another one is refused before anything loads."""
    from pathlib import Path

    from lit_sahs.data.store import ActivationStore

    if not (Path(store_path) / "manifest.json").exists():
        return
    store = ActivationStore.open(store_path)
    if not len(store):
        return
    have = tuple(p for p in POOLS if pool_extra(p) in store.extra_names())
    if set(have) != set(pool):
        raise LitSahsError(f"store {store_path} records pooled heads {list(have) or 'none'}, this extraction asks "
                           f"for {list(pool) or 'none'}: use the same --pool, or extract into a new store")


def check_store_judge(store_path, judge: bool) -> None:
    """A store records the judge feature for all its rows or for none: extracting more rows with the
    other choice is refused before anything loads."""
    from pathlib import Path

    from lit_sahs.data.store import ActivationStore

    if not (Path(store_path) / "manifest.json").exists():
        return
    store = ActivationStore.open(store_path)
    if len(store) and (JUDGE_EXTRA in store.extra_names()) != bool(judge):
        have = "records" if JUDGE_EXTRA in store.extra_names() else "does not record"
        raise LitSahsError(f"store {store_path} {have} the judge feature, this extraction asks "
                           f"--judge {str(bool(judge)).lower()}: use the same --judge, or extract into a new store")


def store_layers(store) -> tuple[int, ...]:
    """The residual layers a store recorded (refuses a store extracted before they were)."""
    if LAYER_IDS_EXTRA not in store.extra_names():
        raise LitSahsError(f"store {store.path} has no multi-layer residuals (extracted before extra features): "
                           + REEXTRACT)
    ids = store.read_extra(LAYER_IDS_EXTRA)
    if len(ids) and not (ids == ids[0]).all():
        raise LitSahsError(f"store {store.path} mixes rows extracted with different --residual_layers: "
                           "re-extract into a new store with one list")
    return tuple(int(i) for i in ids[0])


@dataclass(frozen=True)
class FeatureSpec:
    """Canonical feature names (``resid:<layer>`` / ``refusal``) and each one's width."""

    names: tuple[str, ...]
    widths: tuple[int, ...]

    def __post_init__(self):
        if len(self.names) != len(self.widths) or any(w < 1 for w in self.widths):
            raise LitSahsError(f"feature spec {self.names} / widths {self.widths} do not match")
        parse_names(self.names)

    def __bool__(self) -> bool:
        return bool(self.names)

    @classmethod
    def for_store(cls, store, spec: Union[str, Sequence[str], None], heads=None) -> "FeatureSpec":
        """The spec a store serves; `heads` (a HeadSet) expands ``mean`` / ``max``."""
        names = parse_names(spec)
        if not names:
            return cls((), ())
        have = set(store.extra_names())
        for pool in POOLS:
            if any(n.split(":")[0] == pool for n in names) and pool_extra(pool) not in have:
                raise LitSahsError(f"store {store.path} has no {pool}-pooled heads: extract it with --pool {pool}")
        layers = store_layers(store) if any(n.startswith("resid") for n in names) else ()
        if "refusal" in names and REFUSAL_EXTRA not in have:
            raise LitSahsError(f"store {store.path} has no refusal_prob extra (extracted before extra features): "
                               + REEXTRACT)
        if "judge" in names and JUDGE_EXTRA not in have:
            raise LitSahsError(f"store {store.path} has no {JUDGE_EXTRA} extra: the judge feature costs a second "
                               "prefill, recorded only when asked: extract into a new store with --judge true")

        def unknown_layer(n: str) -> str:
            return (f"feature {n}: store {store.path} recorded residuals at layers {list(layers)} only: "
                    "pick one of them, or re-extract with those layers")

        hidden = int(store.read_extra(RESIDUAL_EXTRA, rows=[0]).shape[-1]) if layers else 0
        return cls._canonical(names, layers, layers, unknown_layer, hidden, heads, store.geometry)

    @classmethod
    def for_target(cls, target, spec: Union[str, Sequence[str], None]) -> "FeatureSpec":
        """The spec a live forward of `target` serves: ``resid`` means the layers extraction records by
        default (``default_residual_layers``), so a live fit reads what a store would."""
        from lit_sahs.targets import sites

        names = parse_names(spec)
        if not names:
            return cls((), ())
        if any(n.split(":")[0] in POOLS for n in names):
            raise LitSahsError("heads pooled over the prompt (mean, max) are read from an activation store only: "
                               "guard, screen and live DataModules cannot compute them from a prefill yet")
        n_layers = target.geometry.num_layers
        return cls._canonical(names, default_residual_layers(n_layers), range(n_layers),
                              lambda n: f"feature {n}: {target.name} has decoder layers 0..{n_layers - 1}",
                              int(sites.text_config(target.model.config).hidden_size))

    @classmethod
    def _canonical(cls, names: Sequence[str], resid_layers: Sequence[int], valid_layers, unknown_layer,
                   hidden: int, heads=None, geometry=None) -> "FeatureSpec":
        """``resid`` expanded to ``resid:<layer>`` for `resid_layers`; a ``resid:<layer>`` outside
        `valid_layers` raises ``unknown_layer(name)``; ``mean`` / ``max`` expanded over `heads`;
        residuals are `hidden` wide, pooled heads head_dim, refusal and judge 1."""
        canon: list[str] = []
        for n in names:
            if n == "resid":
                canon += [f"resid:{l}" for l in resid_layers]
            elif n.startswith("resid:") and _layer(n) not in valid_layers:
                raise LitSahsError(unknown_layer(n))
            elif n in POOLS:
                if heads is None:
                    raise LitSahsError(f"feature {n} pools the detector's heads: give the heads first")
                canon += [f"{n}:{l}.{h}" for l, h in heads]
            else:
                if _pooled(n) is not None:
                    _, l, h = _pooled(n)
                    if geometry is None or not (0 <= l < geometry.num_layers and 0 <= h < geometry.num_heads):
                        raise LitSahsError(f"feature {n}: no such head in this target")
                canon.append(n)
        canon = list(dict.fromkeys(canon))
        head_dim = geometry.head_dim if geometry is not None else 0
        return cls(tuple(canon), tuple(hidden if n.startswith("resid") else head_dim if _pooled(n) else 1
                                       for n in canon))

    # ------------------------------------------------------------ layout
    def slots(self, head_dim: int) -> list[int]:
        return [math.ceil(w / head_dim) for w in self.widths]

    def num_slots(self, head_dim: int) -> int:
        return sum(self.slots(head_dim))

    def groups(self, head_dim: int) -> list[tuple[str, int, int]]:
        """(name, first slot, end slot) per feature, slots counted after the heads."""
        out, at = [], 0
        for n, s in zip(self.names, self.slots(head_dim)):
            out.append((n, at, at + s))
            at += s
        return out

    @property
    def residual_layers(self) -> tuple[int, ...]:
        return tuple(_layer(n) for n in self.names if n.startswith("resid:"))

    def pack(self, values: Sequence[np.ndarray | torch.Tensor], head_dim: int) -> torch.Tensor:
        """Per-feature values [n, width] (in `names` order) -> [n, slots, head_dim] float32, zero-padded."""
        parts = []
        for v, w, s in zip(values, self.widths, self.slots(head_dim)):
            t = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).float().reshape(len(v), -1)
            if t.shape[1] != w:
                raise LitSahsError(f"a feature of width {w} got values of width {t.shape[1]}: "
                                   "the target or store differs from the one the detector was fitted on")
            parts.append(torch.nn.functional.pad(t, (0, s * head_dim - w)).reshape(len(t), s, head_dim))
        return torch.cat(parts, dim=1) if parts else torch.zeros(0, 0, head_dim)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "FeatureSpec":
        if not d:
            return cls((), ())
        return cls(tuple(d["names"]), tuple(int(w) for w in d["widths"]))


def refusal_feature(prob: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The refusal feature: log-odds of the refusal probability (clipped), [n, 1]."""
    p = torch.as_tensor(np.asarray(prob) if not torch.is_tensor(prob) else prob).double().clamp(PROB_EPS, 1 - PROB_EPS)
    return (p.log() - (1 - p).log()).float().reshape(-1, 1)


def judge_feature(logodds: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The judge feature: the judge prefill's log-odds as they are (``lit_sahs.self_judge``), [n, 1]."""
    return torch.as_tensor(np.asarray(logodds) if not torch.is_tensor(logodds) else logodds).float().reshape(-1, 1)


def read_values(store, spec: FeatureSpec, rows: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Per-feature values [n, width] from a store's extras (rows: positions of `index()`)."""
    if not spec:
        return []
    out = []
    layers = store_layers(store) if spec.residual_layers else ()
    resid = store.read_extra(RESIDUAL_EXTRA, rows=rows) if layers else None
    pooled = {p: store.read_extra(pool_extra(p), rows=rows) for p in POOLS
              if any((_pooled(n) or ("",))[0] == p for n in spec.names)}
    for n in spec.names:
        if n == "refusal":
            out.append(refusal_feature(store.read_extra(REFUSAL_EXTRA, rows=rows)).numpy())
        elif n == "judge":
            out.append(judge_feature(store.read_extra(JUDGE_EXTRA, rows=rows)).numpy())
        elif _pooled(n) is not None:
            pool, layer, head = _pooled(n)
            out.append(pooled[pool][:, layer, head].astype(np.float32))
        else:
            out.append(resid[:, layers.index(_layer(n))].astype(np.float32))
    return out


def read_packed(store, spec: FeatureSpec, head_dim: int, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    return spec.pack(read_values(store, spec, rows), head_dim)


def read_inputs(store, head_set, spec: FeatureSpec, head_dim: int, rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """What a detector with `spec` reads for store rows: heads then packed features, [n, k + slots, D]."""
    x = store.read(head_set, rows=rows)
    if not spec:
        return x
    return np.concatenate([np.asarray(x, dtype=np.float32), read_packed(store, spec, head_dim, rows).numpy()], axis=1)


def from_forward(spec: FeatureSpec, residuals: Optional[torch.Tensor], refusal_prob: Optional[torch.Tensor],
                 head_dim: int, judge_logodds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed features from one forward: `residuals` [B, len(spec.residual_layers), hidden] in
    spec.residual_layers order, `refusal_prob` [B]; `judge_logodds` [B] from the judge prefill."""
    vals, i = [], 0
    for n in spec.names:
        if n == "refusal":
            vals.append(refusal_feature(refusal_prob))
        elif n == "judge":
            vals.append(judge_feature(judge_logodds))
        else:
            vals.append(residuals[:, i].float())
            i += 1
    return spec.pack(vals, head_dim)
