"""An answer produced in a worker thread and read, delta by delta, in the caller's thread.

The local engine and a served model stream the same way: the worker runs `produce(emit)` and hands
over text deltas, then the result or its error; the consumer iterates and may `stop()` from any thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

R = TypeVar("R")


class WorkerStream(Generic[R]):
    """Iterate for text deltas; `result` holds the result once iteration ends. An exception in the worker
    is re-raised in the iterating thread. Subclasses call `_start(produce)` and implement `stop()`."""

    result: R | None

    def _start(self, produce: Callable[[Callable[[str], None]], R], name: str) -> None:
        self.result = None
        self._outcome: tuple[str, Any] | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[Callable[[str], None]], R]) -> None:
        outcome: tuple[str, Any]
        try:
            outcome = ("done", produce(lambda delta: self._queue.put(("delta", delta))))
        except BaseException as error:  # noqa: BLE001 - handed to the consuming thread
            outcome = ("error", error)
        # Kept beside the queue too: a Ctrl-C landing between the consumer's get() and its handling of
        # the item would otherwise lose the end of the stream, and draining would wait forever.
        self._outcome = outcome
        self._queue.put(outcome)

    def stop(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> WorkerStream[R]:
        return self

    def __next__(self) -> str:
        # Not a generator on purpose: a KeyboardInterrupt raised while waiting must leave the stream
        # usable, so the caller can stop() and go on draining the partial answer.
        while self.result is None:
            try:
                # A timeout keeps the consuming thread responsive to Ctrl-C on every platform.
                kind, payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._outcome is None or not self._queue.empty():
                    continue
                kind, payload = self._outcome  # its queue item was lost to an interrupt
            if kind == "delta":
                return payload  # type: ignore[no-any-return]
            if kind == "done":
                self.result = payload
                break
            raise payload
        raise StopIteration

    def finish(self) -> R:
        """Drain the stream (discarding deltas) and return the result; used after stop()."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result
