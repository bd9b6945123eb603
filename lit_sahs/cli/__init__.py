"""`python -m lit_sahs <command>`: one parser per subcommand; every LitSahsError becomes one
`error: ...` line on stderr and exit status 2."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

from lit_sahs.errors import LitSahsError

# name -> a function taking argv and returning the exit status, or "module:function" for commands
# that live beside their stage (imported only when used, so `--help` stays fast)
COMMANDS: dict[str, Callable[[list[str]], int] | str] = {
    "extract": "lit_sahs.cli.extract:main",
    "locate": "lit_sahs.cli.locate:main",
    "evaluate": "lit_sahs.cli.evaluate:main",
    "tune": "lit_sahs.tune:main",
    "calibrate": "lit_sahs.cli.calibrate:main",
    "direction": "lit_sahs.cli.direction:main",
    "register": "lit_sahs.cli.register:main",
    "guard": "lit_sahs.cli.scoring:guard",
    "screen": "lit_sahs.cli.scoring:screen",
    "ablate": "lit_sahs.cli.ablate:main",
    "store": "lit_sahs.data.verify:main",
    "serve": "lit_sahs.cli.scoring:serve",
}


def _command(name: str) -> Callable[[list[str]], int]:
    fn = COMMANDS[name]
    if isinstance(fn, str):
        import importlib

        module, attr = fn.split(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise LitSahsError(f"command {name!r} is not available in this version of lit_sahs") from None
    return fn


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def configure_logging() -> None:
    """Warnings from every library through one root handler. Lightning prints its own INFO lines
    with its own handler; the root handler takes WARNING and above only, so those lines are not
    printed a second time when they propagate to the root."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)


class _NoTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_libraries() -> None:
    """Once, where the command line starts: no deprecation warnings (they speak to whoever maintains
    this code, not to its user) and no Lightning tips in the user's output."""
    import warnings

    for category in (DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


SUMMARIES = {
    "fit": "train a detector (LightningCLI; extracts and locates first when the config says so)",
    "validate": "validate a detector checkpoint (LightningCLI)",
    "test": "test a detector checkpoint (LightningCLI)",
    "predict": "score with a detector checkpoint (LightningCLI)",
    "extract": "capture every head at the first-token position into an activation store",
    "locate": "rank every head by its own probe's held-out AUROC, or --by effect: by what ablating it does to refusal",
    "evaluate": "zero-shot matrix over attack families, or score a labelled file with a detector",
    "tune": "Optuna study over detector family, head count and regularisation",
    "calibrate": "give a detector the threshold cross-fitted over its store's sources (FPR that holds on unseen ones)",
    "direction": "fit a target's refusal direction from a store (guard --answer_direction ablates it)",
    "register": "put a detector in the MLflow model registry",
    "guard": "guarded generation: score at prefill, refuse or decode",
    "screen": "score prompts without generating (runs only the layers the detector reads)",
    "ablate": "attack success and utility with heads switched off",
    "store": "store verify STORE [--repair]: check an activation store's blocks, remove damaged ones",
    "serve": "OpenAI-compatible moderation and guarded chat endpoints for a detector (HTTP)",
}


def usage() -> str:
    lines = ["usage: python -m lit_sahs <command> [--help] [--config FILE] ...", "", "commands:"]
    lines += [f"  {name:<10} {SUMMARIES.get(name, '')}" for name in list(LIGHTNING_COMMANDS) + list(COMMANDS)]
    return "\n".join(lines)


def _lit_sahs_cause(e: BaseException) -> Optional[LitSahsError]:
    """The LitSahsError behind `e` (its cause or context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, LitSahsError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def main(argv: Optional[list[str]] = None) -> None:
    from lit_sahs.interrupts import exit_on_interrupt

    with exit_on_interrupt():  # Ctrl+C: one line, exit status 130
        _main(argv)


def _main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    quiet_libraries()
    if argv and argv[0] in LIGHTNING_COMMANDS:
        if any(a in ("-h", "--help") for a in argv[1:]):  # the short page; --help_all gives LightningCLI's
            from lit_sahs.cli.fit import short_help

            print(short_help(argv[0]))
            sys.exit(0)
        argv = ["--help" if a == "--help_all" else a for a in argv]
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from lit_sahs.lightning_cli import run_lightning_cli

        try:
            run_lightning_cli(argv)
        except LitSahsError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except MisconfigurationException as e:  # e.g. --trainer.accelerator gpu on a machine without one
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except ValueError as e:  # jsonargparse wraps an error raised while it builds a class from the config
            inner = _lit_sahs_cause(e)
            if inner is None:
                raise
            print(f"error: {inner}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            listed = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
            print(f"error: unknown command {argv[0]!r}: use one of {listed}", file=sys.stderr)
            sys.exit(2)
        print(usage())
        sys.exit(0)
    try:
        sys.exit(_command(argv[0])(argv[1:]))
    except LitSahsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
