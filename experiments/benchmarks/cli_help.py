"""Seconds `python -m lit_sahs <command> --help` takes, per command, in a fresh interpreter (the
best of a few runs, so a busy machine counts less), and the heavy libraries each one imported.

    python experiments/benchmarks/cli_help.py [--repeat 3] [--commands '[fit, tune]']
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Optional

from lit_sahs.cli import COMMANDS, LIGHTNING_COMMANDS
from lit_sahs.commands import script_main

HEAVY = ("torch", "lightning", "transformers", "mlflow", "optuna")


def help_seconds(command: str) -> tuple[float, int, list[str]]:
    """(wall seconds, exit status, heavy libraries imported) of one `--help`."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lit_sahs", command, "--help"],
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t  # includes -X importtime's own small overhead
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", r.stderr, re.M))
    return seconds, r.returncode, [m for m in HEAVY if m in imported]


def benchmark(commands: Optional[list[str]] = None, repeat: int = 3) -> int:
    """Time every command's --help.

    Args:
        commands: commands to time (default: all)
        repeat: runs per command; the fastest is printed
    """
    print(f"{'command':<10} {'seconds':>8}  exit  heavy imports")
    for command in commands or list(LIGHTNING_COMMANDS) + list(COMMANDS):
        seconds, code, heavy = min(help_seconds(command) for _ in range(max(1, repeat)))
        print(f"{command:<10} {seconds:8.2f}  {code:>4}  {', '.join(heavy) or '-'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(benchmark))
