"""Figures, one small function each. Every function draws on its own Figure (no pyplot state, so it
is safe in threads and never opens a window), renders with the Agg backend, and writes the file
atomically (temp file in the same directory, then os.replace), returning the path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_file


def _save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        FigureCanvasAgg(fig)
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def head_heatmap(auroc, path: str | Path, title: str = "per-head probe AUROC", top_k: int = 8, label: str = "AUROC",
                 vmin: float | None = 0.5, vmax: float | None = 1.0) -> Path:
    """Layers x heads heatmap of `auroc` [L, H] (or any per-head score, named by `label`) with a
    colour bar from min(vmin, lowest value) to vmax (None: the data's range); the top_k heads (by
    value) are boxed and numbered by rank. NaN cells (unscored heads) are left blank."""
    a = np.asarray(auroc, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise LitSahsError(f"head_heatmap needs a [layers, heads] array, got shape {a.shape}")
    L, H = a.shape
    fig = Figure(figsize=(2.2 + 0.45 * H, 1.6 + 0.24 * L))
    ax = fig.add_subplot()
    finite = a[np.isfinite(a)]
    lo = float(finite.min()) if finite.size else (vmin if vmin is not None else 0.0)
    lo = lo if vmin is None else min(vmin, lo)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-12), aspect="auto",
                   interpolation="nearest", origin="lower")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_title(title, fontsize=9)
    k = min(max(int(top_k), 0), finite.size)
    if k:
        flat = np.where(np.isfinite(a), a, -np.inf).ravel()
        best = np.argsort(-flat, kind="stable")[:k]
        for rank, i in enumerate(best, 1):
            l, h = divmod(int(i), H)
            ax.add_patch(_box(h, l))
            ax.text(h, l, str(rank), ha="center", va="center", fontsize=7, color="red", fontweight="bold")
    fig.tight_layout()
    return _save(fig, path)


def _box(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)


def roc_curves(scores: dict, labels, path: str | Path, title: str = "ROC on held-out rows") -> Path:
    """One ROC curve per method (detector and baselines) on the same rows, log-scaled FPR so the
    low-FPR region a guard runs in is visible."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    for name, s in scores.items():
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, np.asarray(s))
        ax.plot(np.maximum(fpr, 1e-3), tpr, label=f"{name} (AUROC {roc_auc_score(labels, s):.3f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1.01)
    ax.axvline(0.01, color="grey", lw=0.5, ls=":")
    ax.axvline(0.05, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("false-positive rate (benign flagged)")
    ax.set_ylabel("true-positive rate (malicious flagged)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def family_matrix(matrix, rows, cols, path: str | Path, title: str = "zero-shot AUROC (train family × test family)") -> Path:
    """Train-family × test-family AUROC heatmap with the values written in the cells."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(1.2 + 1.0 * len(cols), 1.0 + 0.6 * len(rows)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("test family")
    ax.set_ylabel("train family")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < 0.8 else "black")
    fig.colorbar(im, ax=ax, label="AUROC")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def fold_bars(values: dict[str, list[float]], folds: list[str], path: str | Path, ylabel: str = "AUROC",
              title: str = "held-out source folds") -> Path:
    """Grouped bars: one group per fold, one bar per method ({method: [value per fold]})."""
    fig = Figure(figsize=(max(6.0, 0.9 * len(folds) + 2), 4.2))
    ax = fig.add_subplot()
    methods = list(values)
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(folds))
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(values[m], nan=0.0), width, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(folds, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2 if any(len(m) > 12 for m in methods) else len(methods))
    fig.tight_layout()
    return _save(fig, path)
