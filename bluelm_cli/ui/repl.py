"""`bluelm chat`: the prompt_toolkit loop and its keys, and a line-by-line mode for scripts.

The REPL turns keystrokes into messages for the chat service (:mod:`bluelm_cli.chat.service`) or slash commands
(:mod:`bluelm_cli.ui.commands`), streams each answer through the shared renderer and has the chat commit
it (journaled before the next prompt). It never touches tensors.

Errors inside the loop are printed as ``Error: …`` and the loop goes on; only ``/exit``, Ctrl-D (or the
end of stdin in script mode) end it.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.application.current import get_app_or_none
from prompt_toolkit.filters import Condition, is_searching
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent, merge_key_bindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.output import Output
from prompt_toolkit.utils import get_cwidth
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.text import Text

from bluelm_cli.chat.attachments import Attachment, with_attachments
from bluelm_cli.chat.background import BackgroundBackend, LoadFailed
from bluelm_cli.core.backend import AnswerResult, ModelLoading
from bluelm_cli.chat.service import Chat, TurnStream
from bluelm_cli.ui.commands import EXIT_WORDS, ChatCompleter, ExitChat, ShowAnswer, context_meter, find_command, run_command
from bluelm_cli.core.errors import BlueLMError, ExitStatus, UsageError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.ui.habits import foreign_line_hint
from bluelm_cli.ui.ending_signals import on_ending_signals
from bluelm_cli.ui.load_view import LoadView
from bluelm_cli.ui.multiline import (
    QUOTES, block_is_open, input_is_pending, is_plain_key, keys_waiting, take_burst, take_typed_ahead, unwrap_block,
)
from bluelm_cli.ui.output import PROMPT, ChatOutput
from bluelm_cli.config.paths import UserPaths, ensure_dir
from bluelm_cli.core.sanitize import safe_for_terminal
from bluelm_cli.ui.render import StreamRenderer
from bluelm_cli.config.settings import ResolvedSettings
from bluelm_cli.ui.presenter import present_turn

__all__ = ["ChatRepl", "run_chat"]

_CONTINUATION = ". "
_PROMPT_STYLE = Style.from_dict({"prompt": "bold ansicyan", "continuation": "ansibrightblack"})
def run_chat(
    chat: Chat,
    *,
    console: Console,
    paths: UserPaths,
    verbose: bool = False,
    resumed: bool = False,
    pt_input: Input | None = None,
    pt_output: Output | None = None,
    stdin: TextIO | None = None,
    err_console: Console | None = None,
    settings: ResolvedSettings | None = None,
    keep_history: bool = True,
    on_model_ready: Callable[[], None] | None = None,
    first_message: str | None = None,
) -> int:
    """Chat until /exit, Ctrl-D or end of input; returns the exit status.

    A :class:`BackgroundBackend` starts loading once the prompt is up (script mode waits for it first);
    ``on_model_ready`` then runs in this thread. A load error raises its LoadFailed (one line, status 1).

    With a terminal on stdin and stdout (or an injected ``pt_input``), this is the prompt_toolkit REPL;
    otherwise it reads one message or slash command per line from ``stdin`` and prints plain answers,
    with errors and notes on stderr. ``settings`` (as resolved at start) is what /show parameters
    reports; ``keep_history=False`` keeps the input history in memory only (--no-history).
    """
    interactive = pt_input is not None or (sys.stdin.isatty() and sys.stdout.isatty())
    if err_console is None:
        err_console = console if interactive else Console(stderr=True, highlight=False)
    out = ChatOutput(console, err_console, interactive=interactive)
    repl = ChatRepl(chat, out, paths=paths, verbose=verbose, interactive=interactive, settings=settings)
    if isinstance(chat.backend, BackgroundBackend):
        repl.loading = LoadView(chat.backend, out, on_loaded=lambda: repl.model_loaded(on_model_ready))
    for warning in chat.session.warnings:
        out.warn(warning)
    if not interactive:
        if stdin is None and sys.stdin.isatty():
            out.warn("standard output is not a terminal, so this chat reads one message per line (script mode);"
                     " run it without the pipe for the interactive prompt")
        if repl.loading is not None:
            try:
                repl.loading.wait_until_loaded()
            except KeyboardInterrupt:
                return ExitStatus.INTERRUPTED
        if first_message:
            repl.handle(first_message)
        return _script_loop(repl, stdin if stdin is not None else sys.stdin)
    repl.show_banner()
    if resumed:
        repl.show_resumed()
    prompt_session = _prompt_session(repl, pt_input, pt_output, keep_history=keep_history)
    if repl.loading is not None:
        repl.loading.attach(prompt_session)
    if first_message:  # `bluelm chat "hi"`: the first message, as if typed at the first prompt
        repl.out.console.print(Text.assemble((PROMPT, "bold cyan"), safe_for_terminal(first_message)))
        prompt_session.history.append_string(first_message)  # so ↑ brings it back, as a typed one
        try:
            repl.handle(first_message)
        except KeyboardInterrupt:
            repl.out.blank()
        except LoadFailed:
            repl.give_back(take_typed_ahead(prompt_session.input))  # typed while it waited for the model
            raise
        if repl.exit_requested:
            return repl.exit_status
    return _interactive_loop(repl, prompt_session)


class ChatRepl:
    """One chat in a terminal: the chat service, its output, and what each input line does.

    It is the :class:`~bluelm_cli.ui.commands.CommandContext` the slash commands run in.
    """

    def __init__(
        self,
        chat: Chat,
        out: ChatOutput,
        *,
        paths: UserPaths,
        verbose: bool = False,
        interactive: bool = True,
        settings: ResolvedSettings | None = None,
    ) -> None:
        self.chat = chat
        self.settings = settings
        self.attachments: list[Attachment] = []  # /file: they go with the next message
        self.out = out
        self.paths = paths
        self.verbose = verbose
        self.show_stats = verbose
        self.interactive = interactive
        self.exit_requested = False
        self.exit_status = ExitStatus.OK  # 128 + N when signal N ended the chat, as a shell reports it
        self.failures = 0  # inputs that ended in an error (script mode exits non-zero if any did)
        self._exit_warned = False
        self._gave_back = False  # give_back has printed its heading
        self.loading: LoadView | None = None  # while the model loads in the background
        self._meter: tuple[int, int] | None = None  # the toolbar's (used, limit), measured after each input

    def context_toolbar(self, width: int | None = None) -> FormattedText | None:
        """The line under the prompt: how much of the context window the conversation fills, and the session,
        fitted to `width` columns (by default the running prompt's terminal; no limit outside one)."""
        if self._meter is None:
            self.measure_context()
        if self._meter is None:
            return None
        if width is None:
            app = get_app_or_none()
            width = app.output.get_size().columns if app is not None else None
        return FormattedText([("class:bottom-toolbar.text", toolbar_text(*self._meter, self.chat.session.name, width))])

    def measure_context(self) -> None:
        """Count the conversation's tokens once (after each input), not on every redraw of the toolbar."""
        try:
            self._meter = (self.chat.context_used(), self.chat.context_limit)
        except ModelLoading:
            self._meter = None

    # ------------------------------------------------------------------------------------- output
    def show_banner(self) -> None:
        try:
            info = self.chat.backend.info()
        except ModelLoading:  # its device, dtype and context come in the "Loaded …" line
            line = Text.assemble(("BlueLM chat", "bold"), f" · {safe_for_terminal(self.chat.session.model_id)} · loading in the background")
        else:
            quantized = f", {info.quantization}" if info.quantization else ""
            line = Text.assemble(
                ("BlueLM chat", "bold"),
                f" · {safe_for_terminal(info.model_id)} · {info.device} · {info.dtype}{quantized} · {info.context_limit:,}-token context",
            )
        self.out.console.print(line)
        self.out.note(
            f"Session {self.chat.session.name} · /help for commands · Alt-Enter for a new line · Ctrl-D or /exit quits"
        )

    def model_loaded(self, then: Callable[[], None] | None = None) -> None:
        """The background load has ended well: what waited for the model runs now."""
        for warning in self.chat.check_answer_ids():
            self.out.warn(warning)
        if then is not None:
            then()
        # A system prompt given (--system, /set system) before the tokenizer was there: now it can be counted.
        if (problem := self.chat.check_system_after_load()) is not None:
            self.out.error(problem)

    def show_resumed(self) -> None:
        session = self.chat.session
        turns = session.turns
        self.out.note(f"Resumed session {session.name}: {len(turns)} earlier turn{'s' if len(turns) != 1 else ''}")
        self.out.blank()
        self.out.show_turns(turns)
        if session.pending is not None:
            self.out.show_pending(session.pending, "/retry sends it")
        if session.context_start:
            self.out.note(f"(the first {session.context_start} of these turns no longer fit the model's context)")

    def may_exit(self) -> bool:
        """False (once) while changes are not in the journal: the user is told how to keep them."""
        session = self.chat.session
        if not session.unwritten or session.flush_journal() or self._exit_warned:
            return True
        self._exit_warned = True
        what = (
            f"{session.unwritten} change{'s are' if session.unwritten != 1 else ' is'} not in the session journal"
            f" {session.journal} ({session.journal_problem})"
        )
        if self.interactive:
            self.out.warn(f"{what}; /save PATH keeps the conversation elsewhere, /exit again quits without them")
        else:
            self.out.warn(f"{what} and are lost; end the script with a /save PATH line to keep them")
        return False

    # -------------------------------------------------------------------------------------- input
    def handle(self, text: str) -> None:
        """Act on one submitted input: a message, a /command or //text. Never raises BlueLMError."""
        stripped = text.strip()
        if not stripped:
            return
        if text.rstrip() in EXIT_WORDS:  # as in `llm chat` and Python; " exit" (a leading space) sends the word
            self.exit_requested = True
            return
        try:
            try:
                self._dispatch(stripped)
            except ModelLoading:
                if self.loading is None:
                    raise
                # Nothing was done yet (what needs the model asks for it first): wait for it, then do it.
                try:
                    with self._hangup_stops_answer():
                        self.loading.wait_until_loaded()
                except KeyboardInterrupt:
                    if not self.exit_requested:  # Ctrl-C, not a hangup: say what became of the line
                        self.out.note("Not sent: Ctrl-C while it waited for the model (↑ brings the line back)")
                    raise
                except LoadFailed:
                    self.give_back(stripped)
                    raise
                self._dispatch(stripped)
        except (LoadFailed, BrokenPipeError):
            raise  # ends the chat
        except BlueLMError as exc:
            self.failures += 1
            self.out.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not end the chat and lose the conversation
            self.failures += 1
            self.out.error(f"unexpected {type(exc).__name__}: {exc}")
            if self.verbose:
                self.out.err_console.print(Text(traceback.format_exc(), style="dim"))
        finally:
            self._meter = None  # measured again when the toolbar is next drawn

    def give_back(self, text: str) -> None:
        """The model failed to load with `text` typed but not sent: print it, so that it can be sent again
        (with --no-history no ↑ would bring it back). Called again (for the lines typed ahead behind it),
        it goes on with the same list."""
        if not text.strip():
            return
        if not self._gave_back:
            self._gave_back = True
            self.out.note("Not sent, as the model did not load; what you typed:")
        self.out.print_text(text.strip("\n"))

    def _dispatch(self, stripped: str) -> None:
        if block_is_open(stripped):  # a block left open at the end of the input: it ends there
            stripped += f"\n{QUOTES}"
        if unwrap_block(stripped) != stripped:
            if unwrap_block(stripped).strip():  # an empty """ """ block sends nothing
                self._send(unwrap_block(stripped))
        elif "\n" in stripped and stripped.startswith("/") and not _names_a_command(stripped):
            self._send(stripped)  # a paste that starts with a path or `// code` is a message, sent as it is
        elif stripped.startswith("//"):
            self._send(stripped.removeprefix("/"))
        elif stripped.startswith("/"):
            outcome = run_command(self, stripped)
            if isinstance(outcome, ShowAnswer):
                self.answer(outcome.stream)
            elif isinstance(outcome, ExitChat):
                self.exit_requested = True
        elif hint := foreign_line_hint(stripped):
            raise UsageError(hint)
        else:
            self._send(stripped)

    def _send(self, message: str) -> None:
        """Send a message, with the files attached by /file before it (kept attached if it is refused)."""
        stream = self.chat.send(with_attachments(self.attachments, message))
        self.attachments.clear()
        self.answer(stream)

    # ------------------------------------------------------------------------------------- answers
    def answer(self, stream: TurnStream) -> AnswerResult:
        """Stream an answer to the screen, then commit it; Ctrl-C stops it and the partial answer is kept."""
        renderer = StreamRenderer(self.out.console, markdown=self.interactive)
        presented = present_turn(stream, renderer, interactive=self.interactive, stops_answer=self._hangup_stops_answer())
        committed, shown = presented.committed, presented.write_failure
        if isinstance(shown, BrokenPipeError):
            raise shown  # the reader went away (`| head`): the chat ends quietly, the turn is journaled
        if isinstance(shown, OSError) and self.exit_requested:
            return committed.result  # the terminal went away (SIGHUP, then EIO): the turn is journaled, the chat ends
        if shown is not None:
            raise BlueLMError(
                f"the answer could not be shown ({type(shown).__name__}: {shown}); it is kept in the session"
            )
        self.out.after_answer(committed, show_stats=self.show_stats)
        if committed.result.finish_reason is FinishReason.ERROR:
            self.failures += 1  # kept and journaled, but script mode still reports the failure
        return committed.result

    def _hangup_stops_answer(self) -> AbstractContextManager[None]:
        """While an answer streams, SIGHUP/SIGTERM stop it like Ctrl-C, so it is journaled, and then end the chat."""

        def stop_and_exit(signum: int, frame: object) -> None:
            self.exit_requested = True
            self.exit_status = 128 + signum
            raise KeyboardInterrupt

        return on_ending_signals(stop_and_exit)


def _names_a_command(text: str) -> bool:
    """Whether `text` starts with the name of one of our slash commands ("/set system\nline 2" does)."""
    name = text[1:].split(maxsplit=1)[0] if text[1:].strip() else ""
    return find_command(name) is not None


# ------------------------------------------------------------------------------------------ loops
def _interactive_loop(repl: ChatRepl, prompt_session: PromptSession[str]) -> int:
    loading = repl.loading
    with _terminal_restored(), _signals_end_the_chat(repl, prompt_session):
        while not repl.exit_requested:
            try:
                if loading is not None:
                    loading.show_events()  # what the load said while no prompt was up
                    text = prompt_session.prompt(pre_run=loading.start_after_first_draw)
                    loading.show_events()  # before the line is acted on: a load that just ended is seen first
                else:
                    text = prompt_session.prompt()
            except KeyboardInterrupt:
                if loading is not None and loading.stop_requested:
                    return ExitStatus.INTERRUPTED  # Ctrl-C on an empty line during the load
                continue  # Ctrl-C at the prompt clears the line
            except LoadFailed:
                assert loading is not None
                repl.give_back(prompt_session.default_buffer.text)  # typed at the prompt when the load failed
                repl.give_back(take_typed_ahead(prompt_session.input))
                loading.show_events()  # the warnings that came before it; raises it again
                raise
            except EOFError:
                if repl.exit_status or repl.may_exit():
                    break
                continue
            except OSError:
                if repl.exit_requested:  # the terminal went away (an SSH drop: SIGHUP, then EIO on the last redraw)
                    break
                raise
            try:
                repl.handle(text)
            except KeyboardInterrupt:
                repl.out.blank()  # Ctrl-C outside an answer (e.g. during /load): back to the prompt
            except LoadFailed:
                # The line waited for the model (handle gave it back); so may lines typed behind it.
                repl.give_back(take_typed_ahead(prompt_session.input))
                raise
            if repl.exit_requested and not repl.exit_status and not repl.may_exit():
                repl.exit_requested = False
    return repl.exit_status


def _signals_end_the_chat(repl: ChatRepl, prompt_session: PromptSession[str]) -> AbstractContextManager[None]:
    """SIGTERM/SIGHUP at the prompt end the chat through prompt_toolkit's own exit, so it puts the terminal
    back as it found it (a signal raised inside its event loop would leave echo and line editing off)."""

    def end(signum: int, frame: object) -> None:
        repl.exit_requested = True
        repl.exit_status = 128 + signum
        app = prompt_session.app
        if app.is_running and app.loop is not None:
            app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()) if app.is_running else None)

    return on_ending_signals(end)


@contextmanager
def _terminal_restored() -> Iterator[None]:
    """Whatever happens, leave the terminal's modes as the chat found them."""
    with _terminal_modes(lambda modes: modes):
        yield


@contextmanager
def _terminal_modes(change: Callable[[list], list]) -> Iterator[None]:
    """Set stdin's terminal modes to `change(current)` for the block, and put the current ones back after.
    TCSANOW throughout: never discard type-ahead. Does nothing when stdin is not a terminal, or no longer one
    (an SSH connection that dropped: termios then raises termios.error, which is no OSError)."""
    try:
        import termios
    except ImportError:
        yield
        return
    saved = None
    try:
        if sys.stdin.isatty():
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            wanted = change(saved)
            if wanted != saved:
                termios.tcsetattr(fd, termios.TCSANOW, wanted)
    except (OSError, ValueError, termios.error):
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, saved)
            except (OSError, ValueError, termios.error):
                pass


def _script_loop(repl: ChatRepl, stdin: TextIO) -> int:
    block: list[str] = []  # the lines of a """ block read so far
    try:
        for number, line in enumerate(_lines(stdin), start=1):
            if line is None:
                repl.failures += 1
                repl.out.error(f"line {number} of standard input is not valid UTF-8 and was skipped; convert it first, e.g. with iconv -t UTF-8")
                continue
            if block or block_is_open(line):
                block.append(line)
                if block_is_open("\n".join(block)):
                    continue
                line, block = "\n".join(block), []
            repl.handle(line)
            if repl.exit_requested:
                break
        if block:
            repl.handle("\n".join(block))
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    if not repl.may_exit():
        return ExitStatus.ERROR
    if repl.exit_status:
        return repl.exit_status
    return ExitStatus.ERROR if repl.failures else ExitStatus.OK


def _lines(stdin: TextIO) -> Iterator[str | None]:
    """Input lines without their line ends; None for a line that is not UTF-8 (the others still count)."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (tests): already decoded
        for line in stdin:
            yield line.rstrip("\r\n")
        return
    for data in raw:
        try:
            yield data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield None


# ---------------------------------------------------------------------------------- prompt_toolkit
def _prompt_session(
    repl: ChatRepl, pt_input: Input | None, pt_output: Output | None, *, keep_history: bool = True
) -> PromptSession[str]:
    return PromptSession(
        message=FormattedText([("class:prompt", PROMPT)]),
        prompt_continuation=lambda width, line_number, wrap_count: FormattedText(
            [("class:continuation", _CONTINUATION.rjust(width))]
        ),
        multiline=True,  # Enter is rebound to send; multi-line text still displays and edits as such
        key_bindings=merge_key_bindings([_key_bindings(), repl.loading.key_bindings()]) if repl.loading else _key_bindings(),
        history=_open_history(repl, repl.paths.history_file) if keep_history else InMemoryHistory(),
        completer=ChatCompleter(),
        complete_while_typing=True,
        search_ignore_case=True,
        enable_suspend=True,
        tempfile_suffix=".md",
        style=_PROMPT_STYLE,
        bottom_toolbar=repl.context_toolbar if repl.interactive else None,
        input=pt_input,
        output=pt_output,
    )


def _pasting_characters() -> bool:
    """The key being handled is a character and more keys wait behind it (a paste arriving as keystrokes)."""
    app = get_app()
    keys = app.key_processor.key_buffer
    return len(keys) == 1 and is_plain_key(keys[0]) and keys_waiting(app)


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter", filter=~is_searching, save_before=lambda event: not keys_waiting(event.app))
    def _send(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.apply_completion(state.current_completion)  # Enter picks the highlighted completion
            return
        if input_is_pending(event) or block_is_open(buffer.text):
            # A pasted line with more of the paste right behind it, or inside a """ block: a newline.
            buffer.insert_text("\n" + take_burst(event))
            return
        buffer.validate_and_handle()

    @bindings.add(Keys.Any, filter=~is_searching & Condition(_pasting_characters), save_before=lambda event: False)
    def _pasted(event: KeyPressEvent) -> None:
        # A character with more keys right behind it (a paste without bracketed paste): it and the rest of
        # the burst go in as one insertion, not one (a copy of the whole buffer, and an undo entry) a key.
        event.current_buffer.insert_text(event.data + take_burst(event))

    @bindings.add("c-j", filter=~is_searching)
    def _typed_ahead_line(event: KeyPressEvent) -> None:
        # A line feed: a line typed while no prompt was up (the terminal's line mode turned its Enter into
        # one), or a terminal that sends it for Enter. Each such line is sent on its own, never joined to the
        # next; what follows waits as typeahead for the next prompt.
        buffer = event.current_buffer
        if block_is_open(buffer.text):
            buffer.insert_text("\n")
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
        repl.out.warn(f"the prompt history is not kept: cannot write {path} ({reason})")
        return InMemoryHistory()
    return _SafeFileHistory(str(path), repl)


class _SafeFileHistory(FileHistory):
    """FileHistory that survives a write failure (a full disk): warned once, kept in memory from then on.
    prompt_toolkit would otherwise print a traceback and "Press ENTER to continue" mid-chat."""

    def __init__(self, filename: str, repl: ChatRepl) -> None:
        super().__init__(filename)
        self._repl = repl
        self._broken = False

    def store_string(self, string: str) -> None:
        if self._broken:
            return
        try:
            super().store_string(string)
        except OSError as exc:
            self._broken = True
            self._repl.out.warn(f"the prompt history is no longer written: {self.filename!s} ({exc.strerror or exc})")


# ------------------------------------------------------------------------------------------ the toolbar
_SHORTEST_NAME = 12  # cells: less than this of a session name is not worth the room; the meter comes first


def toolbar_text(used: int, limit: int, session: str, width: int | None) -> str:
    """The toolbar's line, at most `width` terminal cells where it can be: the context meter whole, then the
    session name, shortened in the middle (its start and its end tell sessions apart: work-2, …-review).
    Narrower, the meter loses its words (12/100 (12%)) and the name its label; narrower still, the meter
    stands alone, then loses its label, its share and its padding (12/2,048), and at last all but the share."""
    full = f" context {context_meter(used, limit)} · session {session} "
    if width is None or get_cwidth(full) <= width:
        return full
    short_meter = f" context {used:,}/{limit:,} ({100 * used // max(limit, 1)}%)"
    for prefix in (f" context {context_meter(used, limit)} · session ", f"{short_meter} · "):
        room = width - get_cwidth(prefix) - 1
        if room >= min(_SHORTEST_NAME, get_cwidth(session)):
            return f"{prefix}{_middle_cut(session, room)} "
    share = f"{100 * used // max(limit, 1)}%"
    for meter in (f"{short_meter} ", f" {used:,}/{limit:,} ({share}) ", f" {used:,}/{limit:,} ", f"{used:,}/{limit:,}", share):
        if get_cwidth(meter) <= width:
            return meter
    return ""


def _middle_cut(text: str, cells: int) -> str:
    """`text` in at most `cells` terminal cells, with "…" for what is cut from its middle."""
    if get_cwidth(text) <= cells:
        return text
    tail_room = (cells - 1) // 2
    head_room = cells - 1 - tail_room
    head, used = "", 0
    for char in text:
        if used + get_cwidth(char) > head_room:
            break
        head, used = head + char, used + get_cwidth(char)
    tail, used = "", 0
    for char in reversed(text):
        if used + get_cwidth(char) > tail_room:
            break
        tail, used = char + tail, used + get_cwidth(char)
    return f"{head}…{tail}"
