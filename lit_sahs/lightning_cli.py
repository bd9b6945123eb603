"""`python -m lit_sahs fit|validate|test|predict`: LightningCLI over the detector families and
DataModules, with the quickstart's extra steps: extract and locate before fitting when the config
asks for them. LightningCLI parses the config; the Trainer and the fit itself are the engine's
(`Engine.trainer`, `Engine.fit`: family defaults, test report with baselines, detector artifact,
MLflow artifacts), so a fit from the command line and one from Python take one route."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_sahs.cli.fit import PROG, add_sahs_arguments
from lit_sahs.engine import Engine
from lit_sahs.errors import LitSahsError
from lit_sahs.pipeline import ensure_ranking, ensure_store
from lit_sahs.redact import redact


class LogConfigToMLflow(SaveConfigCallback):
    """The resolved config goes into the run's artifacts (MLflow with a database backend has no
    local log_dir for the default callback to write into)."""

    def save_config(self, trainer, pl_module, stage) -> None:
        logger = trainer.logger
        if getattr(logger, "run_id", None) is not None:
            text = self.parser.dump(self.config, skip_none=False)
            uri = getattr(self.config.get("mlflow"), "tracking_uri", None)  # its password stays out of the run
            logger.experiment.log_text(logger.run_id, redact(text, uri), "config.yaml")


class SahsCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        add_sahs_arguments(parser)

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
            ensure_ranking(data.store, data.ranking, data.held_out.families, data.held_out.sources,
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

    @property
    def engine(self) -> Engine:
        """The one engine of this run: it builds the Trainer and, for `fit`, runs `Engine.fit`
        (test report, export, checkpoints under output_dir) as a fit from Python does."""
        if getattr(self, "_sahs_engine", None) is None:
            if self.subcommand == "fit":
                out = self._cfg.output_dir or Path("artifacts") / self._cfg.mlflow.experiment
                self._sahs_engine = Engine(output_dir=out, baselines=self._cfg.baselines, quiet=False)
            else:
                self._sahs_engine = Engine(quiet=False)
        return self._sahs_engine

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """The Trainer comes from the engine (its defaults, the family's, then the config's settings);
        LightningCLI's part is the callbacks the config names and the one that saves the config."""
        config = dict(config)
        config["callbacks"] = list(config.get("callbacks") or []) + list(callbacks)
        if self.save_config_callback and not config.get("fast_dev_run", False):
            config["callbacks"].append(self.save_config_callback(
                self._parser(self.subcommand), self.config.get(str(self.subcommand), self.config),
                **self.save_config_kwargs))
        return self.engine.trainer(self.model, **config)

    def fit(self, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: Optional[str] = None,
            **_: object) -> None:
        """`fit` is `Engine.fit` on the Trainer the engine built above."""
        self.engine.fit(model, datamodule, ckpt_path=ckpt_path, trainer=self.trainer)


def run_lightning_cli(argv: list[str]) -> None:
    import sys

    # LightningCLI reads sys.argv (handing it `args` as well draws a warning); a launcher that starts
    # more processes by re-running the command line sees the same arguments
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        # any LightningModule: the safety-head detectors (SafetyDetector) and SafeVLM (lit_sahs.safevlm)
        SahsCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                save_config_callback=LogConfigToMLflow, save_config_kwargs={"save_to_log_dir": False},
                auto_configure_optimizers=False, parser_kwargs={"prog": PROG})
    finally:
        sys.argv = saved
