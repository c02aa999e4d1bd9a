"""Why an answer ended: one type for the engine, the journal, the terminal and transcripts.

The values are what the journal and `bluelm ask --json` store, so they never change spelling.
"""

from __future__ import annotations

from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # the model closed its answer (</s>, or it began the next [|Human|]: turn)
    LENGTH = "length"  # max_new_tokens reached
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGHUP/SIGTERM, or a closed stream
    CONTEXT = "context"  # the context window is full
    ERROR = "error"  # the answer failed midway: a served model's server died or sent an error, or the local engine raised
    CONTENT_FILTER = "content_filter"  # a served model's answer stopped by the server's content filter
    TOOL_CALLS = "tool_calls"  # a served model asked to call a tool (bluelm runs none)

    @property
    def note(self) -> str | None:
        """The dim line shown after such an answer in the terminal (None: nothing to say)."""
        return _NOTES[self]

    @property
    def transcript_note(self) -> str | None:
        """The italic mark after such an answer in a Markdown transcript."""
        return _TRANSCRIPT_NOTES[self]

    @classmethod
    def parse(cls, value: object) -> FinishReason | None:
        """The reason named by a stored value, or None if it names none."""
        try:
            return cls(value)
        except ValueError:
            return None

    def __str__(self) -> str:
        return self.value


_NOTES: dict[FinishReason, str | None] = {
    FinishReason.STOP: None,
    FinishReason.LENGTH: "[cut off at max_new_tokens; /set max_new_tokens N allows longer answers]",
    FinishReason.INTERRUPTED: "[interrupted]",
    FinishReason.CONTEXT: "[cut off: the context window is full; /reset starts a new conversation]",
    FinishReason.ERROR: "[cut off by an error; /retry asks again]",  # the error itself is on the line before
    FinishReason.CONTENT_FILTER: "[stopped by the server's content filter]",
    FinishReason.TOOL_CALLS: "[the model asked to call a tool, which bluelm does not run]",
}
_TRANSCRIPT_NOTES: dict[FinishReason, str | None] = {
    FinishReason.STOP: None,
    FinishReason.LENGTH: "*(cut off at max_new_tokens)*",
    FinishReason.INTERRUPTED: "*(interrupted)*",
    FinishReason.CONTEXT: "*(cut off: context window full)*",
    FinishReason.ERROR: "*(cut off by an error)*",
    FinishReason.CONTENT_FILTER: "*(stopped by the server's content filter)*",
    FinishReason.TOOL_CALLS: "*(the model asked to call a tool)*",
}
