"""Drive a generation stream into a renderer, turning Ctrl-C into "stop this answer", not "quit".

Shared by `bluelm ask` and the `bluelm chat` REPL. Duck-typed: it needs an iterable stream with
`stop()` and `result`, and a renderer with `feed()` and `finish()`; it touches no tensors.
"""

from __future__ import annotations

from typing import Any, Protocol


class _Stream(Protocol):
    result: Any

    def __iter__(self) -> Any: ...

    def stop(self) -> None: ...


class _Renderer(Protocol):
    def feed(self, delta: str) -> None: ...

    def finish(self) -> None: ...


def show_stream(stream: _Stream, renderer: _Renderer) -> Any:
    """Feed every delta to the renderer; on Ctrl-C stop generation, keep what came, and return the result.

    The worker ends within one decoding step of `stop()`, so draining after an interrupt is quick; a
    second Ctrl-C while draining is ignored rather than abandoning a half-finished turn.
    """
    iterator = iter(stream)
    try:
        for delta in iterator:
            renderer.feed(delta)
    except KeyboardInterrupt:
        stream.stop()
        while True:
            try:
                for delta in iterator:
                    renderer.feed(delta)
                break
            except KeyboardInterrupt:
                continue
    finally:
        renderer.finish()
    return stream.result
