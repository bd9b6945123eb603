"""`python -m lit_sahs fit|validate|test|predict`: LightningCLI over the detector families and
DataModules, with the quickstart's extra steps: extract and locate before fitting when the config
asks for them. The Trainer's family defaults and what `fit` writes afterwards (test report with
baselines, detector artifact, MLflow artifacts) come from the engine, as for a fit from Python."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_sahs.baselines import BASELINES
from lit_sahs.engine import Engine, family_defaults
from lit_sahs.errors import LitSahsError
from lit_sahs.pipeline import Prepare, ensure_ranking, ensure_store
from lit_sahs.tracking import MLflowSettings


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
        parser.add_class_arguments(MLflowSettings, "mlflow")
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
            if getattr(data, "store", None) is None:
                raise LitSahsError("prepare: extracts a store, but this DataModule reads no store: drop the prepare "
                                   "section (SafetyDataModule reads prompts from its sources itself)")
            ensure_store(cfg.prepare, data.store)
        if getattr(data, "ranking", None):
            ensure_ranking(data.store, data.ranking, data.held_out_families, data.held_out_sources,
                           data.val_fraction, data.test_fraction, data.seed, top_k=data.top_k)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            from lit_sahs.tracking import make_logger

            mlcfg = self._cfg.mlflow
            kwargs["logger"] = make_logger(mlcfg.experiment, mlcfg.tracking_uri, run_name=self._run_name())
        return super().instantiate_trainer(**kwargs)

    def _run_name(self) -> str:
        """The MLflow run's name: the subcommand and the (last) config file, e.g. fit-quickstart."""
        configs = [c for c in (self._cfg.get("config") or []) if c]
        if not configs:
            return self.subcommand
        last = configs[-1]
        name = Path(str(getattr(last, "relative", None) or getattr(last, "absolute", None) or last)).stem
        return f"{self.subcommand}-{name}" if name else self.subcommand

    def _engine(self) -> Engine:
        if self.subcommand != "fit":
            return Engine()
        out = self._cfg.output_dir or Path("artifacts") / self._cfg.mlflow.experiment
        return Engine(output_dir=out, baselines=self._cfg.baselines)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """The engine's part of the Trainer: the family's trainer defaults where the config leaves a
        setting unset, and for `fit` the report and export callbacks."""
        for key, value in family_defaults(self.model).items():
            if config.get(key) is None:
                config[key] = value
        return super()._instantiate_trainer(config, list(callbacks) + self._engine().report_callbacks())

    def before_fit(self) -> None:
        # what Engine.fit does before trainer.fit: DDP checks, and binding the detector in this process,
        # since a spawn/fork launcher copies rank 0's weights back only into a bound detector
        prepare = getattr(self.model, "prepare_launch", None)
        if prepare is not None:
            prepare(self.trainer, self.datamodule)

    def after_fit(self) -> None:
        Engine.test_best(self.trainer, self.model, self.datamodule)


def run_lightning_cli(argv: list[str]) -> None:
    import sys

    # any LightningModule: the safety-head detectors (SafetyDetector) and SafeVLM (lit_sahs.safevlm)
    SahsCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=None if argv == sys.argv[1:] else argv, save_config_callback=LogConfigToMLflow,
            save_config_kwargs={"save_to_log_dir": False}, auto_configure_optimizers=False)
