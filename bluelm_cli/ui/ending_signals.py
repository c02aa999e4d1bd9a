"""The signals that end a process (a dropped SSH connection's SIGHUP, a supervisor's SIGTERM, Ctrl-\\'s
SIGQUIT, SIGUSR1/2), handled for a block: while an answer streams they stop it as Ctrl-C does, so the turn
is journaled before the exit (`bluelm ask --session`, `bluelm chat`), and at the chat's prompt they end it
with the terminal restored."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["ENDING_SIGNALS", "EndingSignal", "ending_signals_interrupt", "on_ending_signals"]

# Signals whose default action ends the process; each ends bluelm with 128+N once its turn is journaled.
ENDING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGHUP", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


@dataclass
class EndingSignal:
    received: int | None = None  # the signal that stopped the answer, if one did

    def exit_status(self, otherwise: int) -> int:
        """128 + the signal (what a shell reports for a process the signal ended), else ``otherwise``."""
        return 128 + self.received if self.received is not None else otherwise


@contextmanager
def on_ending_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for every ending signal, for the block; the previous handlers after it. A signal the process
    was started ignoring (`nohup`) stays ignored. Only the main thread may set handlers: elsewhere (tests
    driving the REPL in a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def ending_signals_interrupt() -> Iterator[EndingSignal]:
    """For the block, an ending signal raises KeyboardInterrupt and is recorded."""
    caught = EndingSignal()

    def interrupt(signum: int, frame: object) -> None:
        caught.received = signum
        raise KeyboardInterrupt

    with on_ending_signals(interrupt):
        yield caught
