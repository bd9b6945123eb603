"""SparseHeadDetector: choose the heads and fit the classifier in one convex problem (group lasso).

logit = sum_h <W_h, z_h> + b over ALL heads given, with objective

    mean BCE + group_lasso * sum_h ||W_h||_2 + l2 * ||W||^2

and one weight block W_h (head_dim values) per head. The group-lasso term enters through its
proximal operator (block soft-thresholding, W_h <- W_h * max(0, 1 - step * group_lasso / ||W_h||)),
which sets whole heads to exactly zero. Two solvers:

* ``solver="fista"`` (default): full batch. An epoch's training batches are gathered and
  ``prox_steps`` accelerated proximal-gradient (FISTA) iterations run on them, with the step
  1/L from the smooth part's Lipschitz bound (largest singular value of the standardised design,
  by power iteration); later epochs warm-start. Deterministic, and it reaches the convex
  optimum: a few hundred rows x 270 heads need hundreds of iterations, which mini-batch SGD over
  a few epochs never gives (it left every head at a small random norm on real data).
* ``solver="sgd"``: proximal SGD on mini-batches (the prox after every step), for DDP or data
  that does not fit in memory. SGD because proximal-gradient theory covers its step (Adam's
  per-coordinate rescaling would make the shrinkage and the gradient step incomparable).

Why group lasso rather than hard-concrete L0 gates: with a linear read-out the problem stays
convex (one optimum, the same heads chosen on every seed), the surviving heads are exact
zeros/non-zeros without a temperature schedule or stochastic gates, the per-head norm
||W_h|| is directly the head's importance, and ``group_lasso`` traces the usual
regularisation path from "one head" to "all heads". The ranking it gives is joint (a head
redundant with a stronger one is dropped), unlike per-head probes.

With mini-batch SGD, a useless head's gradient noise can exceed ``group_lasso`` on some steps, so
it hovers at a tiny norm instead of exactly zero (about lr x noise, ~1% of a signal head's
norm on the tests' problem). Selection therefore compares each head's norm with the largest:
``selected_heads(threshold)`` keeps heads above ``threshold`` x max norm (default
``selection_threshold=0.05``); ``threshold=0`` keeps every non-zero head.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_sahs.detectors.base import SafetyDetector
from lit_sahs.errors import LitSahsError
from lit_sahs.family import register_family
from lit_sahs.heads import HeadSet

log = logging.getLogger(__name__)


@register_family()
class SparseHeadDetector(SafetyDetector):
    family = "sparse"
    trainer_defaults = {"max_epochs": 5}  # an epoch runs prox_steps FISTA steps
    default_lr = 0.1
    mini_batch_setting = "solver='sgd'"

    def __init__(
        self,
        group_lasso: float = 0.05,
        l2: float = 0.0,
        momentum: float = 0.0,
        selection_threshold: float = 0.05,
        solver: Literal["fista", "sgd"] = "fista",
        prox_steps: int = 200,
        lr: float | None = None,
        weight_decay: float = 0.0,
        target_fpr: float = 0.05,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, target_fpr=target_fpr)
        if solver not in ("fista", "sgd"):
            raise LitSahsError(f"unknown solver {solver!r} for the sparse detector: use 'fista' or 'sgd'")
        if prox_steps < 1:
            raise LitSahsError(f"prox_steps must be >= 1, got {prox_steps}")
        self.automatic_optimization = solver == "sgd"
        if group_lasso < 0 or l2 < 0:
            raise LitSahsError(f"group_lasso and l2 must be >= 0, got {group_lasso}, {l2}")
        if not 0.0 <= selection_threshold < 1.0:
            raise LitSahsError(f"selection_threshold is relative to the largest head norm: use [0, 1), got {selection_threshold}")
        if not 0.0 <= momentum < 1.0:
            raise LitSahsError(f"momentum must lie in [0, 1), got {momentum}")

    def build(self, k: int, head_dim: int) -> None:
        self.weight = nn.Parameter(torch.zeros(k, head_dim))
        self.bias = nn.Parameter(torch.zeros(()))
        # groups: one per head, then one per extra feature (all its slots); a group of s slots is
        # penalised sqrt(s) times a head (the usual group-lasso size weighting)
        n_heads = len(self.head_set)
        gid = list(range(n_heads))
        names = [f"{l}.{h}" for l, h in self.head_set]
        for name, a, b in self.feature_spec.groups(head_dim):
            gid += [len(names)] * (b - a)
            names.append(name)
        self.group_names = names
        self.register_buffer("group_index", torch.tensor(gid, dtype=torch.long), persistent=False)
        sizes = torch.zeros(len(names)).index_add_(0, self.group_index, torch.ones(k))
        self.register_buffer("group_weight", sizes.sqrt(), persistent=False)

    def logits(self, z: Tensor) -> Tensor:
        return torch.einsum("bkd,kd->b", z, self.weight) + self.bias

    def penalty(self) -> Tensor:
        return self.hparams.l2 * self.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        self._require_bound()
        if self.hparams.solver == "fista":
            return None  # the full-batch solver updates the weights itself
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)

    def _group_norms(self, w: Tensor) -> Tensor:
        gi = self.group_index.to(w.device)
        sq = torch.zeros(len(self.group_names), dtype=w.dtype, device=w.device).index_add_(0, gi, w.pow(2).sum(1))
        return sq.sqrt()

    def _prox(self, w: Tensor, step: float) -> Tensor:
        """Block soft-thresholding: the proximal operator of step * sum_g sqrt(|g|) ||W_g|| (a group
        is a head, or an extra feature's slots)."""
        gw = self.group_weight.to(device=w.device, dtype=w.dtype)
        scale = (1 - step * gw / self._group_norms(w).clamp_min(1e-12)).clamp_min(0.0)
        return w * scale[self.group_index.to(w.device)].unsqueeze(1)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            self.weight.copy_(self._prox(self.weight, optimizer.param_groups[0]["lr"] * self.hparams.group_lasso))

    # ------------------------------------------------------------------ full-batch solver

    def fit_full_batch(self, x: Tensor, y: Tensor) -> Tensor:
        z = (x.to(self.mean.dtype) - self.mean) / self.std
        return self.fista(z, y.to(z.dtype), self.hparams.prox_steps)

    def _smooth(self, z: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
        logits = torch.einsum("bkd,kd->b", z, w) + b
        return F.binary_cross_entropy_with_logits(logits, y) + self.hparams.l2 * w.pow(2).sum()

    @torch.no_grad()
    def lipschitz(self, z: Tensor, iters: int = 30) -> float:
        """Upper bound on the smooth part's gradient Lipschitz constant: sigma_max([Z 1])^2 / (4n) + 2 l2."""
        n = z.shape[0]
        a = torch.cat([z.reshape(n, -1), torch.ones(n, 1, dtype=z.dtype, device=z.device)], dim=1)
        v = torch.ones(a.shape[1], dtype=z.dtype, device=z.device) / math.sqrt(a.shape[1])
        for _ in range(iters):
            v = a.T @ (a @ v)
            v = v / v.norm().clamp_min(1e-30)
        sigma2 = float((a @ v).norm() ** 2)
        return 1.02 * sigma2 / (4 * n) + 2 * self.hparams.l2  # 2% margin: power iteration approaches from below

    def fista(self, z: Tensor, y: Tensor, steps: int) -> Tensor:
        """`steps` FISTA iterations on standardised activations z [n, k, D] from the current weights;
        returns the objective (smooth part + group lasso) at the end."""
        step = 1.0 / self.lipschitz(z)
        gl = self.hparams.group_lasso
        w, b = self.weight.detach().clone(), self.bias.detach().clone()
        vw, vb, t = w.clone(), b.clone(), 1.0
        for _ in range(steps):
            with torch.enable_grad():
                pw, pb = vw.requires_grad_(True), vb.requires_grad_(True)
                gw, gb = torch.autograd.grad(self._smooth(z, y, pw, pb), (pw, pb))
            w_new = self._prox(vw.detach() - step * gw, step * gl)
            b_new = vb.detach() - step * gb
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            vw = w_new + ((t - 1) / t_new) * (w_new - w)
            vb = b_new + ((t - 1) / t_new) * (b_new - b)
            w, b, t = w_new, b_new, t_new
        with torch.no_grad():
            self.weight.copy_(w)
            self.bias.copy_(b)
            return self._smooth(z, y, w, b) + gl * (self.group_weight.to(w) * self._group_norms(w)).sum()

    # ------------------------------------------------------------------ head report

    def group_norms(self) -> Tensor:
        """||W_g|| / sqrt(|g|) for every group: the heads in HeadSet order, then the extra features
        (size-normalised, so a many-slot residual and a head compare; 0 = dropped)."""
        self._require_bound()
        w = self.weight.detach()
        return (self._group_norms(w) / self.group_weight.to(w)).cpu()

    def head_norms(self) -> Tensor:
        """||W_h|| for every head of the HeadSet, in its order (0 = head dropped)."""
        return self.group_norms()[:len(self.head_set)]

    def relative_norms(self) -> Tensor:
        """Group norm / largest group norm, heads then features (all zeros if every group was dropped)."""
        norms = self.group_norms()
        top = norms.max()
        return norms / top if top > 0 else torch.zeros_like(norms)

    def extra_artifacts(self) -> dict[str, Any]:
        return {"heads.json": self.head_report()}

    def head_report(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per head: layer, head, norm, relative (norm / largest norm), selected; strongest first."""
        thr = self.hparams.selection_threshold if threshold is None else float(threshold)
        heads = list(self.head_set) + [(None, None)] * (len(self.group_names) - len(self.head_set))
        rows = [
            {"name": name, "layer": l, "head": h, "norm": float(n), "relative": float(r), "selected": float(r) > thr}
            for name, (l, h), n, r in zip(self.group_names, heads, self.group_norms(), self.relative_norms())
        ]
        return sorted(rows, key=lambda r: -r["norm"])

    def selected_features(self, threshold: float | None = None) -> list[str]:
        """Extra features (see lit_sahs.data.extra_features) whose relative norm exceeds `threshold`."""
        thr = self.hparams.selection_threshold if threshold is None else float(threshold)
        k = len(self.head_set)
        return [n for n, r in zip(self.group_names[k:], self.relative_norms()[k:]) if float(r) > thr]

    def selected_heads(self, threshold: float | None = None) -> HeadSet:
        """Heads whose relative norm (norm / largest norm) exceeds `threshold` (default: the
        selection_threshold hyper-parameter, 0.05), in HeadSet order; threshold=0 keeps every
        head the proximal step left non-zero. Raises if none survives."""
        thr = self.hparams.selection_threshold if threshold is None else float(threshold)
        keep = [hd for hd, r in zip(self.head_set, self.relative_norms()) if float(r) > thr]
        if not keep:
            kept = f" (extra features kept: {self.selected_features(thr)})" if self.feature_spec else ""
            raise LitSahsError(
                "every head's weights are zero: lower group_lasso (the penalty removed all heads)"
                if thr <= 0 or float(self.group_norms().max()) == 0 else
                f"no head above relative norm {thr}{kept}: lower the threshold"
            )
        return HeadSet(keep)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        n = int((self.relative_norms() > self.hparams.selection_threshold).sum())
        self.log("val/n_heads", float(n))

    def on_fit_end(self) -> None:
        report = self.head_report()
        kept = [r for r in report if r["selected"]]
        log.info("sparse detector kept %d of %d groups: %s", len(kept), len(report),
                 ", ".join(f"{r['name']}={r['norm']:.3f}" for r in kept))
        if self.logger is not None:
            self.logger.log_metrics(
                {f"sparse/head_norm/{r['name'].replace(':', '_')}": r["norm"] for r in report},
                step=self.global_step,
            )
