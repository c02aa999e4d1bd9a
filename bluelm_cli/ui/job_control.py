"""The terminal while an answer streams: keys not echoed, and resizes and Ctrl-Z/`fg` handled.

During an answer the keys typed are not echoed (they would shift the live region); they wait, unread,
for the next prompt. SIGWINCH tells the renderer the screen was reflowed. SIGTSTP (Ctrl-Z) erases the
live region, gives the shell back its echoing terminal and a visible cursor, and stops the process;
when it continues (`fg`), echo goes off again and the answer keeps streaming. A stop that did not come
through here (SIGSTOP) is met on SIGCONT: the renderer then starts afresh below whatever the shell wrote.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Protocol

__all__ = ["answer_terminal", "keys_not_echoed"]

try:
    from termios import error as _TermiosError
except ImportError:  # no termios (Windows): nothing raises it
    class _TermiosError(Exception):  # type: ignore[no-redef]
        pass


class _Renderer(Protocol):
    def terminal_resized(self) -> None: ...

    def terminal_continued(self) -> None: ...

    def release_terminal(self, action: Callable[[], None]) -> None: ...


@contextmanager
def answer_terminal(renderer: _Renderer, *, interactive: bool) -> Iterator[None]:
    """For the block: echo off on a terminal stdin, and (main thread only) handlers for SIGWINCH, SIGTSTP
    and SIGCONT; everything as it was after. Not interactive: nothing changes."""
    if not interactive:
        yield
        return
    modes = _TerminalModes()
    modes.quiet()
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            previous = _install(renderer, modes)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        modes.restore()


@contextmanager
def keys_not_echoed() -> Iterator[None]:
    """For the block: echo off on a terminal stdin, as it was after. The keys typed meanwhile (lines typed
    while a message waits for the model) wait, unread, for the next prompt, which shows them; echoed by the
    terminal they would be written into the status line."""
    modes = _TerminalModes()
    modes.quiet()
    try:
        yield
    finally:
        modes.restore()


def _install(renderer: _Renderer, modes: _TerminalModes) -> dict[int, Any]:
    # A handler runs wherever the main thread is, inside the answer's stream too: what it raises there would end
    # the turn as a failure. The terminal gone (the SSH connection dropped, SIGCONT comes with its SIGHUP), its
    # writes fail with EIO; the SIGHUP ends the answer, and the next ordinary write says the rest.
    def resized(signum: int, frame: object) -> None:
        with suppress(OSError):
            renderer.terminal_resized()

    def continued(signum: int, frame: object) -> None:
        modes.quiet()  # the shell may have put its own modes back while we were stopped
        with suppress(OSError):
            renderer.terminal_continued()

    def stop_process() -> None:
        modes.restore()  # the shell gets the terminal as it lent it: echo on
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)  # stops here until `fg`
        finally:
            signal.signal(signal.SIGTSTP, suspend)
            modes.quiet()

    def suspend(signum: int, frame: object) -> None:
        renderer.release_terminal(stop_process)

    handlers = {"SIGWINCH": resized, "SIGTSTP": suspend, "SIGCONT": continued}
    return {
        getattr(signal, name): signal.signal(getattr(signal, name), handler)
        for name, handler in handlers.items()
        if hasattr(signal, name)
    }


class _TerminalModes:
    """stdin's terminal modes as found, and the same with echo off. TCSANOW throughout: never discard
    type-ahead. Does nothing when stdin is not a terminal."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._saved: list[Any] | None = None
        self._quiet: list[Any] | None = None
        try:
            import termios

            if sys.stdin.isatty():
                self._fd = sys.stdin.fileno()
                self._saved = termios.tcgetattr(self._fd)
                quiet = list(self._saved)
                quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
                self._quiet = quiet
        except (ImportError, OSError, ValueError, _TermiosError):
            self._fd = None

    def quiet(self) -> None:
        self._set(self._quiet)

    def restore(self) -> None:
        self._set(self._saved)

    def _set(self, modes: list[Any] | None) -> None:
        if self._fd is None or modes is None:
            return
        try:
            import termios

            termios.tcsetattr(self._fd, termios.TCSANOW, modes)
        except (OSError, ValueError, _TermiosError):  # termios.error is no OSError: a terminal gone raises it
            pass
