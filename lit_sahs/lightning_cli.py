"""`python -m lit_sahs fit|validate|test|predict`: LightningCLI over the detector families and
DataModules, with the quickstart's extra steps: extract and locate before fitting when the config
asks for them, and after fitting a test report with baselines, the exported detector artifact
and MLflow artifacts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_sahs.baselines import BASELINES
from lit_sahs.detectors import SafetyDetector
from lit_sahs.pipeline import Prepare, ensure_ranking, ensure_store


class LogConfigToMLflow(SaveConfigCallback):
    """The resolved config goes into the run's artifacts (MLflow with a database backend has no
    local log_dir for the default callback to write into)."""

    def save_config(self, trainer, pl_module, stage) -> None:
        logger = trainer.logger
        if getattr(logger, "run_id", None) is not None:
            text = self.parser.dump(self.config, skip_none=False)
            logger.experiment.log_text(logger.run_id, text, "config.yaml")


class SahsCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(Prepare, "prepare")
        parser.add_argument("--mlflow.experiment", default="lit_sahs", help="MLflow experiment name")
        parser.add_argument("--mlflow.tracking_uri", type=Optional[str], default=None,
                            help="MLflow tracking URI (default: SQLite in mlruns/)")
        parser.add_argument("--output_dir", type=Optional[str], default=None,
                            help="where fit writes the detector artifact and the report (default artifacts/<experiment>)")
        parser.add_argument("--baselines", type=list[str], default=list(BASELINES))

    @property
    def _cfg(self):
        return self.config[self.subcommand]

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        cfg = self._cfg
        data = cfg.data.init_args if "init_args" in cfg.data else cfg.data
        if cfg.prepare.target:
            ensure_store(cfg.prepare, data.store)
        if getattr(data, "ranking", None):
            ensure_ranking(data.store, data.ranking, data.held_out_families, data.held_out_sources,
                           data.val_fraction, data.test_fraction, data.seed, top_k=data.top_k)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            from lit_sahs.tracking import make_logger

            mlcfg = self._cfg.mlflow
            kwargs["logger"] = make_logger(mlcfg.experiment, mlcfg.tracking_uri, run_name=self.subcommand)
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        from lit_sahs import evaluate as ev
        from lit_sahs.detectors import save_detector
        from lit_sahs.plots import roc_curves
        from lit_sahs.tracking import log_artifacts

        trainer, model, dm = self.trainer, self.model, self.datamodule
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)  # loads the best weights into model
        out = Path(self._cfg.output_dir or Path("artifacts") / self._cfg.mlflow.experiment)
        reports, scores, labels, thresholds = ev.split_reports(model, dm, "test", self._cfg.baselines)
        table = ev.format_table(reports)
        test_rows = dm.split_rows("test")
        benign = {m: ev.benign_flags_by_source(sc, test_rows, thresholds[m]) for m, sc in scores.items()}
        benign_table = ev.format_benign_table(benign, thresholds)
        detector_dir = save_detector(model, out / "detector", overwrite=True)
        ev.atomic_write_text(out / "report.json", json.dumps(reports, indent=1, default=float) + "\n")
        ev.atomic_write_text(out / "benign_fpr.json", json.dumps(benign, indent=1) + "\n")
        ev.atomic_write_text(out / "report.md", table + "\n\n" + benign_table + "\n")
        roc = roc_curves(scores, labels, out / "roc.png",
                         title=f"test split ({', '.join(dm.held_out_families) or 'random'} held out)")
        extra = [detector_dir, out / "report.json", out / "benign_fpr.json", out / "report.md", roc]
        ranking = getattr(dm, "ranking_path", None) or self._get(self.config, "data.init_args.ranking", default=None)
        if ranking and Path(ranking).exists():
            extra += [Path(ranking), Path(ranking).with_name("heads.png")]
        log_artifacts(trainer.logger, extra)
        if hasattr(model, "head_report"):
            ev.atomic_write_text(out / "heads.json", json.dumps(model.head_report(), indent=1) + "\n")
            log_artifacts(trainer.logger, [out / "heads.json"])
        if trainer.logger is not None and hasattr(trainer.logger, "log_metrics"):
            flat = {f"report/{m}/{g}/{k}": float(v) for m, rep in reports.items() for g, d in rep.items()
                    for k, v in d.items() if isinstance(v, (int, float)) and v == v}
            trainer.logger.log_metrics({k.replace(" ", "_"): v for k, v in flat.items()})
        held = ", ".join(dm.held_out_families) or "none"
        print(f"\nTest split (held-out families: {held}), {len(model.head_set)} heads; "
              f"heads = {type(model).__name__}, baselines trained on the same rows, every threshold "
              f"calibrated on validation benign prompts:\n")
        print(table)
        print("\n" + benign_table)
        print(f"\ndetector: {detector_dir}\nreport:   {out / 'report.md'}, ROC curves {roc}")


def run_lightning_cli(argv: list[str]) -> None:
    import sys

    SahsCLI(SafetyDetector, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=None if argv == sys.argv[1:] else argv, save_config_callback=LogConfigToMLflow,
            save_config_kwargs={"save_to_log_dir": False}, auto_configure_optimizers=False)
