"""The answer side's cut placed at the end of a fit on the fitted detector's own scores of sources it
never trained on, for a family that trains on no store (SafeVLM): ``calibrate --answer_sources``,
inside the fit, so that a stage config ships its cut as the heads config ships its cross-fitted one.

The cut (``lit_sahs.answer_cut``) is the highest score that keeps ``answer_tpr`` of the named sources'
harmful prompts at or above it, each (source, attack) weighing the same. Wrapped prompts score lower
than plain ones, so the sources are scored inside each of ``attacks`` (templates of families the fit
trained on, never the family its report tests on): a cut placed on plain prompts alone does not hold
on wrapped traffic (docs/results.md, "The answer cut shipped in the artifact").

In a fit config::

    trainer:
      callbacks:
        - class_path: lit_sahs.live_answer_cut.LiveAnswerCut
          init_args: {answer_tpr: 0.9, sources: [future_tense, rho_overrefusal], attacks: [plain, pyrit]}
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np

from lit_sahs.answer_cut import LIVE, fit_answer_cut, shipped_direction, summary
from lit_sahs.checks import answer_tpr_arg, at_least
from lit_sahs.errors import LitSahsError
from lit_sahs.refusal_direction import RefusalDirection


def live_scores(det, sources: Sequence[str], limit: int, attacks: Sequence[str], seed: int, batch_size: int,
                device: str) -> tuple[dict, dict]:
    """The detector's scores of the sources' harmful and benign prompts in each of `attacks`, by source
    (and attack, when not plain: one attack may draw templates of several families)."""
    from lit_sahs.data.attacks import apply_attacks
    from lit_sahs.data.sources import load_source
    from lit_sahs.screen import Screener

    rows = apply_attacks([s for name in sources for s in load_source(name, limit=limit, seed=seed)], list(attacks), seed)
    if not any(r.label == 1 for r in rows):
        raise LitSahsError(f"the answer cut's sources {','.join(sources)} hold no harmful prompt: "
                           "the cut is placed on harmful ones")
    # a fitted SafeVLM scores inside its own target (its trained LoRA is there); a second copy would reset it
    scores = Screener(det.bound_target, det, batch_size=batch_size, device=device).score(
        [r.text for r in rows], [r.image for r in rows], [r.id for r in rows], progress=True).scores
    by: dict[int, dict[str, list]] = {0: {}, 1: {}}
    for r, v in zip(rows, scores):
        key = r.source if r.attack == "plain" else f"{r.source} ({r.attack})"
        by[int(r.label)].setdefault(key, []).append(v)
    nan = [s for s in by[1] if not np.isfinite(by[1][s]).all()]
    if nan:
        raise LitSahsError(f"the detector could not score every harmful prompt of {nan[0]}")
    return by[1], by[0]


def direction_of(spec: str, det, option: str = "answer_direction") -> RefusalDirection:
    """A refusal direction file, or a detector artifact directory that ships one (a safety-head detector
    calibrated with ``answer_direction: from_store``), checked against `det`'s target."""
    if not Path(spec).is_dir():
        return shipped_direction(spec, det, option=option)
    from lit_sahs.artifact import load_detector

    direction = load_detector(spec).answer_direction
    if direction is None:
        raise LitSahsError(f"{option}: the detector at {spec} ships no refusal direction: give a direction file "
                           "(python -m lit_sahs direction) or a detector calibrated with one")
    direction.fingerprint.check(det.fingerprint, option)
    return direction


class LiveAnswerCut(L.Callback):
    """Place the answer side's cut on the fitted detector's scores of `sources` (packaged names or file:PATH,
    none of them trained on), each scored inside every one of `attacks`, and ship it with the detector:
    after the best checkpoint is restored for the test report and the export (a fit with a checkpoint
    callback places it only when that checkpoint is tested: the fit command's ``output_dir``), or at the end
    of the fit when no checkpoint is kept. A source the fit trains on ends the fit before training.

    Args:
        answer_tpr: the share of the sources' harmful prompts kept at or above the cut
        sources: sources the detector never trained on (e.g. the DataModule's validation-only ones)
        attacks: attacks (as ``extract --attacks``) each source's prompts are scored inside
        limit: most prompts read from each source
        seed: the draw's seed (sources and templates)
        batch_size: prompts per scoring forward
        answer_direction: a refusal direction to ship with the cut: a file, or a detector artifact
            directory that ships one (e.g. the safety-head detector of the same target)
    """

    def __init__(self, answer_tpr: float, sources: list[str], attacks: list[str] = ["plain"],  # noqa: B006
                 limit: int = 200, seed: int = 0, batch_size: int = 8, answer_direction: Optional[str] = None):
        from lit_sahs.data.attacks import get_attack

        self.answer_tpr = answer_tpr_arg(answer_tpr, "answer_tpr")
        self.sources = [str(s).strip() for s in sources if str(s).strip()]
        if not self.sources:
            raise LitSahsError("LiveAnswerCut needs the sources its cut is placed on: set sources")
        self.attacks = [str(a).strip() for a in attacks if str(a).strip()] or ["plain"]
        for name in self.attacks:  # a typo fails before the fit
            get_attack(name)
        at_least({"limit": limit, "batch_size": batch_size}, 1)
        self.limit, self.seed, self.batch_size, self.answer_direction = int(limit), int(seed), int(batch_size), answer_direction
        self.answer: Optional[dict] = None
        self.direction: Optional[RefusalDirection] = None
        self._pending = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What would fail after training fails before it (a debugging run places no cut: nothing is checked)."""
        if trainer.fast_dev_run:
            return
        dm = trainer.datamodule
        trained = {str(r.get("source", "")) for r in dm.split_rows("train")} if dm is not None else set()
        overlap = sorted(set(self.sources) & trained)
        if overlap:
            raise LitSahsError(f"LiveAnswerCut places the cut on sources the detector never trained on; this fit trains "
                               f"on {', '.join(overlap)}: name validation-only or other sources")
        if self.answer_direction is not None:
            if not Path(self.answer_direction).exists():
                raise LitSahsError(f"answer_direction {self.answer_direction} does not exist: give a refusal direction "
                                   "file or a detector artifact directory that ships one")
            self.direction = direction_of(self.answer_direction, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return  # a debugging run: nothing worth calibrating
        ckpt = trainer.checkpoint_callback
        self._pending = True
        if not (ckpt is not None and ckpt.best_model_path):  # these weights are the ones that ship
            self._place(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending and self.answer is None:
            self._place(pl_module)  # the best checkpoint is restored: score the weights that ship
        if self.answer is not None:
            pl_module.answer, pl_module.answer_direction = self.answer, self.direction

    def _place(self, pl_module: L.LightningModule) -> None:  # the direction was loaded when the fit started
        harmful, benign = live_scores(pl_module, self.sources, self.limit, self.attacks, self.seed, self.batch_size,
                                      str(pl_module.device))
        self.answer = fit_answer_cut(harmful, self.answer_tpr, benign, method=LIVE)
        pl_module.answer, pl_module.answer_direction = self.answer, self.direction
        s = summary(self.answer, self.direction)
        print(f"answer cut: {s['answer_below']:.4g} (harmful prompts of {', '.join(self.sources)} kept above it "
              f"{s['kept']:.2f}, benign below it {s.get('answered', float('nan')):.2f})"
              + (f"; refusal direction of layer {s['direction_layer']}" if "direction_layer" in s else ""))
