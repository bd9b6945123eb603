"""Command-line parsers generated from typed signatures.

A command is a plain function (or a dataclass) whose parameters, types, defaults and docstring
("Args:" section) are the one declaration of its options: jsonargparse builds the parser, YAML
configs (`--config`) and `--print_config` from it, as LightningCLI does for `fit`. A command
function returns the process exit status; `run_command` parses argv and calls it.

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
