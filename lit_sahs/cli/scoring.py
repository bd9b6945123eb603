"""`python -m lit_sahs guard | screen | serve`: their options (``lit_sahs.options``) are parsed before
the command's module, which loads torch and the target, is imported, so `--help` and a bad option
answer at once."""
from __future__ import annotations

from typing import Optional

from lit_sahs.options import GuardOptions, ScreenOptions, ServeOptions, parse_options

PROG = "python -m lit_sahs"


def guard(argv: Optional[list[str]] = None) -> int:
    opts = parse_options(GuardOptions, argv, f"{PROG} guard")
    from lit_sahs.guard import guard_command

    return guard_command(opts)


def screen(argv: Optional[list[str]] = None) -> int:
    opts = parse_options(ScreenOptions, argv, f"{PROG} screen")
    from lit_sahs.screen import screen_command

    return screen_command(opts)


def serve(argv: Optional[list[str]] = None) -> int:
    opts = parse_options(ServeOptions, argv, f"{PROG} serve")
    from lit_sahs.serve import serve_command

    return serve_command(opts)
