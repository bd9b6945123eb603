"""MLPDetector: a small MLP on the concatenated selected heads."""
from __future__ import annotations

from torch import Tensor, nn

from lit_sahs.detectors.base import SafetyDetector, check_low_fpr
from lit_sahs.errors import LitSahsError
from lit_sahs.family import register_family


@register_family()
class MLPDetector(SafetyDetector):
    """flatten(z) -> [Linear(hidden) -> GELU -> Dropout] x num_layers -> Linear(1). AdamW, mini-batch."""

    family = "mlp"
    trainer_defaults = {"max_epochs": 40}
    default_lr = 1e-3

    def __init__(
        self,
        hidden: int = 128,
        num_layers: int = 1,
        dropout: float = 0.1,
        lr: float | None = None,
        weight_decay: float = 1e-2,
        target_fpr: float = 0.05,
        low_fpr_weight: float = 0.0,
        low_fpr: float = 0.05,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, target_fpr=target_fpr)
        check_low_fpr(low_fpr_weight, low_fpr)
        if hidden < 1 or num_layers < 1:
            raise LitSahsError(f"hidden and num_layers must be >= 1, got hidden={hidden}, num_layers={num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise LitSahsError(f"dropout must lie in [0, 1), got {dropout}")

    def build(self, k: int, head_dim: int) -> None:
        layers: list[nn.Module] = []
        width = k * head_dim
        for _ in range(self.hparams.num_layers):
            layers += [nn.Linear(width, self.hparams.hidden), nn.GELU(), nn.Dropout(self.hparams.dropout)]
            width = self.hparams.hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def logits(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1)).squeeze(-1)
