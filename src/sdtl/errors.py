"""User-facing errors.

Anything caused by the user's input (a path, a config key, a checkpoint) raises :class:`UserError`
with a message that names the input and says what to do. The CLI prints it as one line and exits
with status 2; library callers can catch it like any exception.
"""


class UserError(Exception):
    """Bad input from the user: printed as a one-line message, exit code 2."""

    exit_code = 2


class RunFailed(Exception):
    """A run stopped for a reason found while running (NaN loss, too many corrupt videos).

    The message says what happened, where, and which checkpoint to resume from. Exit code 1.
    """

    exit_code = 1
