"""A backend whose model loads in a worker thread, so the chat's prompt never waits for it.

:class:`BackgroundBackend` runs a load function (anything that returns a :class:`~bluelm_cli.core.backend.Backend`)
in a thread and, once it has returned, delegates the whole Backend protocol to what it returned. Until
then, whatever needs the model (the encoder, the context limit, a stream, the info) raises
:class:`~bluelm_cli.core.backend.ModelLoading`, which the faces either wait on or report as "(model loading)".

What the load reports (its current step, warnings, notes, then "loaded" or "failed") is queued as
:class:`LoadEvent` items for the face to show from its own thread: the loader never prints, since a
prompt may be on the screen. Nothing here imports torch: the load function does, in its thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bluelm_cli.core.backend import AnswerStream, Backend, BackendInfo, ModelLoading
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.prompt import PromptEncoder, PromptPlan
from bluelm_cli.core.settings import SamplingSettings

__all__ = ["BackgroundBackend", "LoadEvent", "LoadFailed", "LoadProgress"]

EventKind = Literal["warning", "note", "loaded", "failed"]


@dataclass(frozen=True)
class LoadEvent:
    """Something the load reported, for the face to show: a warning, a note, or its end."""

    kind: EventKind
    text: str = ""


class LoadFailed(BlueLMError):
    """The background load failed; its message is the load error's (one line), and it ends the chat."""

    def __init__(self, error: BaseException) -> None:
        if isinstance(error, BlueLMError):
            message = str(error)
            self.exit_status = error.exit_status
        else:  # a bug in loading: say what it was, the traceback comes with --debug
            message = f"{type(error).__name__}: {error} (run again with --debug for the traceback)"
        super().__init__(message)
        self.__cause__ = error


class LoadProgress:
    """What a load function may report while it runs (from its thread)."""

    def __init__(self, backend: BackgroundBackend) -> None:
        self._backend = backend

    def status(self, text: str) -> None:
        """The step under way, shown in the status line (replaces the previous one)."""
        self._backend.status_text = text

    def warn(self, text: str) -> None:
        self._backend._post(LoadEvent("warning", text))

    def note(self, text: str) -> None:
        self._backend._post(LoadEvent("note", text))

    def elapsed(self) -> float:
        """Seconds since the load began (its imports included: the user waited for them too)."""
        return self._backend.elapsed()


LoadFunction = Callable[[LoadProgress], Backend]


class BackgroundBackend:
    """A :class:`Backend` that loads in the background; call :meth:`start`, then use it as the loaded one."""

    def __init__(self, load: LoadFunction, *, status: str = "Loading the model") -> None:
        self._load = load
        self.status_text = status  # the current step of the load; read by the status line from any thread
        self._loaded: Backend | None = None
        self._error: LoadFailed | None = None
        self._events: list[LoadEvent] = []
        self._changed = threading.Condition()
        self._waker: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self.started_at: float | None = None
        self.load_seconds: float | None = None

    # ------------------------------------------------------------------------------------ the load
    def start(self) -> None:
        """Start loading (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self.started_at = time.perf_counter()
        # A daemon thread, so that a chat ended during the load is not held until the load is done;
        # see exit_now_if_loading for how the process then ends without killing it mid torch op.
        self._thread = threading.Thread(target=self._run, name="bluelm-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            loaded = self._load(LoadProgress(self))
        except BaseException as error:  # noqa: BLE001 - every failure is reported to the face, none is lost
            self._error = LoadFailed(error)
            self._finish(LoadEvent("failed", str(self._error)))
            return
        self._loaded = loaded
        self._finish(LoadEvent("loaded"))

    def _finish(self, event: LoadEvent) -> None:
        assert self.started_at is not None
        self.load_seconds = time.perf_counter() - self.started_at
        self._post(event)

    def _post(self, event: LoadEvent) -> None:
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()
            waker = self._waker
        if waker is not None:
            waker()

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Called from the loader thread after each event, so the face can show it (e.g. wake its prompt)."""
        with self._changed:
            self._waker = waker

    def take_events(self, *, block: bool = False) -> list[LoadEvent]:
        """The events not taken yet, oldest first; with `block`, wait until there is one (the face's
        thread; Ctrl-C interrupts the wait)."""
        with self._changed:
            while block and not self._events:
                self._changed.wait()
            events, self._events = self._events, []
        return events

    @property
    def ready(self) -> bool:
        """The model has loaded: the Backend protocol answers."""
        return self._loaded is not None

    @property
    def loading(self) -> bool:
        """The load has not ended (it may not have started yet)."""
        return self._loaded is None and self._error is None

    @property
    def has_events(self) -> bool:
        with self._changed:
            return bool(self._events)

    @property
    def error(self) -> LoadFailed | None:
        return self._error

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.perf_counter() - self.started_at

    def exit_now_if_loading(self, status: int) -> None:
        """End the process with `status` at once while the loader thread is still running.

        Letting the interpreter shut down instead would kill the daemon loader wherever it is, and one
        stopped inside a torch operation aborts the whole process (SIGABRT, a core dump instead of the exit
        status). Waiting for it could take minutes (a download, a 7B checkpoint). So the chat's own state is
        made safe first — the caller has restored the terminal and the journal is fsync'd record by record
        (its lock is an OS lock that goes with the process) — and only the streams are left to flush here;
        the loader holds nothing that must be cleaned up (a partial hub download is resumed next time)."""
        if self._thread is None or not self._thread.is_alive():
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(int(status))

    # ---------------------------------------------------------------------------- Backend protocol
    def _model(self) -> Backend:
        if self._loaded is not None:
            return self._loaded
        if self._error is not None:
            raise self._error
        raise ModelLoading()

    @property
    def encoder(self) -> PromptEncoder:
        return self._model().encoder

    @property
    def context_limit(self) -> int:
        return self._model().context_limit

    def stream(self, plan: PromptPlan, settings: SamplingSettings) -> AnswerStream:
        return self._model().stream(plan, settings)

    def info(self) -> BackendInfo:
        return self._model().info()

    @property
    def loaded(self) -> Backend:
        """The backend the load returned (ModelLoading until then)."""
        return self._model()

