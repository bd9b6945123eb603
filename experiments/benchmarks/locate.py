"""Per-head probes: one batched model (lit_sahs.locate.fit_head_probes) vs a scikit-learn loop.

On the same train/val data, in one run: fits a logistic probe for every (layer, head) both ways,
with the same standardisation (train mean/std per head and dim) and the same regularisation
(sklearn C = 1 / (l2 * n_train)), and prints the time of each, the speed ratio (goal >= 20x) and
the largest |AUROC difference| across heads on the val split.

    python experiments/benchmarks/locate.py --store stores/smollm2-135m-instruct
    python experiments/benchmarks/locate.py --sklearn_tol 1e-6   # sklearn fitted as tightly as the batched probes
    python experiments/benchmarks/locate.py            # synthetic SmolLM2-shaped data (30 x 9 x 64, 400 rows)
"""
from __future__ import annotations

import time
import warnings
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from lit_sahs.commands import script_main
from lit_sahs.locate import DEFAULT_L2, fit_head_probes


def synthetic(n=400, L=30, H=9, D=64, seed=0):
    """SmolLM2-shaped activations with a class signal planted in a few heads (different strengths)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, L, H, D)).astype(np.float32)
    for (l, h), strength in {(12, 3): 1.5, (17, 5): 1.0, (20, 1): 0.7, (25, 8): 0.4}.items():
        direction = rng.standard_normal(D)
        direction /= np.linalg.norm(direction)
        x[:, l, h] += strength * np.outer(2 * y - 1, direction).astype(np.float32)
    rows = np.arange(n)
    rng.shuffle(rows)
    n_val = n // 5
    return x[rows[n_val:]], y[rows[n_val:]], x[rows[:n_val]], y[rows[:n_val]], "synthetic 30x9x64, 400 rows"


def from_store(path, seed=0):
    from lit_sahs.data.protocol import split_rows
    from lit_sahs.data.store import ActivationStore

    store = ActivationStore.open(path)
    rows = store.index()
    split = split_rows(rows, seed=seed)
    labels = np.asarray([int(r["label"]) for r in rows])
    x = store.read()
    return (x[split["train"]], labels[split["train"]], x[split["val"]], labels[split["val"]],
            f"{path} {store.geometry.shape}, train {len(split['train'])} / val {len(split['val'])}")


def sklearn_loop(xt, yt, xe, ye, l2, tol=1e-4):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    n, L, H, _ = xt.shape
    auroc = np.empty((L, H))
    for l in range(L):
        for h in range(H):
            scaler = StandardScaler().fit(xt[:, l, h])
            clf = LogisticRegression(C=1.0 / (l2 * n), max_iter=5000, tol=tol)  # lbfgs, as sklearn defaults
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                clf.fit(scaler.transform(xt[:, l, h]), yt)
            auroc[l, h] = roc_auc_score(ye, clf.decision_function(scaler.transform(xe[:, l, h])))
    return auroc


def run(store: Optional[str] = None, l2: float = DEFAULT_L2, seed: int = 0, sklearn_tol: float = 1e-4,
        rounds: int = 3) -> None:
    """Batched per-head probes against a scikit-learn loop: speed ratio and AUROC agreement.

    Args:
        store: an ActivationStore directory (default: synthetic SmolLM2-shaped data)
        l2: L2 strength of the probes (sklearn C = 1 / (l2 * n_train))
        seed: split seed (store) or data seed (synthetic)
        sklearn_tol: LogisticRegression tol (1e-4 is its default)
        rounds: alternating timed rounds of both (the fastest of each is reported: the machine is shared)
    """
    args = SimpleNamespace(**locals())

    xt, yt, xe, ye, what = from_store(args.store, args.seed) if args.store else synthetic(seed=args.seed)
    xt, xe = xt.astype(np.float32), xe.astype(np.float32)
    L, H = xt.shape[1:3]
    print(f"data: {what}; {L * H} heads; torch threads {torch.get_num_threads()}")

    tt, te = torch.from_numpy(xt), torch.from_numpy(xe)
    fit_head_probes(tt, yt, te, ye, l2=args.l2)  # warm-up (allocator, kernels)
    t_batched, t_sklearn = [], []
    for _ in range(args.rounds):  # alternate, so background load hits both alike
        t = time.perf_counter()
        out = fit_head_probes(tt, yt, te, ye, l2=args.l2)
        t_batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        sk = sklearn_loop(xt, yt, xe, ye, args.l2, args.sklearn_tol)
        t_sklearn.append(time.perf_counter() - t)
    t_batched, t_sklearn = min(t_batched), min(t_sklearn)

    diff = np.abs(out["auroc"].numpy() - sk)
    print(f"batched probes (fit_head_probes, {int(out['iterations'])} Newton steps): "
          f"{t_batched * 1000:.1f} ms  (fastest of {args.rounds})")
    print(f"sklearn LogisticRegression loop ({L * H} fits, tol {args.sklearn_tol:g}):  {t_sklearn * 1000:.1f} ms  (fastest of {args.rounds})")
    print(f"speed ratio: {t_sklearn / t_batched:.1f}x  (goal >= 20x)")
    print(f"largest |AUROC difference| across heads: {diff.max():.2e}  (mean {diff.mean():.2e})")
    best = np.unravel_index(np.argmax(out["auroc"].numpy()), (L, H))
    print(f"best head: layer {best[0]} head {best[1]}  val AUROC batched {out['auroc'][best]:.4f} "
          f"sklearn {sk[best]:.4f}")


if __name__ == "__main__":
    raise SystemExit(script_main(run))
