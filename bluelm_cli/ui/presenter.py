"""The one presenter of a turn, for both faces: the `bluelm chat` REPL and `bluelm ask`.

The Chat service owns the turn (it journals the message, streams, and commits the ending); this module
only shows it. Both faces hand it the service's :class:`~bluelm_cli.chat.service.TurnStream` and a
renderer: the REPL's live Markdown region, `ask`'s plain or rendered stdout, or nothing for `--json`.
What they add afterwards (the REPL's notes and stats, `ask`'s JSON and exit status) is theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from bluelm_cli.chat.service import CommittedTurn, TurnStream
from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.ui.job_control import answer_terminal
from bluelm_cli.ui.streaming import show_stream

__all__ = ["PresentedTurn", "present_turn"]


class _Renderer(Protocol):
    def start(self) -> None: ...

    def feed(self, delta: str) -> None: ...

    def finish(self) -> None: ...

    def terminal_resized(self) -> None: ...

    def terminal_continued(self) -> None: ...


@dataclass(frozen=True)
class PresentedTurn:
    committed: CommittedTurn
    # Writing the answer out failed (a closed pipe, a full disk, an encoding): the turn is committed all
    # the same, and the face decides how to report it (quietly for a reader that went away).
    write_failure: Exception | None

    @property
    def result(self) -> AnswerResult:
        return self.committed.result


def present_turn(
    stream: TurnStream,
    renderer: _Renderer,
    *,
    interactive: bool,
    end_line: Callable[[AnswerResult], bool] = lambda result: False,
    write: Callable[[str], object] | None = None,
    stops_answer: AbstractContextManager[object] | None = None,
) -> PresentedTurn:
    """Stream the turn into `renderer`, then let it commit itself.

    Ctrl-C stops the answer and keeps what came (a second one while draining is ignored). On a terminal
    (`interactive`), keys typed meanwhile are not echoed into the live region and resize / Ctrl-Z are
    handled. `end_line(result)` says whether `write` ends the output with a newline (plain output that
    did not end with one). The model's worker is never left running when writing fails: a torch op at
    interpreter exit aborts the process.
    """
    with stops_answer or nullcontext(), answer_terminal(renderer, interactive=interactive):
        try:
            renderer.start()
            result = show_stream(stream, renderer)
            if write is not None and end_line(result):
                write("\n")
        except KeyboardInterrupt:
            # Ctrl-C landed just outside show_stream's own handling: stop all the same, keep the turn.
            stream.stop()
            renderer.finish()
        except Exception as failure:  # noqa: BLE001 - reported by the face once the turn is committed
            stream.stop()
            return PresentedTurn(_finish_quietly(stream), failure)
    return PresentedTurn(stream.finish(), None)


def _finish_quietly(stream: TurnStream) -> CommittedTurn:
    try:
        return stream.finish()
    except Exception:  # noqa: BLE001 - the write failure is what gets reported
        return stream.finish()
