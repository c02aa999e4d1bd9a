"""What the chat shows while its model loads in the background (:mod:`bluelm_cli.chat.background`).

A status line under the prompt (prompt_toolkit's bottom toolbar), the load's warnings and notes printed
above the prompt as they come (the loader thread only queues them and wakes the prompt), and a visible
wait for a message sent before the model is ready. Everything that prints runs in the REPL's thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from collections.abc import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app, run_in_terminal
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from rich.text import Text

from bluelm_cli.chat.background import BackgroundBackend
from bluelm_cli.ui.job_control import keys_not_echoed
from bluelm_cli.ui.output import ChatOutput

__all__ = ["LoadView"]

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
TOOLBAR_REFRESH_S = 0.25


class LoadView:
    """Shows a :class:`BackgroundBackend`'s load in a chat; `on_loaded` runs (in the REPL's thread) once it has."""

    def __init__(self, backend: BackgroundBackend, out: ChatOutput, on_loaded: Callable[[], None]) -> None:
        self.backend = backend
        self.out = out
        self._on_loaded = on_loaded
        self._prompt: PromptSession[str] | None = None
        self.loaded_shown = False
        self.stop_requested = False  # Ctrl-C on an empty prompt during the load: end the chat
        self._toolbar_after: Any = None  # what the prompt's toolbar shows once the model has loaded

    # -------------------------------------------------------------------------------- at the prompt
    def attach(self, prompt_session: PromptSession[str]) -> None:
        """Show the status line under this prompt and print the load's events above it as they come."""
        self._prompt = prompt_session
        if not self.loaded_shown:
            self._toolbar_after = prompt_session.bottom_toolbar  # the context meter, once the model is there
            prompt_session.bottom_toolbar = self._toolbar
            prompt_session.refresh_interval = TOOLBAR_REFRESH_S  # the elapsed time and spinner move
        self.backend.set_waker(self._wake)

    def start_after_first_draw(self) -> None:
        """A `pre_run` for the prompt: the load starts once the prompt is on the screen, so that its imports
        (torch) don't compete with drawing the prompt for the interpreter lock."""
        asyncio.get_running_loop().call_soon(self.backend.start)

    def key_bindings(self) -> KeyBindings:
        bindings = KeyBindings()
        empty_line_while_loading = Condition(lambda: self.backend.loading and not get_app().current_buffer.text)

        @bindings.add("c-c", filter=empty_line_while_loading)
        def _stop_loading(event: KeyPressEvent) -> None:
            self.stop_requested = True
            event.app.exit(exception=KeyboardInterrupt())

        return bindings

    def _toolbar(self) -> FormattedText:
        frame = _SPINNER[int(time.monotonic() / TOOLBAR_REFRESH_S) % len(_SPINNER)]
        return FormattedText([(
            "class:bottom-toolbar.text",
            f" {frame} {self.backend.status_text}… {self.backend.elapsed():.0f} s · type away, messages wait for the"
            " model · Ctrl-C on an empty line quits ",
        )])

    def _wake(self) -> None:
        """From the loader thread: have the prompt (if one is up) show what was queued."""
        prompt = self._prompt
        if prompt is None:
            return
        app = prompt.app
        loop, context = app.loop, app.context
        if not app.is_running or loop is None or context is None:
            return  # shown before the next prompt instead
        # In the app's context, so that run_in_terminal finds the running app and prints above it.
        loop.call_soon_threadsafe(self._show_in_app, context=context.copy())

    def _show_in_app(self) -> None:
        app = get_app()
        if not app.is_running:
            return
        if self.backend.error is not None:
            app.exit(exception=self.backend.error)  # the loop prints what came before it, then ends the chat
            return
        if self.backend.has_events:
            run_in_terminal(self._show_queued)

    def _show_queued(self) -> None:
        try:
            self.show_events()
        except Exception:  # noqa: BLE001 - a failure wakes the prompt again and ends the chat from there
            pass

    # -------------------------------------------------------------------------------- in the REPL
    def show_events(self, *, block: bool = False) -> None:
        """Print what the load reported since last time; raises the load's LoadFailed at its end."""
        for event in self.backend.take_events(block=block):
            if event.kind == "warning":
                self.out.warn(event.text)
            elif event.kind == "note":
                self.out.side_note(event.text)
            elif event.kind == "loaded":
                self.loaded_shown = True
                if self._prompt is not None:
                    self._prompt.bottom_toolbar = self._toolbar_after
                self._on_loaded()
            else:
                assert self.backend.error is not None
                raise self.backend.error

    def wait_until_loaded(self) -> None:
        """Block until the model has loaded, with a status line; Ctrl-C raises KeyboardInterrupt."""
        self.backend.start()
        self.show_events()
        if self.loaded_shown:
            return
        if not self.out.interactive:
            while not self.loaded_shown:
                self.show_events(block=True)
            return
        with keys_not_echoed(), self.out.console.status(_WaitingLine(self.backend), spinner="dots"):
            while not self.loaded_shown:
                self.show_events(block=True)


class _WaitingLine:
    """The wait's status line, re-rendered on every refresh (its step and elapsed time change)."""

    def __init__(self, backend: BackgroundBackend) -> None:
        self.backend = backend

    def __rich__(self) -> Text:
        return Text(
            f"Waiting for the model: {self.backend.status_text}… {self.backend.elapsed():.0f} s"
            " · Ctrl-C cancels this message",
            style="dim",
        )
