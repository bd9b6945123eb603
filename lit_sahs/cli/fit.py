"""The options `fit`, `validate`, `test` and `predict` add to LightningCLI's, and their short help.

LightningCLI's own `--help` lists every Trainer argument (hundreds of lines) and needs Lightning
loaded; `python -m lit_sahs fit --help` prints this page instead: the detector families, the
sections of a config, the options lit_sahs adds (generated from the same declarations
`add_sahs_arguments` gives LightningCLI) and where the rest is (`--help_all`, `--print_config`,
`--model.help CLASS`)."""
from __future__ import annotations

from typing import Optional

from jsonargparse import ArgumentParser

from lit_sahs.baselines import BASELINES
from lit_sahs.pipeline import Prepare
from lit_sahs.tracking import MLflowSettings

PROG = "python -m lit_sahs"
SUMMARY = {
    "fit": "Train a detector: a config names the detector family (model), the DataModule (data) and the "
           "Trainer settings; with a prepare section the store is extracted and the heads located first. "
           "Writes the test report, the detector artifact and checkpoints to --output_dir, tracked in MLflow.",
    "validate": "Validate a detector checkpoint (--ckpt_path) on a DataModule's validation split.",
    "test": "Test a detector checkpoint (--ckpt_path) on a DataModule's test split.",
    "predict": "Score a DataModule's prompts with a detector checkpoint (--ckpt_path).",
}


def families() -> dict[str, str]:
    """Detector family name -> class path (``lit_sahs.family.family_paths``: nothing is imported)."""
    from lit_sahs.family import family_paths

    return family_paths()


def add_sahs_arguments(parser: ArgumentParser) -> None:
    """What lit_sahs adds to a LightningCLI config: prepare (extract and locate first), mlflow,
    output_dir and baselines."""
    parser.add_class_arguments(Prepare, "prepare")
    parser.add_class_arguments(MLflowSettings, "mlflow")
    parser.add_argument("--output_dir", type=Optional[str], default=None,
                        help="where fit writes the report, the detector artifact and the checkpoints "
                             "(default artifacts/<experiment>)")
    parser.add_argument("--baselines", type=list[str], default=list(BASELINES),
                        help="methods scored beside the detector in the test report")


def short_help(command: str) -> str:
    """The `--help` page of a Lightning command."""
    prog = f"{PROG} {command}"
    parser = ArgumentParser(prog=prog, description=SUMMARY[command], add_help=False)
    parser.add_argument("--config", help="a YAML config with any of these sections, e.g. configs/quickstart.yaml "
                                         "(repeatable; later files and options win)")
    add_sahs_arguments(parser)
    width = max(len(n) for n in families())
    rows = "\n".join(f"  {name:<{width}}  {path}" for name, path in families().items())
    more = f"""
model: a detector family (--model CLASS, or model.class_path in the config):
{rows}
  options of one family: {prog} --model.help LogisticDetector

data: a DataModule (--data CLASS, or data.class_path), e.g.
  lit_sahs.data.datamodules.CachedActivationDataModule (a store written by extract)
  options of one: {prog} --data.help CachedActivationDataModule

trainer: Lightning's Trainer arguments, e.g. --trainer.max_epochs 10, --trainer.accelerator auto
  (default: a GPU when there is one), cpu, gpu or mps; --trainer.devices 2 --trainer.strategy ddp

every option with its current value: {prog} --config FILE --print_config
every option with its help, the Trainer's included (long): {prog} --help_all
"""
    return parser.format_help().rstrip() + "\n" + more
