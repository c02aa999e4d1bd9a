"""Standard error that cannot end the program: diagnostics are worth losing, an answer or a turn is not.

With stderr on a full disk (`2>/dev/full`, a log on a full partition), the first warning raised OSError and
`bluelm` exited 1 before it answered or journaled anything. git and the shell carry on in that case; so does
bluelm: what cannot be written to stderr is dropped.
"""

from __future__ import annotations

from typing import Any, TextIO

__all__ = ["TolerantStderr"]


class TolerantStderr:
    """Wraps a text stream; a failed write or flush is dropped instead of raised."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding…: the wrapped stream's
        return getattr(self._stream, name)
