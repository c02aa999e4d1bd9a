"""`bluelm chat`: the prompt_toolkit loop, and a line-by-line mode for scripts.

The REPL turns keystrokes into messages or slash commands (see :mod:`bluelm_cli.commands`), asks the
engine for an answer after the session's active turns, shows it through the shared streaming renderer
and records the turn in the session (journaled before the next prompt). It never touches tensors.

Errors inside the loop are printed as ``Error: …`` and the loop goes on; only ``/exit``, Ctrl-D (or the
end of stdin in script mode) end it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.filters import is_searching
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import Output
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.text import Text

from bluelm_cli.clipboard import copy_to_clipboard
from bluelm_cli.commands import COMMANDS, ChatCompleter, find_command, unknown_command_message
from bluelm_cli.engine import ChatEngine, GenerationResult, GenerationStream
from bluelm_cli.errors import BlueLMError, ExitStatus
from bluelm_cli.paths import UserPaths, ensure_dir
from bluelm_cli.prompt import HistoryTurn
from bluelm_cli.render import StreamRenderer, render_markdown, safe_for_terminal, wants_plain_output
from bluelm_cli.session import Session, Turn
from bluelm_cli.settings import GENERATION_KEYS
from bluelm_cli.streaming import show_stream

__all__ = ["ChatRepl", "run_chat"]

PROMPT = "> "
_CONTINUATION = ". "
_PROMPT_STYLE = Style.from_dict({"prompt": "bold ansicyan", "continuation": "ansibrightblack"})
_KEYS_HELP = (
    "Enter sends · Alt-Enter (or Esc Enter) adds a line · a multi-line paste is one message",
    "Ctrl-R searches earlier messages · Ctrl-X Ctrl-E edits the message in $EDITOR · Tab completes",
    "Ctrl-C stops an answer or clears the line · Ctrl-D or /exit quits · //text sends a message starting with /",
)
_FINISH_NOTES = {
    "interrupted": "[interrupted]",
    "length": "[cut off at max_new_tokens; /set max_new_tokens N allows longer answers]",
    "context": "[cut off: the context window is full; /reset starts a new conversation]",
}


_HANGUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGTERM") if hasattr(signal, name))


def run_chat(
    engine: ChatEngine,
    session: Session,
    *,
    console: Console,
    paths: UserPaths,
    verbose: bool = False,
    resumed: bool = False,
    pt_input: Input | None = None,
    pt_output: Output | None = None,
    stdin: TextIO | None = None,
    err_console: Console | None = None,
) -> int:
    """Chat until /exit, Ctrl-D or end of input; returns the exit status.

    With a terminal on stdin and stdout (or an injected ``pt_input``), this is the prompt_toolkit REPL;
    otherwise it reads one message or slash command per line from ``stdin`` and prints plain answers,
    with errors on stderr.
    """
    interactive = pt_input is not None or (sys.stdin.isatty() and sys.stdout.isatty())
    if err_console is None:
        err_console = console if interactive else Console(stderr=True, highlight=False)
    repl = ChatRepl(engine, session, console=console, paths=paths, verbose=verbose,
                    interactive=interactive, err_console=err_console)
    for warning in session.warnings:
        repl.warn(warning)
    if not interactive:
        return _script_loop(repl, stdin if stdin is not None else sys.stdin)
    repl.show_banner()
    if resumed:
        repl.show_resumed()
    prompt_session = _prompt_session(repl, pt_input, pt_output)
    return _interactive_loop(repl, prompt_session)


class ChatRepl:
    """The state of one chat: engine, session, output, and what each input line does."""

    def __init__(
        self,
        engine: ChatEngine,
        session: Session,
        *,
        console: Console,
        paths: UserPaths,
        verbose: bool = False,
        interactive: bool = True,
        err_console: Console | None = None,
    ) -> None:
        self.engine = engine
        self.session = session
        self.console = console
        self.err_console = err_console or console
        self.paths = paths
        self.verbose = verbose
        self.show_stats = verbose
        self.interactive = interactive
        self.exit_requested = False

    # ------------------------------------------------------------------------------------- output
    def note(self, text: str) -> None:
        """One dim line of information."""
        self.console.print(Text(text, style="dim"), soft_wrap=True)

    def warn(self, message: str) -> None:
        self.err_console.print(Text(f"Warning: {message}", style="yellow"), soft_wrap=True)

    def error(self, message: str) -> None:
        self.err_console.print(Text(f"Error: {message}", style="bold red"), soft_wrap=True)

    def show_banner(self) -> None:
        loaded = self.engine.loaded
        dtype = str(loaded.dtype).removeprefix("torch.")
        quantized = f", {loaded.quantization}" if loaded.quantization else ""
        line = Text.assemble(
            ("BlueLM chat", "bold"),
            f" · {loaded.model_id} · {loaded.device} · {dtype}{quantized} · {self.engine.context_limit}-token context",
        )
        self.console.print(line)
        self.note(f"Session {self.session.name} · /help for commands · Alt-Enter for a new line · Ctrl-D or /exit quits")

    def show_help(self) -> None:
        width = max(len(command.usage) for command in COMMANDS)
        for command in COMMANDS:
            self.console.print(Text.assemble((f"{command.usage:<{width}}", "bold"), f"  {command.help}"))
        for line in _KEYS_HELP:
            self.note(line)

    def show_state(self) -> None:
        """/show: model, session, context, settings."""
        loaded = self.engine.loaded
        settings = self.session.sampling_settings().as_dict()
        active = len(self.session.active_turns())
        rows: list[tuple[str, str]] = [
            ("model", f"{loaded.model_id} ({loaded.device}, {str(loaded.dtype).removeprefix('torch.')})"),
            ("session", f"{self.session.name} · {len(self.session.turns)} turns, {active} in the context"),
            ("context", f"{self._context_used()} / {self.engine.context_limit} tokens in use"),
            ("system", "(unset)" if not self.session.system else repr(self.session.system)),
        ]
        rows += [(key, "(unset)" if settings[key] is None else str(settings[key])) for key in GENERATION_KEYS]
        rows.append(("stats", "on" if self.show_stats else "off"))
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            self.console.print(Text.assemble((f"{name:<{width}}", "bold"), f"  {value}"))

    def _context_used(self) -> int:
        return self.engine.history_tokens(self.session.system, _history(self.session.active_turns()))

    def show_turns(self, turns: Sequence[Turn]) -> None:
        """Replay finished turns (resume, /load) as they looked when they were answered."""
        for turn in turns:
            self.console.print(Text.assemble((PROMPT, "bold cyan"), turn.user))
            self._print_answer(turn.answer)
            self._finish_note(turn.finish_reason)
            self.console.print()

    def show_resumed(self) -> None:
        turns = self.session.turns
        self.note(f"Resumed session {self.session.name}: {len(turns)} earlier turn{'s' if len(turns) != 1 else ''}")
        self.console.print()
        self.show_turns(turns)
        if self.session.context_start:
            self.note(f"(the first {self.session.context_start} of these turns no longer fit the model's context)")

    def copy(self, text: str, what: str) -> None:
        """Put ``text`` on the clipboard through the terminal (OSC 52)."""
        try:
            copy_to_clipboard(text, self.console.file)
        except ValueError as exc:
            raise BlueLMError(str(exc)) from None
        self.note(f"Copied {what} ({len(text)} characters) to the clipboard")

    def _print_answer(self, text: str) -> None:
        if not text:
            self.note("(empty answer)")
        elif wants_plain_output(self.console):
            self.console.print(Text(safe_for_terminal(text) if self.console.is_terminal else text))
        else:
            render_markdown(self.console, text)

    def _finish_note(self, finish_reason: str) -> None:
        note = _FINISH_NOTES.get(finish_reason)
        if note:
            self.note(note)

    # -------------------------------------------------------------------------------------- input
    def handle(self, text: str) -> None:
        """Act on one submitted input: a message, a /command or //text. Never raises BlueLMError."""
        stripped = text.strip()
        if not stripped:
            return
        try:
            if stripped.startswith("//"):
                self.ask(_message(text).removeprefix("/"))
            elif stripped.startswith("/"):
                self.run_command(stripped)
            else:
                self.ask(_message(text))
        except BlueLMError as exc:
            self.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not end the chat and lose the conversation
            self.error(f"unexpected {type(exc).__name__}: {exc}")
            if self.verbose:
                self.err_console.print(Text(traceback.format_exc(), style="dim"))

    def run_command(self, line: str) -> None:
        name, _, args = line[1:].partition(" ")
        if "\n" in name:  # "/cmd" followed by more lines: still a command, the rest is its argument
            name, _, rest = name.partition("\n")
            args = f"{rest} {args}"
        command = find_command(name)
        if command is None:
            raise BlueLMError(unknown_command_message(name))
        command.run(self, args.strip())

    # ------------------------------------------------------------------------------------- answers
    def ask(self, message: str, *, retry: bool = False) -> GenerationResult:
        """Stream an answer to ``message`` and record the turn. ``retry`` replaces the last turn.

        ContextOverflowError (and any other refusal) is raised before anything is shown or recorded.
        """
        turns = self.session.active_turns()
        if retry and turns and turns[-1] is self.session.turns[-1]:
            turns = turns[:-1]
        stream = self.engine.stream(self.session.system, _history(turns), message, self.session.sampling_settings())
        if retry:  # only now that the new answer has really started
            try:
                self.session.pop_last_for_retry()
            except BlueLMError as exc:  # removed in memory; only the journal failed
                self.error(str(exc))
        result = self._show(stream)
        self._record(message, result)
        if not self.interactive or wants_plain_output(self.console):
            if result.text and not result.text.endswith("\n"):
                self.console.file.write("\n")
                self.console.file.flush()
        if not result.text:
            self.note("(empty answer)")
        self._finish_note(result.finish_reason)
        if result.dropped_turns:
            count = result.dropped_turns
            self.note(
                f"(the {count} oldest turn{'s' if count != 1 else ''} no longer fit the context window and "
                f"{'were' if count != 1 else 'was'} dropped from what the model sees)"
            )
        if self.show_stats:
            self.note(_stats_line(result))
        if self.interactive:
            self.console.print()
        return result

    def _show(self, stream: GenerationStream) -> GenerationResult:
        """Stream the answer to the screen; Ctrl-C stops it and the partial answer is returned."""
        renderer = StreamRenderer(self.console, markdown=self.interactive)
        with self._hangup_stops_answer():
            try:
                renderer.start()
                return show_stream(stream, renderer)
            except KeyboardInterrupt:
                # Ctrl-C landed just outside show_stream's own handling: stop all the same, keep the turn.
                stream.stop()
                renderer.finish()
                return stream.finish()
            except OSError:
                # The terminal went away (a dropped SSH connection): the answer so far is still recorded.
                stream.stop()
                return stream.finish()

    @contextmanager
    def _hangup_stops_answer(self) -> Iterator[None]:
        """While an answer streams, SIGHUP/SIGTERM stop it like Ctrl-C, so it is journaled, and then end the chat."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop_and_exit(signum: int, frame: object) -> None:
            self.exit_requested = True
            raise KeyboardInterrupt

        previous = {signum: signal.signal(signum, stop_and_exit) for signum in _HANGUP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _record(self, message: str, result: GenerationResult) -> None:
        turn = Turn(
            user=message,
            answer=result.text,
            answer_ids=list(result.answer_ids),
            finish_reason=result.finish_reason,
        )
        try:
            self.session.add_turn(turn)
        except BlueLMError as exc:  # the turn is kept in memory; only the journal failed
            self.error(str(exc))
        self.session.drop_oldest(result.dropped_turns)


# ------------------------------------------------------------------------------------------ loops
def _interactive_loop(repl: ChatRepl, prompt_session: PromptSession[str]) -> int:
    while not repl.exit_requested:
        try:
            text = prompt_session.prompt()
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            break
        try:
            repl.handle(text)
        except KeyboardInterrupt:
            repl.console.print()  # Ctrl-C outside an answer (e.g. during /load): back to the prompt
    return ExitStatus.OK


def _script_loop(repl: ChatRepl, stdin: TextIO) -> int:
    try:
        for line in stdin:
            repl.handle(line.rstrip("\r\n"))
            if repl.exit_requested:
                break
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    return ExitStatus.OK


def _message(text: str) -> str:
    """The message as typed, without the blank lines and spaces around it."""
    return text.strip()


def _stats_line(result: GenerationResult) -> str:
    return (
        f"{result.new_tokens} tokens · first token {result.ttft_s * 1000:.0f} ms · {result.decode_tok_s:.1f} tokens/s"
        f" · context {result.context_tokens}/{result.context_limit}"
    )


# ---------------------------------------------------------------------------------- prompt_toolkit
def _prompt_session(repl: ChatRepl, pt_input: Input | None, pt_output: Output | None) -> PromptSession[str]:
    return PromptSession(
        message=FormattedText([("class:prompt", PROMPT)]),
        prompt_continuation=lambda width, line_number, wrap_count: FormattedText(
            [("class:continuation", _CONTINUATION.rjust(width))]
        ),
        multiline=True,  # Enter is rebound to send; multi-line text still displays and edits as such
        key_bindings=_key_bindings(),
        history=_open_history(repl, repl.paths.history_file),
        completer=ChatCompleter(),
        complete_while_typing=True,
        search_ignore_case=True,
        enable_suspend=True,
        tempfile_suffix=".md",
        style=_PROMPT_STYLE,
        input=pt_input,
        output=pt_output,
    )


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter", filter=~is_searching)
    def _send(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.apply_completion(state.current_completion)  # Enter picks the highlighted completion
            return
        buffer.validate_and_handle()

    @bindings.add("escape", "enter", filter=~is_searching)
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("c-x", "c-e")
    def _edit(event: KeyPressEvent) -> None:
        # Unlike bash, come back to the prompt with the edited text rather than sending it unseen.
        event.current_buffer.open_in_editor(validate_and_handle=False)

    return bindings


def _open_history(repl: ChatRepl, path: Path) -> History:
    """The prompt history file, private to the user (0600); in memory only if it can't be created."""
    try:
        ensure_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)  # also tightens a file created by an older version
    except (OSError, BlueLMError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        repl.warn(f"the prompt history is not kept: cannot write {path} ({reason})")
        return InMemoryHistory()
    return FileHistory(str(path))


def _history(turns: Sequence[Turn]) -> list[HistoryTurn]:
    """What the engine needs of the recorded turns: user text and the answer's generated ids."""
    return [HistoryTurn(turn.user, turn.answer_ids, turn.answer) for turn in turns]
