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

The terminal can change under the live region. After a resize (``terminal_resized()``, or a new size
seen at the next redraw) the lines it drew have been reflowed to the new width, so the region is
erased by the rows those lines take *now*, never more than the screen holds, and drawn afresh. After
a stop and continue (``terminal_continued()``) the lines under the cursor may be the shell's job-control
messages, so nothing is erased: the region starts again on a new line. ``release_terminal()`` erases
the region and shows the cursor around an action such as stopping the process for Ctrl-Z.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.control import Control
from rich.live import Live
from rich.markdown import CodeBlock, Markdown, UnknownElement
from rich.segment import ControlType, Segment
from rich.spinner import Spinner
from rich.text import Text

from bluelm_cli.ui.rich_live import drew_region, forget_region
from bluelm_cli.core.sanitize import safe_for_terminal

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


class _CodeBlock(CodeBlock):
    """A code block that still looks like code without colours (NO_COLOR): fenced, as it was written,
    rather than a block of text told apart from the prose only by its background colour."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not console.no_color:
            yield from super().__rich_console__(console, options)
            return
        language = "" if self.lexer_name in ("text", "default") else self.lexer_name
        yield Text(f"```{language}\n{str(self.text).rstrip(chr(10))}\n```", overflow="fold")


class BlueLMMarkdown(Markdown):
    """rich's Markdown with code blocks that stay code without colour."""

    elements = {**Markdown.elements, "fence": _CodeBlock, "code_block": _CodeBlock}


def render_markdown(console: Console, text: str, code_theme: str = "monokai") -> None:
    """Print ``text`` as Markdown in one go (what a finished stream leaves in the scrollback)."""
    if console.is_terminal:
        text = safe_for_terminal(text)
    console.print(BlueLMMarkdown(text, code_theme=code_theme))


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
        self._template = BlueLMMarkdown("", code_theme=code_theme)
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
        self._shown_widths: list[int] = []  # cells in each line of the live region as last drawn
        self._shown_size: tuple[int, int] | None = None  # the console size it was drawn for
        self._resized = False
        self._continued = False
        self._busy = 0  # > 0 while a call into the renderer is writing to the terminal
        self._when_idle: Callable[[], None] | None = None

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

    def terminal_resized(self) -> None:
        """The terminal's size changed (SIGWINCH): the next redraw erases by the reflowed shape.
        Only sets a flag, so a signal handler may call it at any point."""
        self._resized = True
        self._last_draw = -math.inf

    def terminal_continued(self) -> None:
        """The process was stopped and continued (SIGCONT): what is under the cursor may be the shell's
        now, so the next redraw erases nothing and starts on a new line. Only sets a flag."""
        self._continued = True
        self._last_draw = -math.inf

    def release_terminal(self, action: Callable[[], None]) -> None:
        """Run ``action`` (e.g. stop the process for Ctrl-Z) with the live region and spinner erased and
        the cursor shown, then take the terminal back; the region comes back at the next redraw.

        Meant for signal handlers: when the handler interrupted the renderer in the middle of writing,
        ``action`` runs as soon as that call returns, so no escape sequence is ever cut in half."""
        if self._busy:
            self._when_idle = action
            return
        self._release_now(action)

    def feed(self, delta: str) -> None:
        """Add a piece of the answer; redraws at most at the configured rate."""
        if not delta or self._finished:
            return
        self._busy += 1
        try:
            self._feed(delta)
        finally:
            self._busy -= 1
            self._run_deferred()

    def _feed(self, delta: str) -> None:
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
        self._busy += 1
        try:
            self._finish()
        finally:
            self._busy -= 1
            self._run_deferred()

    def _finish(self) -> None:
        self._finished = True
        if self._plain:
            return
        self._stop_spinner()
        self._absorb_pending()
        if self._live is not None:
            self._adapt_to_terminal()
            # An empty region makes Live's final (uncropped) refresh harmless.
            self._live.update(Text(""), refresh=False)
            self._live.stop()
            self._live = None
        if self._tail:
            self._console.print(self._block(self._tail, self._blank_line_first))
            self._committed.append(self._tail)
            self._tail = ""

    def _run_deferred(self) -> None:
        if self._busy == 0 and self._when_idle is not None:
            action, self._when_idle = self._when_idle, None
            self._release_now(action)

    def _release_now(self, action: Callable[[], None]) -> None:
        spinning = self._spinner is not None
        self._stop_spinner()  # its refresh thread would draw while the shell owns the screen
        if self._live is not None:
            self._erase_live_region()
            self._console.show_cursor(True)
        try:
            action()
        finally:
            if self._live is not None:
                self._console.show_cursor(False)
            if spinning and not self._finished and self._live is None:
                self._started = False
                self.start()

    def _adapt_to_terminal(self) -> None:
        """Before the live region is redrawn: undo what a resize or a stop did to the screen."""
        continued, self._continued = self._continued, False
        resized, self._resized = self._resized, False
        assert self._live is not None
        if not drew_region(self._live):
            return
        if continued:
            # Whatever follows the region may be the shell's ("[1]+ Stopped", "fg"): keep it all.
            forget_region(self._live)
            self._console.control(Control(ControlType.CARRIAGE_RETURN))
            self._console.line()
        elif resized or self._shown_size != (self._console.width, self._console.height):
            self._erase_live_region()

    def _erase_live_region(self) -> None:
        """Erase the region by the rows its lines take at the terminal's *current* width (a resize has
        reflowed them), but never move the cursor above the top of the screen."""
        assert self._live is not None
        if not drew_region(self._live):
            return
        width, height = self._console.width, self._console.height
        rows = sum(max(1, math.ceil(cells / width)) for cells in self._shown_widths) or 1
        up = min(rows, height) - 1
        erase_upwards = ((ControlType.CURSOR_UP, 1), (ControlType.ERASE_IN_LINE, 2)) * up
        self._console.control(Control(ControlType.CARRIAGE_RETURN, (ControlType.ERASE_IN_LINE, 2), *erase_upwards))
        forget_region(self._live)

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
        self._adapt_to_terminal()
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
        )[-max_height:]
        self._shown_widths = [Segment.get_line_length(line) for line in rendered]
        self._shown_size = (console.width, console.height)
        return _Lines(rendered)
