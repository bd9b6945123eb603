"""The engine: the one place that builds a Lightning Trainer and fits a detector.

Every fit goes through `Engine` — the CLI's `fit` (LightningCLI hands its trainer settings and
callbacks here), the zero-shot and source folds of `evaluate`, the folds and refit of `tune`,
extraction's predict loop — so a fit from Python writes what the CLI writes:

    result = Engine(output_dir="artifacts/mine", max_epochs=15).fit(LogisticDetector(), datamodule)
    result.detector, result.reports["heads"]["overall"]["auroc"], result.paths

Trainer settings come, in rising priority, from `BASE_TRAINER` (plus `QUIET_TRAINER` for a quiet
engine: folds and trials nobody watches), the model family's `trainer_defaults` (a LightningModule
class attribute, e.g. full-batch detectors need few epochs) and the caller's keyword arguments.
What happens after training is Lightning callbacks (`lit_sahs.reporting`): with an `output_dir`
the engine tests the best checkpoint on the test split, and `TestReport` writes report.md /
report.json / benign_fpr.json / roc.png, `ExportDetector` the safetensors artifact, and both attach
their files to the MLflow run when the logger is one. Checkpoints without a `dirpath` of their own
go to `<output_dir>/checkpoints`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from lit_sahs.errors import LitSahsError
from lit_sahs.family import ModelFamily

# what every fit starts from; a family's trainer_defaults and the caller override it
BASE_TRAINER: dict[str, Any] = {"accelerator": "auto", "devices": 1}
# a quiet engine's fits (evaluation folds, tune trials, extraction): no logger, checkpoint, bar or summary;
# a fit a person runs (the CLI's `fit`, quiet=False) keeps Lightning's own settings for these
QUIET_TRAINER: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                                 "enable_model_summary": False, "num_sanity_val_steps": 0}


def _on_stderr(init):
    with contextlib.redirect_stdout(sys.stderr):  # Lightning's bars open file=sys.stdout
        return init()


class StderrProgressBar(TQDMProgressBar):
    """tqdm's bar on stderr: stdout carries the commands' JSON summaries, which scripts read."""

    def init_sanity_tqdm(self):
        return _on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self):
        return _on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self):
        return _on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self):
        return _on_stderr(super().init_test_tqdm)

    def init_predict_tqdm(self):
        return _on_stderr(super().init_predict_tqdm)


def log_progress_bar(kw: dict[str, Any]) -> list[L.Callback]:
    """A bar that a log file shows while the run goes on (a background extraction's log): Lightning's rich
    bar draws nothing until the end when its output is not a terminal; tqdm's flushes every update."""
    if not kw.get("enable_progress_bar", True) or sys.stdout.isatty():
        return []
    if any(isinstance(c, ProgressBar) for c in kw.get("callbacks") or []):
        return []
    return [StderrProgressBar(refresh_rate=10)]


def family_defaults(model: L.LightningModule | type) -> dict[str, Any]:
    """The Trainer settings a model family declares (`trainer_defaults` class attribute)."""
    return dict(getattr(model, "trainer_defaults", {}) or {})


@dataclass
class FitResult:
    detector: L.LightningModule
    trainer: L.Trainer
    val_metrics: dict[str, float] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)  # method -> compute_report(...) on the test split
    paths: dict[str, Path] = field(default_factory=dict)     # what the report callbacks wrote


class Engine:
    """Builds Trainers and runs fit (+ test report and export when `output_dir` is given).

    validate_once: validate (and calibrate the threshold) only after the last epoch — what
    evaluation folds and tune trials want, since per-epoch validation costs more than training
    these small detectors; the CLI's `fit` validates every epoch for its checkpoint callback.
    quiet: `QUIET_TRAINER` settings and Lightning's warnings silenced during the fit (off for a fit
    a person runs, such as the CLI's `fit`).
    """

    def __init__(self, output_dir: Optional[str | Path] = None, baselines: Optional[Sequence[str]] = None,
                 validate_once: bool = False, quiet: bool = True, callbacks: Sequence[L.Callback] = (),
                 **trainer_kwargs: Any):
        self.output_dir = Path(output_dir) if output_dir else None
        self.baselines = baselines
        self.validate_once = validate_once
        self.quiet = quiet
        self.callbacks = list(callbacks)
        self.trainer_kwargs = trainer_kwargs

    # ------------------------------------------------------------------ trainers

    def trainer_settings(self, model: L.LightningModule | type | None = None, **overrides: Any) -> dict[str, Any]:
        # None means "not set here": it must not override the family's default (max_epochs=None
        # would otherwise fall through to Lightning's 1000 epochs)
        given = {k: v for k, v in {**self.trainer_kwargs, **overrides}.items() if v is not None}
        kw = {**BASE_TRAINER, **(QUIET_TRAINER if self.quiet else {}),
              **(family_defaults(model) if model is not None else {}), **given}
        if self.validate_once and kw.get("max_epochs"):
            kw["check_val_every_n_epoch"] = int(kw["max_epochs"])
        return kw

    def report_callbacks(self) -> list[L.Callback]:
        """The callbacks that write the test report and the artifact into output_dir."""
        if self.output_dir is None:
            return []
        from lit_sahs.outputs import check_outputs
        from lit_sahs.reporting import ExportDetector, TestReport

        check_outputs(dirs={"output_dir": self.output_dir})  # before training, not after it

        return [TestReport(self.output_dir, baselines=self.baselines), ExportDetector(self.output_dir)]

    def trainer(self, model: L.LightningModule | type | None = None, callbacks: Sequence[L.Callback] = (),
                **overrides: Any) -> L.Trainer:
        kw = self.trainer_settings(model, **overrides)
        kw["callbacks"] = list(kw.get("callbacks") or []) + self.callbacks + list(callbacks) + self.report_callbacks()
        kw["callbacks"] += log_progress_bar(kw)
        trainer = L.Trainer(**kw)
        if self.output_dir is not None:  # not Lightning's <logger dir>/<version>/checkpoints in the working directory
            for ckpt in trainer.checkpoint_callbacks:
                if getattr(ckpt, "dirpath", "") is None:
                    ckpt.dirpath = str(self.output_dir / "checkpoints")
        return trainer

    # ------------------------------------------------------------------ fit

    def fit(self, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: Optional[str] = None,
            trainer: Optional[L.Trainer] = None, **overrides: Any) -> FitResult:
        """Fit `model` on the DataModule's train split (validating on val); with an output_dir, then
        test the best checkpoint and write the report and the artifact. `trainer`: one this engine
        built already (`self.trainer(model, ...)`), as LightningCLI holds it; else it is built here."""
        trainer = trainer if trainer is not None else self.trainer(model, **overrides)
        if isinstance(model, ModelFamily):  # DDP checks before processes start
            model.prepare_launch(trainer, datamodule)
        with warnings.catch_warnings():
            if self.quiet:
                warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        result = FitResult(model, trainer, val_metrics=val)
        if self.output_dir is not None:
            self.test_best(trainer, model, datamodule, result)
        return result

    @staticmethod
    def test_best(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule,
                  result: Optional[FitResult] = None) -> FitResult:
        """Test the best checkpoint (the last weights without a checkpoint callback); the report
        callbacks run at the end of this test and leave their results on the FitResult."""
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        result = result or FitResult(model, trainer)
        for cb in trainer.callbacks:
            collect = getattr(cb, "collect", None)
            if collect is not None:
                collect(result)
        return result


def fit_detector(detector: L.LightningModule, datamodule: L.LightningDataModule, max_epochs: Optional[int] = None,
                 **trainer_kwargs: Any) -> L.LightningModule:
    """Fit quietly (no logger, no checkpoint, one validation after the last epoch) and return the detector."""
    return Engine(validate_once=True, max_epochs=max_epochs, **trainer_kwargs).fit(detector, datamodule).detector


def launched_processes() -> int:
    """How many processes this one runs beside: torch.distributed's world size once a process group
    exists (e.g. in every rank after a DDP fit), else WORLD_SIZE as torchrun sets it; 1 otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def require_one_process(stage: str) -> None:
    """Stages that run in one process by design (locate's batched probes, the evaluation and tune
    folds) refuse to run as one of several: each process would repeat all the work and race on
    the same outputs."""
    n = launched_processes()
    if n > 1:
        raise LitSahsError(f"{stage} runs in one process, but this process is one of {n} (torchrun, or a script "
                           "that ran a DDP fit): run it on its own; only extraction and mini-batch fits run "
                           "distributed (--trainer.strategy ddp)")
