"""Streaming Markdown rendering of an answer that arrives as small text deltas.

The answer is split into *finished* top-level Markdown blocks, which are printed once into
the scrollback with an ordinary ``console.print``, and an unfinished tail, which is redrawn in
a transient ``rich.live.Live`` region at most ``max_refresh_per_second`` times a second. The
cost of a redraw therefore depends on the size of the tail, not of the whole answer, and the
live region is cropped to less than a screenful so that it can always be erased completely.

A prefix is committed only when it cannot render differently once more text arrives: it must
consist of complete lines and end where a further top-level block starts (CommonMark closes
every earlier top-level block at that point). Each committed chunk is rendered exactly as
``rich.markdown.Markdown`` renders those blocks inside the whole document, including the blank
line Rich puts between blocks, so the scrollback ends up identical to a one-shot render.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live

from bluelm_cli.sanitize import safe_for_terminal

__all__ = ["StreamRenderer", "render_markdown", "safe_for_terminal", "wants_plain_output"]
from rich.markdown import Markdown, UnknownElement
from rich.segment import Segment
from rich.spinner import Spinner
from rich.text import Text

__all__ = ["StreamRenderer", "render_markdown", "safe_for_terminal", "wants_plain_output"]

# Configured exactly like the parser inside rich.markdown.Markdown, so block boundaries agree.
_PARSER = MarkdownIt().enable("strikethrough").enable("table")
_FENCE_OPENER = re.compile(r" {0,3}(`{3,}|~{3,})")
_SPINNER_TEXT = "thinking…"
# Rich puts a blank line before a top-level block when the element closed just before it asks
# for one (everything but a horizontal rule), and a list, table or quote always gets one from
# its own items. An HTML comment renders as nothing but sets that state, so prefixing a chunk
# with it reproduces the one-shot spacing exactly, whatever the chunk starts with.
_BLANK_LINE_FIRST = "<!---->\n\n"


def wants_plain_output(console: Console) -> bool:
    """Whether answers should be written verbatim: no terminal, or a dumb one. NO_COLOR is not a reason:
    it means no colour, not no layout; rich's ``no_color`` console keeps bold and underline and drops colours."""
    return not console.is_terminal or console.is_dumb_terminal


def render_markdown(console: Console, text: str, code_theme: str = "monokai") -> None:
    """Print ``text`` as Markdown in one go (what a finished stream leaves in the scrollback)."""
    if console.is_terminal:
        text = safe_for_terminal(text)
    console.print(Markdown(text, code_theme=code_theme))


def _markdown(template: Markdown, markup: str, references: dict[str, Any]) -> Markdown:
    """A copy of ``template`` for ``markup`` that knows link definitions from earlier chunks."""
    # Copying skips Markdown.__init__, which builds a new MarkdownIt parser every time (slow).
    markdown = copy.copy(template)
    markdown.markup = markup
    markdown.parsed = _PARSER.parse(markup, {"references": dict(references)})
    return markdown


class _Lines:
    """Pre-rendered lines, for a live region whose height we control ourselves."""

    def __init__(self, lines: list[list[Segment]]) -> None:
        self._lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for index, line in enumerate(self._lines):
            if index:
                yield Segment.line()
            yield from line


@dataclass(frozen=True)
class _Split:
    offset: int  # text[:offset] holds finished blocks only
    blank_line_after: bool  # whether Rich puts a blank line between text[:offset] and what follows
    last_is_fence: bool  # the remaining (unfinished) block is a fenced code block


def _split(text: str) -> _Split:
    """Find the longest prefix of ``text`` made of finished top-level blocks."""
    complete = text[: text.rfind("\n") + 1]
    if not complete:
        return _Split(0, False, False)
    tokens = _PARSER.parse(complete)
    starts = [i for i, t in enumerate(tokens) if t.level == 0 and t.nesting >= 0 and t.map]
    if not starts:
        return _Split(0, False, False)
    last = tokens[starts[-1]]
    last_is_fence = last.type == "fence"
    if len(starts) < 2:
        return _Split(0, False, last_is_fence)
    assert last.map is not None
    offset = 0
    for _ in range(last.map[0]):
        offset = complete.index("\n", offset) + 1
    # Rich decides on the separating blank line from the element that closed last.
    closing = tokens[starts[-1] - 1]
    element_type = closing.type.removesuffix("_close") + "_open" if closing.nesting < 0 else closing.type
    element = Markdown.elements.get(element_type, UnknownElement)
    return _Split(offset, element.new_line, last_is_fence)


class StreamRenderer:
    """Show an answer as rich Markdown while it streams in, or verbatim in plain mode.

    Use as a context manager, or call ``start()``, ``feed()`` for every delta, then
    ``finish()`` (also after an interruption). All calls must come from one thread.
    """

    def __init__(
        self,
        console: Console,
        *,
        markdown: bool = True,
        code_theme: str = "monokai",
        max_refresh_per_second: float = 15.0,
    ) -> None:
        self._console = console
        self._plain = not markdown or wants_plain_output(console)
        self._template = Markdown("", code_theme=code_theme)
        self._interval = 0.0 if max_refresh_per_second <= 0 or math.isinf(max_refresh_per_second) else 1.0 / max_refresh_per_second
        self._committed: list[str] = []
        self._tail = ""
        self._pending: list[str] = []
        self._blank_line_first = False
        self._references: dict[str, Any] = {}
        self._spinner: Live | None = None
        self._live: Live | None = None
        self._last_draw = -math.inf
        self._started = False
        self._finished = False

    def __enter__(self) -> StreamRenderer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    @property
    def text(self) -> str:
        """Everything fed so far."""
        return "".join(self._committed) + self._tail + "".join(self._pending)

    def start(self) -> None:
        """Show a spinner until the first delta arrives (rich mode only)."""
        if self._started or self._finished:
            return
        self._started = True
        if self._plain:
            return
        # The model is silent until the first token, so only a refresh thread can animate this.
        self._spinner = Live(
            Spinner("dots", Text(_SPINNER_TEXT, style="dim")),
            console=self._console,
            transient=True,
            refresh_per_second=12.5,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._spinner.start(refresh=True)

    def feed(self, delta: str) -> None:
        """Add a piece of the answer; redraws at most at the configured rate."""
        if not delta or self._finished:
            return
        if self._console.is_terminal:
            delta = safe_for_terminal(delta)
        if self._plain:
            self._console.file.write(delta)
            self._console.file.flush()
            self._pending.append(delta)
            return
        self._pending.append(delta)
        if self._live is None:
            self._stop_spinner()
            self._live = Live(
                console=self._console,
                transient=True,
                auto_refresh=False,
                vertical_overflow="crop",
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        now = time.monotonic()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw()

    def finish(self) -> None:
        """Print whatever is not in the scrollback yet and leave the terminal clean. Idempotent."""
        if self._finished:
            return
        self._finished = True
        if self._plain:
            return
        self._stop_spinner()
        self._absorb_pending()
        if self._live is not None:
            # An empty region makes Live's final (uncropped) refresh harmless.
            self._live.update(Text(""), refresh=False)
            self._live.stop()
            self._live = None
        if self._tail:
            self._console.print(self._block(self._tail, self._blank_line_first))
            self._committed.append(self._tail)
            self._tail = ""

    def _stop_spinner(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def _absorb_pending(self) -> None:
        if self._pending:
            self._tail += "".join(self._pending)
            self._pending.clear()

    def _block(self, text: str, blank_line_first: bool) -> Markdown:
        prefix = _BLANK_LINE_FIRST if blank_line_first else ""
        return _markdown(self._template, prefix + text, self._references)

    def _draw(self) -> None:
        assert self._live is not None
        self._absorb_pending()
        split = _split(self._tail)
        if split.offset:
            chunk, self._tail = self._tail[: split.offset], self._tail[split.offset :]
            block = self._block(chunk, self._blank_line_first)
            env: dict[str, Any] = {"references": self._references}
            _PARSER.parse(chunk, env)  # later chunks may use links defined in this one
            self._blank_line_first = split.blank_line_after
            self._committed.append(chunk)
            self._live.update(self._preview(split.last_is_fence), refresh=False)
            # Printing under Live erases the region, prints the block and redraws the preview.
            self._console.print(block)
        else:
            self._live.update(self._preview(split.last_is_fence), refresh=True)

    def _preview(self, tail_is_fence: bool) -> _Lines:
        console = self._console
        max_height = max(1, console.height - 1)  # a full-height region would scroll on stop()
        tail = self._tail
        if tail_is_fence:
            # Only the last lines of a long code block can be visible; skip highlighting the rest.
            lines = tail.split("\n")
            if len(lines) > max_height + 1 and _FENCE_OPENER.match(lines[0]):
                tail = "\n".join([lines[0], *lines[-max_height:]])
        rendered = console.render_lines(
            self._block(tail, self._blank_line_first), console.options, pad=False, new_lines=False
        )
        return _Lines(rendered[-max_height:])
