"""What a fit writes after training, as Lightning callbacks (the engine and the CLI add them alike).

TestReport      at the end of the test loop: the detector and the baselines on the test split
                (per attack family, thresholds calibrated on validation benign prompts), the benign
                false-positive rate per source, ROC curves -> report.md, report.json,
                benign_fpr.json, roc.png; with a calibrated judge band (``lit_sahs.judge_cut``) and a
                store that holds the judge, the two-stage rule's rates -> judge_band.json;
                printed, logged to the MLflow run.
ExportDetector  at the end of the test loop: the detector artifact (safetensors + JSON) and, for
                head-selecting families, heads.json; logged to the MLflow run with the detector's
                MLflow pyfunc model (runs:/<id>/model, ``lit_sahs.mlflow_model``), whose URI it prints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L

from lit_sahs.io import atomic_write_text


def _log_files(trainer: L.Trainer, paths: Sequence[Path]) -> None:
    from lit_sahs.tracking import log_artifacts

    log_artifacts(trainer.logger, [p for p in paths if p is not None])


def _log_model(trainer: L.Trainer, detector, detector_dir: Path) -> Optional[str]:
    """The detector as an MLflow pyfunc model in the fit's run (an MLflow logger only); its URI."""
    run_id = getattr(trainer.logger, "run_id", None)
    if run_id is None or not trainer.is_global_zero:
        return None
    from lit_sahs.mlflow_model import log_pyfunc_model

    return log_pyfunc_model(trainer.logger.experiment, run_id, detector, detector_dir)


class TestReport(L.Callback):
    """Writes the test report into `output_dir` each time the test loop ends."""

    def __init__(self, output_dir: str | Path, baselines: Optional[Sequence[str]] = None, verbose: bool = True,
                 ranking: Optional[str | Path] = None):
        from lit_sahs.baselines import BASELINES

        self.output_dir = Path(output_dir)
        self.baselines = list(BASELINES if baselines is None else baselines)
        self.verbose = verbose
        self.ranking = ranking
        self.reports: dict[str, dict] = {}
        self.paths: dict[str, Path] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_sahs import evaluate as ev
        from lit_sahs.plots import roc_curves

        dm, out = trainer.datamodule, self.output_dir
        reports, scores, labels, thresholds = ev.split_reports(pl_module, dm, "test", self.baselines)
        table = ev.format_table(reports)
        test_rows = dm.split_rows("test")
        benign = {m: ev.benign_flags_by_source(sc, test_rows, thresholds[m]) for m, sc in scores.items()}
        benign_table = ev.format_benign_table(benign, thresholds)
        held = dm.holdout.label
        self.paths = {
            "report.json": atomic_write_text(out / "report.json", json.dumps(reports, indent=1, default=float) + "\n"),
            "benign_fpr.json": atomic_write_text(out / "benign_fpr.json", json.dumps(benign, indent=1) + "\n"),
            "report.md": atomic_write_text(out / "report.md", table + "\n\n" + benign_table + "\n"),
            "roc.png": roc_curves(scores, labels, out / "roc.png", title=f"test split ({held} held out)"),
        }
        two_stage = self._two_stage(pl_module, dm, scores, test_rows)
        if two_stage:  # the detector's calibrated second stage, on the same test rows
            self.paths["judge_band.json"] = atomic_write_text(out / "judge_band.json",
                                                              json.dumps(two_stage, indent=1) + "\n")
            self.paths["report.md"] = atomic_write_text(out / "report.md", table + "\n\n" + benign_table + "\n\n"
                                                        + self._two_stage_line(two_stage) + "\n")
        self.reports = reports
        ranking = self.ranking or getattr(dm, "ranking_path", None)
        extra = [Path(ranking), Path(ranking).with_name("heads.png")] if ranking and Path(ranking).exists() else []
        _log_files(trainer, list(self.paths.values()) + extra)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_metrics"):
            flat = {f"report/{m}/{g}/{k}".replace(" ", "_"): float(v) for m, rep in reports.items()
                    for g, d in rep.items() for k, v in d.items() if isinstance(v, (int, float)) and v == v}
            logger.log_metrics(flat)
        if self.verbose:
            what = pl_module.report_label()
            cal = pl_module.calibration
            how = ("the detector's threshold cross-fitted over the training sources, the baselines' calibrated"
                   if cal else "every threshold calibrated")
            print(f"\nTest split (held out: {held}), {what}, baselines trained on the same rows, {how} "
                  f"on validation benign prompts:\n")
            print(table)
            print("\n" + benign_table)
            if two_stage:
                print("\n" + self._two_stage_line(two_stage))
            print(f"\nreport:   {self.paths['report.md']}, ROC curves {self.paths['roc.png']}")

    @staticmethod
    def _two_stage(pl_module, dm, scores: dict, rows: list) -> Optional[dict]:
        """The detector's calibrated judge band on the test split, when its store holds the judge (a live
        DataModule has no store: the judge's answers would need a second prefill per test prompt)."""
        from lit_sahs.judge_cut import split_two_stage

        store = getattr(dm, "store", None)
        if not pl_module.judge or store is None:
            return None
        return split_two_stage(pl_module.judge, scores[pl_module.report_name], rows, store)

    @staticmethod
    def _two_stage_line(t: dict) -> str:
        return (f"With the judge deciding scores in [{t['band'][0]:g}, {t['band'][1]:g}] (cut {t['cut']:.2f} log-odds, "
                f"{t['judged']:.0%} of test rows judged): benign FPR {t['benign_fpr']:.3f} (detector alone "
                f"{t['benign_fpr_detector']:.3f}; promised {t['promised_fpr']:.3f}), harmful TPR {t['harmful_tpr']:.3f} "
                f"(detector alone {t['harmful_tpr_detector']:.3f}).")

    def collect(self, result: Any) -> None:
        result.reports = self.reports
        result.paths.update(self.paths)


class ExportDetector(L.Callback):
    """Saves the tested detector as `output_dir`/detector (safetensors + JSON, replaced atomically)."""

    def __init__(self, output_dir: str | Path, verbose: bool = True):
        self.output_dir = Path(output_dir)
        self.verbose = verbose
        self.paths: dict[str, Path] = {}
        self.model_uri: Optional[str] = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_sahs.artifact import save_detector

        self.paths = {"detector": save_detector(pl_module, self.output_dir / "detector", overwrite=True)}
        for name, doc in pl_module.extra_artifacts().items():
            self.paths[name] = atomic_write_text(self.output_dir / name, json.dumps(doc, indent=1) + "\n")
        _log_files(trainer, list(self.paths.values()))
        self.model_uri = _log_model(trainer, pl_module, self.paths["detector"])
        if self.verbose:
            print(f"detector: {self.paths['detector']}")
            if self.model_uri:
                run_id = trainer.logger.run_id
                print(f"MLflow run: {run_id}\nmodel:    {self.model_uri} (detector runs:/{run_id}/detector; register it "
                      f"with: python -m lit_sahs register --detector runs:/{run_id}/detector --name NAME)")

    def collect(self, result: Any) -> None:
        result.paths.update(self.paths)
