"""What a chat prints besides the streaming answer: notes, warnings, errors, tables, replayed turns.

Every string that came from a file, a server, the model or the user passes through
:func:`~bluelm_cli.ui.render.safe_for_terminal` before it reaches a terminal (a shared session file must
not be able to retitle, clear or recolour the user's terminal, or write their clipboard).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from bluelm_cli.chat.service import CommittedTurn
from bluelm_cli.chat.conversation import Turn
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.ui.render import render_markdown, safe_for_terminal, wants_plain_output
from bluelm_cli.ui.stats import stats_line

PROMPT = "> "
_NARROWEST_COLUMN = 24  # columns: narrower, a table's values go under their names instead of beside them


class ChatOutput:
    """The chat's console (answers, notes) and its error console (stderr in script mode)."""

    def __init__(self, console: Console, err_console: Console | None = None, *, interactive: bool = True) -> None:
        self.console = console
        self.err_console = err_console or console
        self.interactive = interactive

    def _safe(self, text: str, console: Console | None = None) -> str:
        return safe_for_terminal(text) if (console or self.console).is_terminal else text

    # ------------------------------------------------------------------------------------ lines
    # On a terminal, notes wrap at word boundaries (rich's wrapping), never mid-word as the terminal
    # would; into a pipe or a file they stay one line each, like errors and warnings everywhere.
    def note(self, text: str) -> None:
        """One dim line of information."""
        self.console.print(Text(self._safe(text), style="dim"), soft_wrap=not self.console.is_terminal)

    def side_note(self, text: str) -> None:
        """A dim line about an answer: on the console in a terminal, on stderr in script mode (stdout
        then carries only answers)."""
        console = self.console if self.interactive else self.err_console
        console.print(Text(self._safe(text, console), style="dim"), soft_wrap=not console.is_terminal)

    # Warnings and errors are messages about outside things (paths, names), never content: sanitised even
    # into a pipe or a log file, which is read on a terminal later (as the CLI's own `Error:` lines are). On a
    # terminal they wrap at word boundaries (a narrow one would cut words).
    def warn(self, message: str) -> None:
        console = self.err_console
        console.print(Text(f"Warning: {safe_for_terminal(message)}", style="yellow"), soft_wrap=not console.is_terminal)

    def error(self, message: str) -> None:
        console = self.err_console
        console.print(Text(f"Error: {safe_for_terminal(message)}", style="bold red"), soft_wrap=not console.is_terminal)

    def rows(self, rows: Sequence[tuple[str, str]]) -> None:
        """Aligned ``name  value`` lines, names in bold."""
        width = max((len(name) for name, _ in rows), default=0)
        if not self.console.is_terminal:  # a pipe or a file (script mode): one line a row, never cut at 80 columns
            for name, value in rows:
                self.console.print(Text.assemble((f"{name:<{width}}", "bold"), f"  {self._safe(value)}"), soft_wrap=True)
            return
        # On a terminal a value wraps in its own column (the terminal would run it on under the names), or,
        # where that column would be too narrow to read, on the lines under its name, indented.
        beside = self.console.width - width - 2
        for name, value in rows:
            if beside >= _NARROWEST_COLUMN:
                lines = Text(self._safe(value)).wrap(self.console, beside)
                for number, line in enumerate(lines):
                    line.rstrip()
                    label = Text(f"{name:<{width}}", "bold") if number == 0 else Text(" " * width)
                    self.console.print(Text.assemble(label, "  ", line), soft_wrap=True)
            else:
                self.console.print(Text(name, "bold"))
                for line in Text(self._safe(value)).wrap(self.console, max(1, self.console.width - 4)):
                    line.rstrip()
                    self.console.print(Text.assemble("    ", line), soft_wrap=True)

    def print_text(self, text: str) -> None:
        """Text as it is (a system prompt, a file's lines), made safe for a terminal."""
        self.console.print(Text(self._safe(text)), soft_wrap=True)

    def blank(self) -> None:
        self.console.print()

    # ------------------------------------------------------------------------------------ answers
    def show_turns(self, turns: Sequence[Turn]) -> None:
        """Replay finished turns (resume, /load) as they looked when they were answered."""
        for turn in turns:
            self.console.print(Text.assemble((PROMPT, "bold cyan"), self._safe(turn.user)))
            self.print_answer(turn.answer)
            self.finish_note(turn.finish_reason)
            self.console.print()

    def show_pending(self, message: str, how_to_send: str) -> None:
        """The last message, sent but never answered (the server failed, the process ended): it stays
        reachable, and the note says how to send it again."""
        self.console.print(Text.assemble((PROMPT, "bold cyan"), self._safe(message)))
        self.note(f"(not answered; {how_to_send})")
        self.console.print()

    def print_answer(self, text: str) -> None:
        if not text:
            self.note("(empty answer)")
        elif wants_plain_output(self.console):
            self.console.print(Text(self._safe(text)))
        else:
            render_markdown(self.console, text)

    def finish_note(self, reason: FinishReason | str) -> None:
        note = FinishReason(reason).note
        if note:
            self.side_note(note)

    def after_answer(self, committed: CommittedTurn, *, show_stats: bool) -> None:
        """What follows a streamed answer: a newline for plain output, the notes, the stats line."""
        result = committed.result
        if (not self.interactive or wants_plain_output(self.console)) and result.text and not result.text.endswith("\n"):
            self.console.file.write("\n")
            self.console.file.flush()
        if committed.journal_error:
            self.error(committed.journal_error)
        failure = result.error  # a served model that failed mid-answer (remote.stream)
        if failure:
            self.error(failure)
        if not result.text:
            self.side_note("(empty answer)")
        self.finish_note(result.finish_reason)
        if committed.dropped_turns:
            count = committed.dropped_turns
            self.side_note(
                f"(the {count} oldest turn{'s' if count != 1 else ''} no longer fit the context window and "
                f"{'were' if count != 1 else 'was'} dropped from what the model sees)"
            )
        if show_stats:
            self.side_note(stats_line(result))
        if self.interactive:
            self.console.print()
