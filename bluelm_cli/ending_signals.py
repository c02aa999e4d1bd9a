"""While `bluelm ask` streams an answer, the signals that end a process (a dropped SSH connection's SIGHUP,
a supervisor's SIGTERM, Ctrl-\\) stop it as Ctrl-C does, so an `ask --session` turn is journaled before
the exit, as `bluelm chat` journals its own."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["EndingSignal", "ending_signals_interrupt"]

_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGTERM", "SIGQUIT") if hasattr(signal, name))


@dataclass
class EndingSignal:
    received: int | None = None  # the signal that stopped the answer, if one did

    def exit_status(self, otherwise: int) -> int:
        """128 + the signal (what a shell reports for a process the signal ended), else ``otherwise``."""
        return 128 + self.received if self.received is not None else otherwise


@contextmanager
def ending_signals_interrupt() -> Iterator[EndingSignal]:
    """For the block, an ending signal raises KeyboardInterrupt and is recorded; a signal the process was
    started ignoring (`nohup`) stays ignored. Only the main thread may set handlers: elsewhere nothing changes."""
    caught = EndingSignal()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def interrupt(signum: int, frame: object) -> None:
        caught.received = signum
        raise KeyboardInterrupt

    previous = {}
    for signum in _ENDING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
