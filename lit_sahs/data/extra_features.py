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
  by ``extract --pool mean,max``); ``mean`` / ``max`` — the detector's own heads, pooled;
* ``tok:<layer>.<head>`` — that head's output at each of the prompt's last T own tokens, right-aligned
  (T x head_dim values, zeros before a short prompt), and ``tokmask`` — which of the T slots hold a
  token (store extras ``tokens`` / ``token_mask`` / ``token_head_ids``, written by ``extract
  --token_heads``); ``tokens`` — the detector's own heads at every token, plus ``tokmask``. What the
  attention-pooling family reads.

Pooled and per-token features come from ``lit_sahs.prompt_hooks``' captures, which find the prompt's
tokens from the forward's ids, so guard, screen and live DataModules compute them from the same
prefill as a store does.

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
TOKENS_EXTRA, TOKEN_MASK_EXTRA, TOKEN_HEADS_EXTRA = "tokens", "token_mask", "token_head_ids"
TOKEN_LENGTH = 64  # the prompt tokens a live forward records for `tokens` when no store says otherwise
JUDGE_EXTRA = "judge_logodds"  # [n] float32, written only by `extract --judge` (a second prefill)
_NAME = re.compile(r"^(resid:\d+|resid|refusal|judge|(mean|max)(:\d+\.\d+)?|tokens|tokmask|tok:\d+\.\d+)$")
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
                           "refusal, judge, mean or max (the heads pooled over the prompt), tokens (the heads at "
                           "every prompt token), comma-separated")
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


def _token_head(name: str) -> Optional[tuple[int, int]]:
    """(layer, head) of a ``tok:<l>.<h>`` name, else None."""
    if not name.startswith("tok:"):
        return None
    layer, head = name[4:].split(".")
    return int(layer), int(head)


def store_token_heads(store) -> tuple[tuple[int, int], ...]:
    """The heads a store recorded at every prompt token (``extract --token_heads``)."""
    if TOKEN_HEADS_EXTRA not in store.extra_names():
        raise LitSahsError(f"store {store.path} has no per-token heads: extract it with --token_heads")
    ids = store.read_extra(TOKEN_HEADS_EXTRA)
    if len(ids) and not (ids == ids[0]).all():
        raise LitSahsError(f"store {store.path} mixes rows extracted with different --token_heads: "
                           "re-extract into a new store with one list")
    return tuple((int(l), int(h)) for l, h in ids[0])


def check_pools(pools: Sequence[str]) -> tuple[str, ...]:
    """Pooling names (mean, max), each once; an empty or unknown one is refused."""
    pools = tuple(dict.fromkeys(pools))
    bad = [p for p in pools if p not in POOLS]
    if bad:
        raise LitSahsError(f"unknown pooling {bad}: use {' and/or '.join(POOLS)}")
    return pools


def check_store_pooling(store_path, pool: Sequence[str], token_heads=None, token_length: int = 0) -> None:
    """A store keeps one pooling choice and one per-token choice (heads, length) for all its rows:
    extracting more rows into a store with other ones is refused before anything loads."""
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
    recorded = store_token_heads(store) if TOKEN_HEADS_EXTRA in store.extra_names() else ()
    length = int(store.read_extra(TOKEN_MASK_EXTRA, rows=[0]).shape[-1]) if recorded else 0
    asked = tuple(tuple(h) for h in token_heads) if token_heads else ()
    if recorded != asked or (asked and length != token_length):
        def say(heads, n):
            return f"heads {','.join(f'{l}.{h}' for l, h in heads)} at {n} tokens" if heads else "no per-token heads"
        raise LitSahsError(f"store {store_path} records {say(recorded, length)}, this extraction asks for "
                           f"{say(asked, token_length)}: use the same --token_heads and --token_length, "
                           "or extract into a new store")


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
        length = 0
        if any(n == "tokens" or n == "tokmask" or _token_head(n) for n in names):
            recorded = store_token_heads(store)
            length = int(store.read_extra(TOKEN_MASK_EXTRA, rows=[0]).shape[-1])
            asked = [_token_head(n) for n in names if _token_head(n)]
            asked += list(heads) if "tokens" in names and heads is not None else []
            missing = [f"{l}.{h}" for l, h in asked if (l, h) not in recorded]
            if missing:
                raise LitSahsError(f"store {store.path} recorded heads {', '.join(f'{l}.{h}' for l, h in recorded)} at every token, "
                                   f"not {', '.join(missing)}: pick those heads, or re-extract with --token_heads")

        def unknown_layer(n: str) -> str:
            return (f"feature {n}: store {store.path} recorded residuals at layers {list(layers)} only: "
                    "pick one of them, or re-extract with those layers")

        hidden = int(store.read_extra(RESIDUAL_EXTRA, rows=[0]).shape[-1]) if layers else 0
        return cls._canonical(names, layers, layers, unknown_layer, hidden, heads, store.geometry, length)

    @classmethod
    def for_target(cls, target, spec: Union[str, Sequence[str], None], heads=None,
                   token_length: int = TOKEN_LENGTH) -> "FeatureSpec":
        """The spec a live forward of `target` serves: ``resid`` means the layers extraction records by
        default (``default_residual_layers``), so a live fit reads what a store would; per-token
        features record the prompt's last `token_length` tokens."""
        from lit_sahs.targets import sites

        names = parse_names(spec)
        if not names:
            return cls((), ())
        n_layers = target.geometry.num_layers
        return cls._canonical(names, default_residual_layers(n_layers), range(n_layers),
                              lambda n: f"feature {n}: {target.name} has decoder layers 0..{n_layers - 1}",
                              int(sites.text_config(target.model.config).hidden_size), heads, target.geometry,
                              token_length)

    @classmethod
    def _canonical(cls, names: Sequence[str], resid_layers: Sequence[int], valid_layers, unknown_layer,
                   hidden: int, heads=None, geometry=None, token_length: int = 0) -> "FeatureSpec":
        """``resid`` expanded to ``resid:<layer>`` for `resid_layers`; a ``resid:<layer>`` outside
        `valid_layers` raises ``unknown_layer(name)``; ``mean`` / ``max`` / ``tokens`` expanded over
        `heads`; residuals are `hidden` wide, pooled heads head_dim, a head's tokens
        token_length x head_dim, ``tokmask`` token_length, refusal and judge 1."""
        canon: list[str] = []
        for n in names:
            if n == "resid":
                canon += [f"resid:{l}" for l in resid_layers]
            elif n.startswith("resid:") and _layer(n) not in valid_layers:
                raise LitSahsError(unknown_layer(n))
            elif n in POOLS or n == "tokens":
                if heads is None:
                    raise LitSahsError(f"feature {n} reads the detector's heads: give the heads first")
                canon += [f"{'tok' if n == 'tokens' else n}:{l}.{h}" for l, h in heads]
                canon += ["tokmask"] if n == "tokens" else []
            else:
                where = _pooled(n)[1:] if _pooled(n) is not None else _token_head(n)
                if where is not None:
                    l, h = where
                    if geometry is None or not (0 <= l < geometry.num_layers and 0 <= h < geometry.num_heads):
                        raise LitSahsError(f"feature {n}: no such head in this target")
                canon.append(n)
        canon = list(dict.fromkeys(canon))
        if any(_token_head(n) for n in canon) and "tokmask" not in canon:
            canon.append("tokmask")  # which token slots are real travels with the tokens
        head_dim = geometry.head_dim if geometry is not None else 0

        def width(n: str) -> int:
            if n.startswith("resid"):
                return hidden
            if _pooled(n):
                return head_dim
            if _token_head(n):
                return token_length * head_dim
            return token_length if n == "tokmask" else 1

        return cls(tuple(canon), tuple(width(n) for n in canon))

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

    @property
    def pools(self) -> tuple[str, ...]:
        """The poolings the spec reads (mean, max)."""
        return tuple(p for p in POOLS if any((_pooled(n) or ("",))[0] == p for n in self.names))

    @property
    def token_heads(self) -> tuple[tuple[int, int], ...]:
        """The heads the spec reads at every prompt token, in spec order."""
        return tuple(_token_head(n) for n in self.names if _token_head(n))

    @property
    def token_length(self) -> int:
        """How many prompt tokens the per-token features hold (0: none)."""
        return dict(zip(self.names, self.widths)).get("tokmask", 0)

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

    def request(self, heads) -> Optional[str]:
        """The spec as a fit asks for it: per-head names over exactly the detector's `heads` collapse
        back into ``mean`` / ``max`` / ``tokens``, so a refit that picks other heads (a source fold,
        a cross-fit) pools and reads its own heads, as the original fit did."""
        heads = [tuple(h) for h in heads]
        names = list(self.names)
        for short, of in (("mean", lambda n: _pooled(n)[1:] if (_pooled(n) or ("",))[0] == "mean" else None),
                          ("max", lambda n: _pooled(n)[1:] if (_pooled(n) or ("",))[0] == "max" else None),
                          ("tokens", _token_head)):
            mine = [n for n in names if of(n)]
            if mine and [of(n) for n in mine] == heads:
                at = names.index(mine[0])
                names = [n for n in names if n not in mine and not (short == "tokens" and n == "tokmask")]
                names.insert(min(at, len(names)), short)
        return ",".join(names) or None

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
    pooled = {p: store.read_extra(pool_extra(p), rows=rows) for p in spec.pools}
    tokens = store.read_extra(TOKENS_EXTRA, rows=rows) if spec.token_heads else None
    recorded = store_token_heads(store) if spec.token_heads else ()
    for n in spec.names:
        if n == "refusal":
            out.append(refusal_feature(store.read_extra(REFUSAL_EXTRA, rows=rows)).numpy())
        elif n == "judge":
            out.append(judge_feature(store.read_extra(JUDGE_EXTRA, rows=rows)).numpy())
        elif _pooled(n) is not None:
            pool, layer, head = _pooled(n)
            out.append(pooled[pool][:, layer, head].astype(np.float32))
        elif _token_head(n) is not None:
            j = recorded.index(_token_head(n))
            out.append(tokens[:, :, j].astype(np.float32).reshape(len(tokens), -1))
        elif n == "tokmask":
            out.append(store.read_extra(TOKEN_MASK_EXTRA, rows=rows).astype(np.float32))
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
                 head_dim: int, pooled: Optional[dict] = None,
                 tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 judge_logodds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed features from one forward: `residuals` [B, len(spec.residual_layers), hidden] in
    spec.residual_layers order, `refusal_prob` [B], `pooled` {pool: [B, layers, heads, head_dim]},
    `tokens` (values [B, T, len(spec.token_heads), head_dim] in spec.token_heads order, valid [B, T]);
    `judge_logodds` [B] from the judge prefill."""
    vals, i, j = [], 0, 0
    for n in spec.names:
        if n == "refusal":
            vals.append(refusal_feature(refusal_prob))
        elif n == "judge":
            vals.append(judge_feature(judge_logodds))
        elif _pooled(n) is not None:
            pool, layer, head = _pooled(n)
            vals.append(pooled[pool][:, layer, head].float())
        elif _token_head(n) is not None:
            vals.append(tokens[0][:, :, j].float().reshape(len(tokens[0]), -1))
            j += 1
        elif n == "tokmask":
            vals.append(tokens[1].float())
        else:
            vals.append(residuals[:, i].float())
            i += 1
    return spec.pack(vals, head_dim)
