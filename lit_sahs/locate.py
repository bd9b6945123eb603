"""Locate safety heads: one probe per (layer, head), all fitted at once, ranked by held-out AUROC."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.ranking import HeadRanking


# ---------------------------------------------------------------------------------------------------
# Batched per-head probes
#
# Every (layer, head) gets its own L2-regularised logistic regression on its head_dim features. The
# G = L*H problems are independent, so they are solved as ONE batched model: weights [G, D+1] (the
# last column is the bias), fitted by damped Newton (IRLS) with a per-head backtracking line search.
# Each iteration is a handful of batched matrix products plus one batched solve of [G, D+1, D+1]
# Hessians; no Python loop over heads. Per head the objective is
#
#     mean_i BCE(sigmoid(w . x_i + b), y_i) + (l2 / 2) * ||w||^2      (bias not penalised)
#
# on features standardised with the train split's per-head, per-dimension mean and std. This is
# scikit-learn's LogisticRegression(C = 1 / (l2 * n_train)) on StandardScaler-ed features.
# ---------------------------------------------------------------------------------------------------

DEFAULT_L2 = 1e-2
DEFAULT_MAX_ITER = 50
DEFAULT_MEMORY_BUDGET = 4 * 1024**3  # bytes of float32 activations held at once by locate()
_STEPS = 2.0 ** -torch.arange(12, dtype=torch.float64)  # line-search step sizes tried at once: 1, 1/2, ...


def _as_float(x, name: str, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    return t.to(device=device, dtype=dtype)


def _as_labels(y, n: int, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).reshape(-1)
    if t.numel() != n:
        raise LitSahsError(f"{name} has {t.numel()} labels for {n} samples: give one 0/1 label per sample")
    vals = set(torch.unique(t).tolist())
    if not vals <= {0, 1}:
        raise LitSahsError(f"{name} must hold 0 (benign) / 1 (malicious) labels, got values {sorted(vals)}")
    if len(vals) < 2:
        only = "malicious" if 1 in vals else "benign"
        raise LitSahsError(f"{name} holds only {only} samples: a probe needs both classes; add data of the other class")
    return t.to(device=device)


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/inf check: a finite sum is proof enough (cheap); only an overflowing sum needs the full test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def batched_auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every row of `scores` [G, M] against shared 0/1 `labels` [M], exact with ties
    (Mann-Whitney U with average ranks), all rows at once."""
    labels = labels.to(scores.device).bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise LitSahsError("AUROC needs both classes among the evaluation labels")
    s = scores.to(torch.float64).contiguous()
    srt = torch.sort(s, dim=-1).values.contiguous()
    lo = torch.searchsorted(srt, s, side="left")
    hi = torch.searchsorted(srt, s, side="right")
    ranks = (lo + hi + 1).to(torch.float64) / 2.0  # 1-based average rank of each score among ties
    u = ranks[:, labels].sum(-1) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _loss(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """Per-head objective: z [..., G, N] logits, y [N], w [..., G, D+1] (last = bias) -> [..., G]."""
    bce = torch.nn.functional.softplus(z) - y * z  # = BCE-with-logits, stable
    return bce.mean(-1) + 0.5 * l2 * (w[..., :-1] ** 2).sum(-1)


def fit_head_probes(
    x_train,
    y_train,
    x_eval,
    y_eval,
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
    device: str | torch.device = "cpu",
    tol: float = 1e-8,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Fit one logistic probe per (layer, head), all at once, and score each on the eval data.

    x_*: float [N, L, H, D] (tensor or array, any float dtype); y_*: 0/1 [N]. Features are
    standardised per head and dimension with train statistics. Returns CPU tensors:
    ``auroc`` [L, H] and ``accuracy`` [L, H] (threshold 0.5) on the eval data, plus ``weight``
    [L, H, D] and ``bias`` [L, H] in standardised space, ``mean``/``std`` [L, H, D] (train
    statistics) and ``iterations`` (Newton steps taken).
    """
    device = torch.device(device)
    if l2 <= 0 or not math.isfinite(l2):
        raise LitSahsError(f"l2 must be a positive number, got {l2}: the probes need some regularisation")
    if max_iter < 1:
        raise LitSahsError(f"max_iter must be at least 1, got {max_iter}")
    xt = _as_float(x_train, "x_train", device, dtype)
    xe = _as_float(x_eval, "x_eval", device, dtype)
    if xt.dim() != 4 or xe.dim() != 4 or xt.shape[1:] != xe.shape[1:]:
        raise LitSahsError(
            f"x_train {tuple(xt.shape)} and x_eval {tuple(xe.shape)} must both be [samples, layers, heads, head_dim] "
            "with the same layers, heads and head_dim"
        )
    for name, t in (("x_train", xt), ("x_eval", xe)):
        if not _all_finite(t):
            raise LitSahsError(f"{name} holds NaN or inf values: check the activations before locating heads")
    n, L, H, D = xt.shape
    yt = _as_labels(y_train, n, "y_train", device).to(dtype)
    ye = _as_labels(y_eval, xe.shape[0], "y_eval", device)
    G = L * H

    mean = xt.mean(0)  # [L, H, D] train statistics, per head and dimension
    std = (xt - mean).square_().mean(0).sqrt_()
    std = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))  # constant dims stay 0 after centring

    def design(x: torch.Tensor) -> torch.Tensor:
        """[N, L, H, D] -> [G, N, D+1]: standardised features per head, plus a ones column for the bias."""
        out = torch.empty(G, x.shape[0], D + 1, device=device, dtype=dtype)
        out[..., :D] = ((x - mean) / std).reshape(x.shape[0], G, D).transpose(0, 1)
        out[..., D] = 1.0
        return out

    X = design(xt)  # [G, N, D+1]
    XT = X.transpose(1, 2).contiguous()  # [G, D+1, N]: row-major operand for the Hessian's bmm
    del xt
    reg = torch.full((D + 1,), l2, device=device, dtype=dtype)
    reg[-1] = 0.0
    ridge = torch.diag(reg) + 1e-8 * torch.eye(D + 1, device=device, dtype=dtype)
    steps = _STEPS.to(device=device, dtype=dtype).view(-1, 1, 1)  # [T, 1, 1]
    w = torch.zeros(G, D + 1, device=device, dtype=dtype)
    z = torch.zeros(G, n, device=device, dtype=dtype)  # train logits, kept in step with w
    f = _loss(z, yt, w, l2)
    # Working set: heads still being optimised, with their rows of X gathered once. Converged heads stay
    # in it (not moving) until at most half of it is live; then it is compacted (one gather).
    work = torch.arange(G, device=device)
    Xw, XTw = X, XT
    live = torch.ones(G, dtype=torch.bool, device=device)
    it = 0
    for it in range(1, max_iter + 1):
        za, wa, fa = z[work], w[work], f[work]
        p = torch.sigmoid(za)
        grad = torch.bmm(XTw, (p - yt).unsqueeze(-1)).squeeze(-1) / n + reg * wa
        hess = torch.bmm(XTw * (p * (1 - p) / n).unsqueeze(1), Xw) + ridge  # IRLS: X' diag(p(1-p)/n) X + l2
        d, info = torch.linalg.solve_ex(hess, grad)  # one batched LU solve (faster here than Cholesky + solve)
        if bool((info != 0).any()):  # numerically singular: more jitter
            d = torch.linalg.solve(hess + 1e-4 * torch.eye(D + 1, device=device, dtype=dtype), grad)
        d = -d  # Newton direction [w, D+1]
        decrement = -(grad * d).sum(-1)  # squared Newton decrement: twice the predicted loss drop
        # Step: the full Newton step where it satisfies Armijo (nearly always); heads where it does not
        # backtrack together, trying every step size at once and keeping each head's largest good one.
        xd = torch.bmm(Xw, d.unsqueeze(-1)).squeeze(-1)
        f_new = _loss(za + xd, yt, wa + d, l2)
        t = torch.ones_like(decrement)
        bad = torch.nonzero(live & (f_new > fa - 1e-4 * decrement)).squeeze(-1)
        if bad.numel():
            f_try = _loss(za[bad] + steps * xd[bad], yt, wa[bad] + steps * d[bad], l2)  # [T, b]
            ok = f_try <= fa[bad] - 1e-4 * steps.view(-1, 1) * decrement[bad]
            pick = ok.to(torch.int8).argmax(0)  # first (largest) acceptable step per head
            t[bad] = torch.where(ok.any(0), steps.view(-1)[pick], torch.zeros_like(pick, dtype=dtype))
            f_new[bad] = f_try.gather(0, pick.unsqueeze(0)).squeeze(0)
        live = live & (decrement >= tol) & (t > 0)  # converged, or at the optimum up to rounding: stay put
        t = torch.where(live, t, torch.zeros_like(t)).unsqueeze(-1)
        w[work] = wa + t * d
        z[work] = za + t * xd
        f[work] = torch.where(live, f_new, fa)
        n_live = int(live.sum())
        if n_live == 0:
            break
        if 2 * n_live <= work.numel():
            work, Xw, XTw, live = work[live], Xw[live], XTw[live], live[live]
    del X, XT, Xw, XTw

    Xe = design(xe)
    ze = torch.einsum("gnd,gd->gn", Xe, w)  # [G, M]
    auroc = batched_auroc(ze, ye).reshape(L, H)
    accuracy = ((ze > 0) == ye.bool().unsqueeze(0)).to(torch.float64).mean(-1).reshape(L, H)
    return {
        "auroc": auroc.cpu(),
        "accuracy": accuracy.cpu(),
        "weight": w[:, :-1].reshape(L, H, D).cpu(),
        "bias": w[:, -1].reshape(L, H).cpu(),
        "mean": mean.cpu(),
        "std": std.cpu(),
        "iterations": torch.tensor(it),
    }


def rank_heads(auroc, accuracy) -> list[dict]:
    """Score rows best first: by AUROC, ties broken by accuracy, then by (layer, head)."""
    au = np.asarray(auroc, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    if au.ndim != 2 or au.shape != acc.shape:
        raise LitSahsError(f"auroc {au.shape} and accuracy {acc.shape} must both be [layers, heads]")
    L, H = au.shape
    layer, head = np.divmod(np.arange(L * H), H)
    order = np.lexsort((head, layer, -acc.ravel(), -au.ravel()))  # last key is primary
    return [
        {"layer": int(layer[i]), "head": int(head[i]), "auroc": float(au.ravel()[i]), "accuracy": float(acc.ravel()[i])}
        for i in order
    ]


def ranking_grid(ranking: HeadRanking, key: str = "auroc") -> np.ndarray:
    """A ranking's scores back on the [layers, heads] grid (NaN for heads it does not list)."""
    g = ranking.fingerprint.geometry
    grid = np.full((g.num_layers, g.num_heads), np.nan)
    for s in ranking.scores:
        grid[s["layer"], s["head"]] = s[key]
    return grid


def _head_chunks(n_rows: int, geometry, memory_budget: int) -> list[tuple[int, int]]:
    """Ranges of heads in (layer, head) order whose float32 activations for n_rows fit the budget (at
    least one head each): a store larger than memory is fitted a few heads at a time, so the peak
    is set by the budget and one head's column of the rows, not by the layer width or the store."""
    total = geometry.num_layers * geometry.num_heads
    per_head = n_rows * geometry.head_dim * 4
    step = max(1, min(total, int(memory_budget // max(per_head, 1))))
    return [(a, min(a + step, total)) for a in range(0, total, step)]


def locate(
    store,
    held_out_families: Sequence[str] = (),
    held_out_sources: Sequence[str] = (),
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
    device: str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    train_families: Sequence[str] = (),
) -> HeadRanking:
    """Rank every (layer, head) of an ActivationStore (or a store path) by its probe's AUROC on the
    VAL split of `split_rows`; probes are fitted on the train split, and the test split (held-out
    families/sources, or a random share) is never read. If the train+val activations exceed
    `memory_budget` bytes as float32, heads are processed in chunks (each chunk batched; the fit
    holds about four times its chunk's bytes), read from the store a chunk at a time."""
    from lit_sahs.data.protocol import split_rows
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.engine import require_one_process

    require_one_process("locate")  # one batched model over all heads; no DDP
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    if memory_budget <= 0:
        raise LitSahsError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    t0 = time.perf_counter()
    rows = store.index()
    if not rows:
        raise LitSahsError(f"activation store {store.path} has no rows: run `python -m lit_sahs extract ...` first")
    split = split_rows(rows, held_out_families, held_out_sources, val_fraction, test_fraction, seed,
                       train_families=train_families)
    labels = np.asarray([int(r["label"]) for r in rows], dtype=np.int64)
    tr, va = split["train"], split["val"]
    pick = np.concatenate([tr, va])
    geom = store.geometry
    chunks = _head_chunks(len(pick), geom, memory_budget)
    auroc = np.empty(geom.num_layers * geom.num_heads)  # flat, (layer, head) order
    accuracy = np.empty_like(auroc)
    iterations = 0
    bar = tqdm(total=len(auroc), desc="locating heads", unit="head", disable=None, dynamic_ncols=True, leave=False)
    for a, b in chunks:
        if (a, b) == (0, len(auroc)):
            x = store.read(None, rows=pick)  # [n, L, H, D]
        else:
            heads = HeadSet(divmod(g, geom.num_heads) for g in range(a, b))
            x = store.read(heads, rows=pick).reshape(len(pick), 1, b - a, geom.head_dim)
        x = torch.from_numpy(x)
        out = fit_head_probes(x[: len(tr)], labels[tr], x[len(tr):], labels[va], l2=l2, max_iter=max_iter,
                              device=device)
        del x
        auroc[a:b] = out["auroc"].numpy().reshape(-1)
        accuracy[a:b] = out["accuracy"].numpy().reshape(-1)
        iterations = max(iterations, int(out["iterations"]))
        bar.update(b - a)
    bar.close()
    auroc, accuracy = auroc.reshape(geom.num_layers, geom.num_heads), accuracy.reshape(geom.num_layers, geom.num_heads)
    meta = {
        "store": str(store.path) if getattr(store, "remote", False) else str(Path(store.path).resolve()),
        "scored_on": "val",
        "split": {
            "held_out_families": list(held_out_families if not isinstance(held_out_families, str) else [held_out_families]),
            "held_out_sources": list(held_out_sources if not isinstance(held_out_sources, str) else [held_out_sources]),
            "train_families": list(train_families if not isinstance(train_families, str) else [train_families]),
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
            "sizes": {k: int(len(v)) for k, v in split.items()},
            "malicious": {k: int(labels[v].sum()) for k, v in split.items()},
        },
        "probe": {
            "kind": "logistic, one per head, batched damped Newton",
            "l2": l2,
            "sklearn_C": 1.0 / (l2 * len(tr)),
            "standardise": "per head and dim, train statistics",
            "max_iter": max_iter,
            "iterations": iterations,
            "head_chunks": [list(c) for c in chunks],  # [first, end) in (layer, head) order
            "device": str(device),
        },
        "rank_by": ["auroc", "accuracy"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return HeadRanking(store.fingerprint, rank_heads(auroc, accuracy), meta)


def save_ranking_outputs(ranking: HeadRanking, out_dir: str | Path, top_k: int = 8) -> tuple[Path, Path]:
    """Write `ranking.json` and the `heads.png` heatmap (top_k heads marked) into out_dir."""
    from lit_sahs.plots import head_heatmap

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ranking.method == "effect":  # beside a store's probe ranking, not over it
        json_path = ranking.save(out_dir / "effect_ranking.json")
        title = f"{ranking.fingerprint.name}: refusal drop when each head is ablated (confirmed, else estimate)"
        png_path = head_heatmap(ranking_grid(ranking, "drop"), out_dir / "effect_heads.png", title, top_k=top_k,
                                label="refusal drop", vmin=None, vmax=None)
        return json_path, png_path
    json_path = ranking.save(out_dir / "ranking.json")
    where = ranking.meta.get("scored_on", "held-out")
    title = f"{ranking.fingerprint.name}: per-head probe AUROC ({where})"
    png_path = head_heatmap(ranking_grid(ranking, "auroc"), out_dir / "heads.png", title, top_k=top_k)
    return json_path, png_path
