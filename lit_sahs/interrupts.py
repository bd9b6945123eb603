"""Ctrl+C ends any command with one line, `error: interrupted`, and exit status 130 (128 + SIGINT),
the shell's convention, instead of tracebacks.

Lightning catches the KeyboardInterrupt inside a fit, shuts down and exits with status 1, and
Optuna logs a failed trial's traceback before passing the interrupt on; so the SIGINT handler
records that an interrupt happened (`interrupted`), a SystemExit after it still ends as 130, and
`quiet_interrupt_tracebacks` drops those logged tracebacks. Whatever the command had open is
closed by its own `finally`/`except` blocks on the way out (MLflow runs end FAILED or KILLED)."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Iterator

EXIT_STATUS = 130
_state = {"interrupted": False}


def interrupted() -> bool:
    """Whether Ctrl+C was pressed while a command ran under `exit_on_interrupt`."""
    return _state["interrupted"]


def _on_sigint(signum, frame):
    _state["interrupted"] = True
    raise KeyboardInterrupt


def _exit() -> None:
    with contextlib.suppress(ValueError):  # a second Ctrl+C while shutting down prints nothing more
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("error: interrupted", file=sys.stderr)
    sys.exit(EXIT_STATUS)


@contextlib.contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """Run a command so that Ctrl+C ends it with one line and exit status 130."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main else None
    _state["interrupted"] = False
    try:
        yield
    except KeyboardInterrupt:
        _exit()
    except SystemExit as e:
        if interrupted() and e.code not in (0, None, EXIT_STATUS):  # Lightning's exit after an interrupt
            _exit()
        raise
    finally:
        if main and previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, previous)


class _DropInterrupts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (KeyboardInterrupt, SystemExit))


def quiet_interrupt_tracebacks(logger: str) -> None:
    """Drop the records of `logger`'s handlers that carry an interrupt's traceback (Optuna logs one
    for the trial an interrupt stopped)."""
    for handler in logging.getLogger(logger).handlers:
        if not any(isinstance(f, _DropInterrupts) for f in handler.filters):
            handler.addFilter(_DropInterrupts())
