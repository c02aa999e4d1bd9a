"""Errors a user can act on. The CLI prints them as one line, `Error: …`, without a traceback."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    FILTERED = 3  # `bluelm ask`: a served model's answer was stopped by the server's content filter
    INTERRUPTED = 130


class BlueLMError(Exception):
    """A problem the user can fix. The message says what went wrong and what to do."""

    exit_status: ExitStatus = ExitStatus.ERROR


class UsageError(BlueLMError):
    """Bad options or arguments (exit status 2)."""

    exit_status = ExitStatus.USAGE
