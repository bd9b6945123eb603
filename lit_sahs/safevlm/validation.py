"""What one SafeVLM validation run collects, row by row, and the numbers it logs from them.

Rows stay aligned across processes (every collector is a torchmetrics ``CatMetric``-like state gathered
in the same order): the head's risk and label, the row's source, and the refusal mass where its answer
starts, with the adapter and, when stage II has a LoRA gate, without it (``selection.gated_answer_margin``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from lit_sahs.detectors.metrics import ScoreCollector, detection_metrics, set_threshold
from lit_sahs.errors import LitSahsError
from lit_sahs.safevlm.selection import answer_margin, answer_refusal, finite, gated_answer_margin, selection_margin


class ValidationRows:
    """`gated`: the run also collects each row's adapter-off refusal mass (stage II with a LoRA gate)."""

    def __init__(self, device: torch.device, refusal_ids: Sequence[int], gated: bool = False):
        self.refusal_ids, self.gated = refusal_ids, bool(gated)
        self.metrics = detection_metrics().to(device)
        self.scores = ScoreCollector().to(device)
        self.sources = CatMetric().to(device)  # gathered in the same order as the scores
        self.refusal = CatMetric(nan_strategy="disable").to(device)  # NaN rows stay aligned
        self.refusal_off = CatMetric(nan_strategy="disable").to(device)  # the same, adapter off

    def update(self, batch: dict, risk: Tensor, out, off=None) -> None:
        """One batch: its risks, the output of its forward, and (`off`) of the adapter-off forward."""
        y = batch["y"].to(risk.device)
        self.metrics.update(risk, y)
        self.scores.update(risk, y)
        src = batch.get("source")
        self.sources.update((src if src is not None else torch.zeros_like(y)).to(risk.device).double())
        self.refusal.update(answer_refusal(out.logits, batch, self.refusal_ids).to(risk.device))
        if self.gated:
            if off is None:
                raise LitSahsError("a gated validation run needs the adapter-off forward of every batch")
            self.refusal_off.update(answer_refusal(off.logits, batch, self.refusal_ids).to(risk.device))

    @property
    def scored(self) -> bool:
        return bool(self.scores.update_called)

    def scores_labels_sources(self) -> tuple[Tensor, Tensor, Tensor]:
        preds, target = self.scores.compute()
        return preds, target, self.sources.compute().to(preds.device)

    def margins(self, preds: Tensor, target: Tensor, sources: Tensor, target_fpr: float,
                gate: Optional[float]) -> dict[str, float]:
        """``val/margin`` (the head), ``val/answer_margin`` (the answers) and, with a gate and adapter-off
        rows, ``val/gated_answer_margin``, with their parts; NaN values left out. `preds`, `target`,
        `sources`: ``scores_labels_sources()``, gathered once by the caller."""
        picked = selection_margin(preds, target, sources, target_fpr)
        refusal = self.refusal.compute()
        picked.update(answer_margin(refusal, target))
        if self.refusal_off.update_called and gate is not None and math.isfinite(gate):
            picked.update(gated_answer_margin(refusal, self.refusal_off.compute(), preds, target, gate))
        return {f"val/{k}": float(v) for k, v in finite(picked).items()}

    def detection(self, threshold: float) -> dict[str, Tensor]:
        """The report columns (AUROC, TPR at FPR, ...) at `threshold`; empty when no row was scored."""
        if not self.metrics["auroc"].update_called:
            return {}
        set_threshold(self.metrics, threshold)
        return {f"val/{k}": v.float() for k, v in self.metrics.compute().items()}
