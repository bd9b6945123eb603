"""The one error type users see: the CLI prints its message as a single line and exits 2."""


class LitSahsError(Exception):
    """Bad input or environment: the message names the problem and the fix."""
