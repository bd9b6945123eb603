"""SparseHeadDetector: choose the heads and fit the classifier in one convex problem (group lasso).

logit = sum_h <W_h, z_h> + b over ALL heads given, with objective

    mean BCE + group_lasso * sum_h ||W_h||_2 + l2 * ||W||^2

and one weight block W_h (head_dim values) per head. The group-lasso term is applied as its
proximal operator after every optimizer step (block soft-thresholding,
W_h <- W_h * max(0, 1 - lr * group_lasso / ||W_h||)), which sets whole heads to exactly zero;
the smooth part is minimised by SGD, the optimizer whose step proximal gradient theory covers
(Adam's per-coordinate rescaling would make the shrinkage and the gradient step incomparable).

Why group lasso rather than hard-concrete L0 gates: with a linear read-out the problem stays
convex (one optimum, the same heads chosen on every seed), the surviving heads are exact
zeros/non-zeros without a temperature schedule or stochastic gates, the per-head norm
||W_h|| is directly the head's importance, and ``group_lasso`` traces the usual
regularisation path from "one head" to "all heads". The ranking it gives is joint (a head
redundant with a stronger one is dropped), unlike per-head probes.

With mini-batches, a useless head's gradient noise can exceed ``group_lasso`` on some steps, so
it hovers at a tiny norm instead of exactly zero (about lr x noise, ~1% of a signal head's
norm on the tests' problem). Selection therefore compares each head's norm with the largest:
``selected_heads(threshold)`` keeps heads above ``threshold`` x max norm (default
``selection_threshold=0.05``); ``threshold=0`` keeps every non-zero head.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lit_sahs.detectors.base import SafetyDetector
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet

log = logging.getLogger(__name__)


class SparseHeadDetector(SafetyDetector):
    family = "sparse"
    default_lr = 0.1

    def __init__(
        self,
        group_lasso: float = 0.05,
        l2: float = 0.0,
        momentum: float = 0.0,
        selection_threshold: float = 0.05,
        lr: float | None = None,
        weight_decay: float = 0.0,
        target_fpr: float = 0.05,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, target_fpr=target_fpr)
        if group_lasso < 0 or l2 < 0:
            raise LitSahsError(f"group_lasso and l2 must be >= 0, got {group_lasso}, {l2}")
        if not 0.0 <= selection_threshold < 1.0:
            raise LitSahsError(f"selection_threshold is relative to the largest head norm: use [0, 1), got {selection_threshold}")
        if not 0.0 <= momentum < 1.0:
            raise LitSahsError(f"momentum must lie in [0, 1), got {momentum}")

    def build(self, k: int, head_dim: int) -> None:
        self.weight = nn.Parameter(torch.zeros(k, head_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def logits(self, z: Tensor) -> Tensor:
        return torch.einsum("bkd,kd->b", z, self.weight) + self.bias

    def penalty(self) -> Tensor:
        return self.hparams.l2 * self.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._require_bound()
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        step = optimizer.param_groups[0]["lr"] * self.hparams.group_lasso
        with torch.no_grad():
            norms = self.weight.norm(dim=1, keepdim=True)
            self.weight.mul_((1 - step / norms.clamp_min(1e-12)).clamp_min(0.0))

    # ------------------------------------------------------------------ head report

    def head_norms(self) -> Tensor:
        """||W_h|| for every head of the HeadSet, in its order (0 = head dropped)."""
        self._require_bound()
        return self.weight.detach().norm(dim=1).cpu()

    def relative_norms(self) -> Tensor:
        """||W_h|| / max_h ||W_h|| (all zeros if every head was dropped)."""
        norms = self.head_norms()
        top = norms.max()
        return norms / top if top > 0 else torch.zeros_like(norms)

    def head_report(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per head: layer, head, norm, relative (norm / largest norm), selected; strongest first."""
        thr = self.hparams.selection_threshold if threshold is None else float(threshold)
        rows = [
            {"layer": l, "head": h, "norm": float(n), "relative": float(r), "selected": float(r) > thr}
            for (l, h), n, r in zip(self.head_set, self.head_norms(), self.relative_norms())
        ]
        return sorted(rows, key=lambda r: -r["norm"])

    def selected_heads(self, threshold: float | None = None) -> HeadSet:
        """Heads whose relative norm (norm / largest norm) exceeds `threshold` (default: the
        selection_threshold hyper-parameter, 0.05), in HeadSet order; threshold=0 keeps every
        head the proximal step left non-zero. Raises if none survives."""
        thr = self.hparams.selection_threshold if threshold is None else float(threshold)
        keep = [hd for hd, r in zip(self.head_set, self.relative_norms()) if float(r) > thr]
        if not keep:
            raise LitSahsError(
                "every head's weights are zero: lower group_lasso (the penalty removed all heads)"
                if thr <= 0 or float(self.head_norms().max()) == 0 else
                f"no head above relative norm {thr}: lower the threshold"
            )
        return HeadSet(keep)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        n = int((self.relative_norms() > self.hparams.selection_threshold).sum())
        self.log("val/n_heads", float(n))

    def on_fit_end(self) -> None:
        report = self.head_report()
        kept = [r for r in report if r["selected"]]
        log.info("sparse detector kept %d of %d heads: %s", len(kept), len(report),
                 ", ".join(f"{r['layer']}.{r['head']}={r['norm']:.3f}" for r in kept))
        if self.logger is not None:
            self.logger.log_metrics(
                {f"sparse/head_norm/{r['layer']}.{r['head']}": r["norm"] for r in report},
                step=self.global_step,
            )
