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
        group_lasso: float = 0.02,
        l2: float = 0.0,
        momentum: float = 0.0,
        selection_threshold: float = 1e-3,
        lr: float | None = None,
        weight_decay: float = 0.0,
        target_fpr: float = 0.05,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, target_fpr=target_fpr)
        if group_lasso < 0 or l2 < 0:
            raise LitSahsError(f"group_lasso and l2 must be >= 0, got {group_lasso}, {l2}")
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

    def head_report(self) -> list[dict[str, Any]]:
        """Per head: layer, head, norm, relative norm (norm / max norm), selected; strongest first."""
        norms = self.head_norms()
        top = float(norms.max()) if norms.numel() else 0.0
        thr = self.hparams.selection_threshold
        rows = [
            {"layer": l, "head": h, "norm": float(n), "relative": float(n) / top if top > 0 else 0.0,
             "selected": float(n) > thr}
            for (l, h), n in zip(self.head_set, norms)
        ]
        return sorted(rows, key=lambda r: -r["norm"])

    def selected_heads(self, threshold: float | None = None) -> HeadSet:
        """Heads whose weight-block norm exceeds `threshold` (default: the selection_threshold
        hyper-parameter), in HeadSet order. Raises if none survives."""
        thr = self.hparams.selection_threshold if threshold is None else float(threshold)
        norms = self.head_norms()
        keep = [hd for hd, n in zip(self.head_set, norms) if float(n) > thr]
        if not keep:
            raise LitSahsError(
                f"no head has a weight norm above {thr}: lower the threshold or group_lasso "
                f"(largest norm {float(norms.max()):.3g})"
            )
        return HeadSet(keep)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        n = int((self.head_norms() > self.hparams.selection_threshold).sum())
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
