"""The errors sdtl raises, in a small hierarchy that library callers can catch by kind.

::

    SdtlError
    ├── UserError          bad input (exit 2): names the input and what to do
    │   ├── ConfigError    a config key: ``key``, ``problem``, ``hint``
    │   ├── DataError      a dataset file or folder: ``path``
    │   ├── CheckpointError  a checkpoint file: ``path``
    │   └── NoSpaceError   no space left while writing ``path`` (the old file intact)
    ├── RunFailed          stopped by what it found while running (NaN loss, corrupt data; exit 1)
    └── RunInterrupted     stopped on request after writing its state (SIGINT/SIGTERM/SIGUSR1; exit 75)

The library speaks of config keys (``optim.lr``), never of command-line flags; the CLI alone turns
them into ``--set optim.lr=…`` hints and one-line messages (``SDTL_DEBUG=1`` or ``sdtl --debug``
shows the full traceback with its cause). A tuner, a cluster job or a notebook gets the typed
exception with its cause chain.

A message about one of a run's own arguments (its output folder, what to resume) names it with a
marker, ``«out»`` or ``«resume=auto»`` (:data:`ARGUMENTS`): ``str(exc)`` spells it as the Python
argument (``out_dir``, ``resume='auto'``), :meth:`UserError.for_cli` as the flag (``--out``,
``--resume auto``).
"""
from __future__ import annotations

import re

#: a run's arguments as a message marks them (``«out»``, ``«resume=auto»``): (command-line flag,
#: Python argument of run_finetune / run_pretrain / evaluate_checkpoint / ...)
ARGUMENTS = {"out": ("--out", "out_dir"), "resume": ("--resume", "resume"), "slurm": ("--slurm", "slurm")}
_MARKER = re.compile(r"«(\w+)(?:=([^»]*))?»")


def spell(message: str, cli: bool) -> str:
    """``message`` with its argument markers spelt for the command line or for Python."""
    def one(m: re.Match) -> str:
        if m.group(1) not in ARGUMENTS:  # a «» in a path or a value: not a marker
            return m.group(0)
        flag, param = ARGUMENTS[m.group(1)]
        value = m.group(2)
        if cli:
            return flag if value is None else f"{flag} {value}"
        return param if value is None else f"{param}={value!r}"

    return _MARKER.sub(one, message)


class SdtlError(Exception):
    """Base of every error sdtl raises on purpose."""

    exit_code = 1


class UserError(SdtlError):
    """Bad input from the user: printed as a one-line message, exit code 2. ``str(exc)`` speaks of
    Python arguments, :meth:`for_cli` of flags (see the markers above)."""

    exit_code = 2

    def __init__(self, message: str = "") -> None:
        super().__init__(spell(message, cli=False))
        self.template = message

    def for_cli(self) -> str:
        """The message as the command line prints it (``--out``, ``--resume auto``)."""
        return spell(self.template, cli=True)

    def __reduce__(self):  # survives pickling (a worker, a Slurm job) with its markers
        return type(self), (self.template,)


class ConfigError(UserError):
    """A config value that cannot work: ``config key KEY: PROBLEM; HINT``."""

    def __init__(self, key: str, problem: str, hint: str = "") -> None:
        self.key, self.problem, self.hint = key, problem, hint
        super().__init__(f"config key {key}: {problem}" + (f"; {hint}" if hint else ""))

    def __reduce__(self):  # survives pickling (a DataLoader worker hands its exception back pickled)
        return type(self), (self.key, self.problem, self.hint)


class _PathError(UserError):
    def __init__(self, message: str, path=None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # survives pickling with its path
        return type(self), (self.template, self.path)


class DataError(_PathError):
    """A dataset file, list or folder that cannot be used (``path``)."""


class CheckpointError(_PathError):
    """A checkpoint file that cannot be used (``path``)."""


class RunFailed(SdtlError):
    """A run stopped for a reason found while running (NaN loss, too many corrupt videos).

    The message says what happened, where, and which checkpoint to resume from. Exit code 1.
    """

    exit_code = 1


class RunInterrupted(SdtlError):
    """A run stopped on request (SIGINT, SIGTERM, SIGUSR1) after writing its checkpoint state.

    ``checkpoint`` is the file it can be resumed from. Exit code 75 (EX_TEMPFAIL: try again), distinct
    from a failure, so a cluster job can be requeued on it.
    """

    exit_code = 75

    def __init__(self, message: str, checkpoint=None, signum: int | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = signum  # the signal that asked for the stop (None: another rank's, or not a signal)

    def __reduce__(self):  # survives pickling (a Slurm job's result, a subprocess) with what it carries
        return type(self), (str(self), self.checkpoint, self.signum)


class NoSpaceError(UserError):
    """No space left on the device (or quota) while writing ``path``; nothing half-written was left
    (exit 2: free space, then run the same command again; a training run continues with resume='auto')."""

    def __init__(self, message: str, path=None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return type(self), (self.template, self.path)
