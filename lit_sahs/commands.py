"""Command-line parsers generated from typed signatures.

A command is a plain function (or a dataclass) whose parameters, types, defaults and docstring
("Args:" section) are the one declaration of its options: jsonargparse builds the parser, YAML
configs (`--config`) and `--print_config` from it, as LightningCLI does for `fit`. A command
function returns the process exit status; `run_command` parses argv and calls it. A script under
experiments/ declares its options the same way and ends with
`if __name__ == "__main__": raise SystemExit(script_main(run))`.

    def locate(store: str, top_k: int = 8) -> int:
        '''Rank every head.

        Args:
            store: activation store directory
            top_k: heads marked on the heatmap
        '''
    COMMANDS = {"locate": "lit_sahs.locate:locate_command"}
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable, Optional, Sequence

from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_sahs.errors import LitSahsError
from lit_sahs.parse_errors import one_line


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def command_parser(fn: Callable | type, prog: str, description: Optional[str] = None,
                   skip: Sequence[str] = ()) -> ArgumentParser:
    """A parser for `fn`'s parameters (or a dataclass's fields), with --config and --print_config."""
    p = ArgumentParser(prog=prog, description=description or _summary(fn), exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    if dataclasses.is_dataclass(fn):
        p.add_class_arguments(fn, as_group=False, skip=set(skip) or None, sub_configs=True)
    else:
        p.add_function_arguments(fn, as_group=False, skip=set(skip) or None, sub_configs=True)
    return p


def parse_command(fn: Callable | type, argv: Sequence[str], prog: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """argv -> the keyword arguments of `fn` (config files applied, `config` removed)."""
    parser = command_parser(fn, prog, skip=skip)
    parser.exit_on_error = False  # one `error:` line (the CLI prints LitSahsError) instead of usage + details
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as e:
        raise LitSahsError(one_line(e)) from None
    kwargs = parser.instantiate_classes(cfg).as_dict()
    kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    return kwargs


def run_command(fn: Callable[..., int], argv: Sequence[str], prog: str) -> int:
    """Parse argv for `fn` and call it; returns its exit status."""
    return int(fn(**parse_command(fn, argv, prog)) or 0)


def script_main(fn: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's typed function from the command line: options from its signature and docstring
    as for a command, a bare boolean flag (`--paired`) meaning true, and a LitSahsError ending as one
    `error:` line with exit status 2. Returns the exit status."""
    parser = command_parser(fn, prog=f"python {sys.argv[0]}")
    for action in parser._actions:  # `--flag` alone is `--flag true`, as argparse's store_true was
        if getattr(action, "_typehint", None) is bool:
            action.nargs, action.const = "?", True
    kwargs = parser.instantiate_classes(parser.parse_args(list(sys.argv[1:] if argv is None else argv))).as_dict()
    kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    try:
        return int(fn(**kwargs) or 0)
    except LitSahsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
