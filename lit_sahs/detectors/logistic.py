"""LogisticDetector: L2-regularised logistic regression on the concatenated selected heads."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lit_sahs.detectors.base import SafetyDetector, check_low_fpr
from lit_sahs.errors import LitSahsError
from lit_sahs.family import register_family


@register_family()
class LogisticDetector(SafetyDetector):
    """logit = w . flatten(z) + b, with z the normalised [k, D] activations.

    Objective: mean BCE + l2 * ||w||^2, the same for both optimizers.

    - ``optimizer="lbfgs"`` (default): full batch. Training batches of an epoch are gathered
      and one LBFGS step (up to ``lbfgs_max_iter`` iterations, strong-Wolfe line search) runs
      on all of them at the epoch's last batch, before validation sees the epoch's weights.
      This is the classical probe fit: a handful of epochs converge. It holds the training
      features in memory (k*D floats a sample), which is small for a few heads; it runs in one
      process (use ``optimizer="adam"`` under DDP).
    - ``optimizer="adam"``: ordinary mini-batch training.
    """

    family = "logistic"
    trainer_defaults = {"max_epochs": 5}
    default_lr = 1e-2
    mini_batch_setting = "optimizer='adam'"

    def __init__(
        self,
        l2: float = 1e-3,
        optimizer: Literal["lbfgs", "adam"] = "lbfgs",
        lbfgs_max_iter: int = 100,
        lr: float | None = None,
        weight_decay: float = 0.0,
        target_fpr: float = 0.05,
        low_fpr_weight: float = 0.0,
        low_fpr: float = 0.05,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, target_fpr=target_fpr)
        check_low_fpr(low_fpr_weight, low_fpr)
        if optimizer not in ("lbfgs", "adam"):
            raise LitSahsError(f"unknown optimizer {optimizer!r} for the logistic detector: use 'lbfgs' or 'adam'")
        if l2 < 0:
            raise LitSahsError(f"l2 must be >= 0, got {l2}")
        self.automatic_optimization = optimizer != "lbfgs"
        self._full_batch: list[tuple[Tensor, Tensor]] = []

    @property
    def lr(self) -> float:
        if self.hparams.lr is not None:
            return float(self.hparams.lr)
        return 1.0 if self.hparams.optimizer == "lbfgs" else self.default_lr

    def build(self, k: int, head_dim: int) -> None:
        self.linear = nn.Linear(k * head_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logits(self, z: Tensor) -> Tensor:
        return self.linear(z.flatten(1)).squeeze(-1)

    def penalty(self) -> Tensor:
        return self.hparams.l2 * self.linear.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._require_bound()
        if self.hparams.optimizer == "lbfgs":
            return torch.optim.LBFGS(
                self.parameters(), lr=self.lr, max_iter=self.hparams.lbfgs_max_iter,
                line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12,
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)

    def fit_full_batch(self, x: Tensor, y: Tensor) -> Tensor:
        opt = self.optimizers()

        def closure() -> Tensor:
            opt.zero_grad()
            loss = self.training_loss(x, y)
            self.manual_backward(loss)
            return loss

        opt.step(closure=closure)
        with torch.no_grad():
            return self.training_loss(x, y)
