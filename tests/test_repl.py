"""The chat REPL driven through prompt_toolkit (pipe input, dummy output) on the scripted fake backend.

Only what needs prompt_toolkit's own input handling is here: key bindings, bracketed paste and bursts,
Ctrl-C and Ctrl-D at the prompt, the editor, completion, history search and the history file. What a
submitted line does (messages, slash commands) is in test_commands_transcripts.py, without prompt_toolkit.

Keys are fed from a thread, a chunk at a time, and each chunk waits for an event instead of a pause:
a chunk that sends lines waits until the REPL has handled every one of them (a burst of lines typed ahead
sends several: counting one let the next chunks arrive together, "/exit" Enter and the last Ctrl-D in one
read); any other waits until prompt_toolkit has read and processed every key sent (so two chunks are never
read as one burst); and an :class:`Until` waits for what prompt_toolkit does asynchronously (completing,
loading the history, running the editor). A chat still running after the last key fails the test once
:data:`WAIT_S` has passed, and its input is closed so that it ends. The console is not a terminal, so the
whole output is compared exactly.
"""

from __future__ import annotations

import io
import select
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit import PromptSession
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.key_binding.key_processor import KeyProcessor
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.search import SearchDirection, SearchState
from rich.console import Console

import bluelm_cli.ui.repl as repl_module
from bluelm_cli.chat.service import Chat as ChatService
from bluelm_cli.ui.commands import COMMANDS, ChatCompleter
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.ui.repl import ChatRepl, run_chat
from bluelm_cli.session import Session
from bluelm_cli.testing.fakes import FakeBackend
from test_chat import new_session

BANNER = (
    "BlueLM chat · fake/BlueLM · cpu · float32 · 2,048-token context\n"
    "Session t · /help for commands · Alt-Enter for a new line · Ctrl-D or /exit quits\n"
)
WAIT_S = 30.0  # the most any one step may take on a busy machine before the test is failed


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def paths() -> UserPaths:
    return user_paths()  # under the temporary BLUELM_HOME set by conftest


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def session(paths: UserPaths) -> Session:
    return new_session(paths)


class Send(str):
    """Enter that sends the line (where the chunk alone does not say so): the next chunk waits until
    the REPL has handled it."""


@dataclass(frozen=True)
class Until:
    """Wait until the prompt's input buffer is `ready` (what prompt_toolkit does asynchronously)."""

    what: str
    ready: Callable[[Buffer], bool]


class Chat:
    """What a run of the REPL left: exit status, screen text, the session."""

    def __init__(self, status: int, out: str, session: Session) -> None:
        self.status, self.out, self.session = status, out, session

    @property
    def users(self) -> list[str]:
        return [turn.user for turn in self.session.turns]


def _lines_sent(chunk: str) -> int:
    """How many lines the REPL handles once `chunk` arrives: one per line feed (a line typed while no prompt
    was up, which the terminal's line mode ended in a line feed: a send of its own, outside a \"\"\" block),
    and one for a last Enter after text (a typed line, or the end of a burst of lines)."""
    if isinstance(chunk, Send):
        return 1
    if chunk.startswith("\x1b[200~"):
        return 0
    *typed_ahead, last = chunk.split("\n")
    return len(typed_ahead) + (last.endswith("\r") and bool(last.strip("\r")))


def chat(
    backend: FakeBackend,
    session: Session,
    paths: UserPaths,
    keys: Sequence[str | Until],
    *,
    keep_history: bool = True,
    first_message: str | None = None,
    output: Callable[[Any], Any] = lambda pipe: DummyOutput(),
) -> Chat:
    """Run the prompt_toolkit REPL on `keys` (chunks sent one by one); a final Ctrl-D ends it if nothing did.
    `output` makes the prompt's output from the pipe input (a terminal that answers on its input)."""
    console = Console(file=io.StringIO(), width=200, highlight=False)
    done = threading.Event()
    handled = threading.Semaphore(0)
    reading = threading.Event()  # prompt_toolkit has read keys it has not finished processing
    problems: list[str] = []
    prompts: list[PromptSession[str]] = []
    handle, process_keys, make_prompt = ChatRepl.handle, KeyProcessor.process_keys, repl_module._prompt_session

    def handle_and_tell(self: ChatRepl, text: str) -> None:
        try:
            handle(self, text)
        finally:
            handled.release()

    def process_and_tell(self: KeyProcessor) -> None:
        try:
            process_keys(self)
        finally:
            reading.clear()

    def prompt_and_keep(*args: Any, **kwargs: Any) -> PromptSession[str]:
        prompts.append(make_prompt(*args, **kwargs))
        return prompts[-1]

    ChatRepl.handle = handle_and_tell  # type: ignore[method-assign]
    KeyProcessor.process_keys = process_and_tell  # type: ignore[method-assign]
    repl_module._prompt_session = prompt_and_keep  # type: ignore[assignment]
    with create_pipe_input() as pipe:
        read_keys = pipe.read_keys

        def read_and_tell() -> Any:
            reading.set()  # before the read empties the pipe: "pipe empty, not reading" means processed
            return read_keys()

        pipe.read_keys = read_and_tell  # type: ignore[method-assign]

        def unread() -> bool:
            return bool(select.select([pipe.pipe.read_fd], [], [], 0)[0])

        def wait(condition: Callable[[], bool], what: str) -> bool:
            """Until `condition`; False if the chat ended first (or the step is stuck: a problem then)."""
            for _ in range(int(WAIT_S / 0.002)):
                if condition():
                    return True
                if done.wait(0.002):
                    return False
            problems.append(f"waited {WAIT_S} s for {what}")
            pipe.pipe.close_write()  # end of input: the chat ends instead of waiting for keys forever
            return False

        def feed() -> None:
            if first_message is not None and not wait(lambda: handled.acquire(blocking=False), "the first message"):
                return
            for step in [*keys, "\x04"]:
                if isinstance(step, Until):
                    if not wait(lambda: bool(prompts) and step.ready(prompts[-1].default_buffer), step.what):
                        return
                    continue
                pipe.send_text(step)
                lines = _lines_sent(step)
                for line in range(lines):  # every line it sends, so that the next chunk comes after them
                    if not wait(lambda: handled.acquire(blocking=False), f"the REPL to handle line {line + 1} of {step!r}"):
                        return
                if not lines and not wait(lambda: not unread() and not reading.is_set(), f"the keys {step!r} to be processed"):
                    return
            if not done.wait(WAIT_S):  # a chat still at a prompt after the last Ctrl-D fails the test, not hangs it
                problems.append(f"the chat did not end within {WAIT_S} s of the last key")
                pipe.pipe.close_write()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            status = run_chat(
                ChatService(backend, session), console=console, paths=paths, pt_input=pipe, pt_output=output(pipe),
                keep_history=keep_history, first_message=first_message,
            )
        finally:
            done.set()
            feeder.join()  # before the pipe closes: its descriptor number may be reused by the next test
            ChatRepl.handle = handle  # type: ignore[method-assign]
            KeyProcessor.process_keys = process_keys  # type: ignore[method-assign]
            repl_module._prompt_session = make_prompt  # type: ignore[assignment]
    assert not problems, problems
    return Chat(status, console.file.getvalue(), session)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ messages
def test_a_message_typed_at_the_prompt_is_answered(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    backend.queue("Hi there.")
    result = chat(backend, session, paths, ["hello\r", "/exit\r"])
    assert result.status == 0 and result.users == ["hello"]
    assert result.out == BANNER + "Hi there.\n\n"
    assert backend.prompt_text() == "<s>[|Human|]:hello[|AI|]:"


def test_the_message_given_on_the_command_line_is_in_the_history(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    # `bluelm chat "hello"`: as if typed at the first prompt, ↑ brings it back (the note after a Ctrl-C while
    # the model loads says so), and it is in the history file for the next chat too.
    backend.queue("Hi there.", "Hi again.")
    result = chat(backend, session, paths, ["\x1b[A", Send("\r"), "/exit\r"], first_message="hello")
    assert result.status == 0 and result.users == ["hello", "hello"]
    assert result.out == BANNER + "> hello\nHi there.\n\nHi again.\n\n"
    assert "\n+hello\n" in paths.history_file.read_text("utf-8")


def test_exit_ends_the_prompt_loop_and_ignores_what_follows(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    result = chat(backend, session, paths, ["/exit\r", "never sent\r"])
    assert result.status == 0 and result.users == [] and result.out == BANNER and backend.plans == []


def test_lines_of_nothing_but_spaces_are_ignored(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    result = chat(backend, session, paths, ["\x1b\r\x1b\r  \r", "/exit\r"])  # Alt-Enter twice, spaces, Enter
    assert result.status == 0 and result.users == [] and result.out == BANNER


def test_alt_enter_inserts_a_newline(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    backend.queue("Two lines.")
    result = chat(backend, session, paths, ["first line\x1b\rsecond line\r", "/exit\r"])
    assert result.users == ["first line\nsecond line"] and result.out == BANNER + "Two lines.\n\n"


def test_bracketed_paste_is_one_message(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    backend.queue("Pasted.")
    result = chat(backend, session, paths, ["\x1b[200~a\nb\r\nc\x1b[201~", Send("\r"), "/exit\r"])
    assert result.users == ["a\nb\nc"] and result.out == BANNER + "Pasted.\n\n"


def test_a_burst_of_lines_is_one_message(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    # What tmux paste-buffer (without -p) sends: the whole block at once, each newline an Enter (CR).
    backend.queue("One message.")
    result = chat(backend, session, paths, ["first line\rsecond line\r/third line\r", "/exit\r"])
    assert result.users == ["first line\nsecond line\n/third line"]
    assert result.out == BANNER + "One message.\n\n"  # no Error: the third line was no command


def test_two_lines_typed_ahead_in_one_read_are_two_messages(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    # Typed while no prompt was up: the terminal's line mode ended each in a line feed, and both arrive in
    # the read right before the first answer; the second waits (prompt_toolkit's typeahead) for the next prompt.
    backend.queue("One.", "Two.")
    result = chat(backend, session, paths, ["first\nsecond\n", "/exit\r"])
    assert result.status == 0 and result.users == ["first", "second"]
    assert result.out == BANNER + "One.\n\nTwo.\n\n"


class AnsweringTerminal(DummyOutput):
    """An output that, as a real terminal does, answers a cursor position request on the input at once."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def responds_to_cpr(self) -> bool:
        return True

    def get_rows_below_cursor_position(self) -> int:
        raise NotImplementedError  # as a vt100 terminal: the renderer asks by a cursor position request

    def ask_for_cpr(self) -> None:
        self.pipe.send_text("\x1b[5;1R")


def test_ctrl_l_with_a_line_and_enter_in_one_burst_sends_the_line(
    backend: FakeBackend, session: Session, paths: UserPaths
) -> None:
    # `tmux send-keys C-l '/show system' Enter`: Ctrl-L clears the screen, and the renderer asks the terminal
    # where the cursor is; its answer arrived within the burst window behind the Enter, which was then taken
    # for a pasted newline, and the next line joined `/show system`.
    backend.queue("Hi.")
    result = chat(backend, session, paths, ["hi\r", Send("\x0c/show system\r"), "/exit\r"], output=AnsweringTerminal)
    assert result.status == 0 and result.users == ["hi"]
    assert result.out == BANNER + "Hi.\n\nNo system prompt; /set system TEXT sets one.\n"


def test_enter_with_ctrl_d_right_behind_it_sends_the_line(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    # `tmux send-keys hello Enter C-d` arrives in one read. The Enter was taken for a pasted newline (a key
    # waited behind it), and Ctrl-D on the two-line buffer deleted nothing: the chat sat at "> hello" for
    # good. No paste holds a control key, so the Enter is a send, and Ctrl-D then quits at the next prompt.
    backend.queue("Hi.")
    result = chat(backend, session, paths, ["hello\r\x04"])
    assert result.status == 0 and result.users == ["hello"] and result.out == BANNER + "Hi.\n\n"


def test_typed_triple_quote_block_is_one_message(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    # Typed: every Enter arrives on its own, after the keys before it were processed, so only the quotes
    # keep the block open.
    backend.queue("A block.")
    keys = ['"""', "\r", "line one", "\r", "/line two", "\r", '"""', Send("\r"), "/exit\r"]
    result = chat(backend, session, paths, keys)
    assert result.users == ["line one\n/line two"] and result.out == BANNER + "A block.\n\n"


def test_ctrl_c_at_the_prompt_clears_the_line(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    backend.queue("Ok.")
    result = chat(backend, session, paths, ["half typed", "\x03", "ok\r", "/exit\r"])
    assert result.status == 0 and result.users == ["ok"] and result.out == BANNER + "Ok.\n\n"


def test_ctrl_d_quits(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    result = chat(backend, session, paths, ["\x04"])
    assert result.status == 0 and result.users == []
    assert result.out == BANNER  # "BlueLM chat", the model, its context and /help, and nothing else


# ------------------------------------------------------------------------------------------ input
def test_history_file_is_private_and_searchable(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    backend.queue("Noted.", "Again.")
    chat(backend, session, paths, ["remember this\r", "/exit\r"])
    history = paths.history_file
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "remember this" in history.read_text("utf-8")
    # A new chat finds it with Ctrl-R; Enter ends the search, a second Enter sends it.
    other = new_session(paths, name="t2")
    # The history loads asynchronously; the search shows (and Enter takes) the match once it has.
    search = SearchState("rememb", SearchDirection.BACKWARD, ignore_case=True)
    found = Until("the search to find it", lambda buffer: buffer.document_for_search(search).text == "remember this")
    result = chat(backend, other, paths, ["\x12rememb", found, "\r", Send("\r"), "/exit\r"])
    assert result.users == ["remember this"]
    assert result.out == BANNER.replace("Session t ", "Session t2 ") + "Again.\n\n"


def test_no_history_keeps_no_file(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    backend.queue("Kept.", "Kept again.")
    recalled = Until("Up to recall it", lambda buffer: buffer.text == "my secret")
    result = chat(backend, session, paths, ["my secret\r", "\x1b[A", recalled, Send("\r"), "/exit\r"], keep_history=False)
    assert result.users == ["my secret", "my secret"]  # Up still recalls it within the chat
    assert not paths.history_file.exists() and not paths.data_dir.exists()


def test_history_that_cannot_be_written_is_a_warning(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    paths.data_dir.parent.mkdir(parents=True, exist_ok=True)
    paths.data_dir.write_text("a file where the data directory should be")
    backend.queue("Works.")
    result = chat(backend, session, paths, ["still works\r", "/exit\r"])
    assert result.out == BANNER + (
        f"Warning: the prompt history is not kept: cannot write {paths.history_file} (cannot create directory"
        f" {paths.data_dir}: a file with that name exists; move it away)\n"
        "Works.\n\n"
    )
    assert result.users == ["still works"]


def test_ctrl_x_ctrl_e_opens_the_editor(
    backend: FakeBackend, session: Session, paths: UserPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "written in the editor\\n" > "$1"\n')
    editor.chmod(0o755)
    monkeypatch.setenv("EDITOR", str(editor))
    monkeypatch.delenv("VISUAL", raising=False)
    backend.queue("Edited.")
    edited = Until("the editor to finish", lambda buffer: buffer.text == "written in the editor")
    result = chat(backend, session, paths, ["draft", "\x18\x05", edited, Send("\r"), "/exit\r"])
    assert result.users == ["written in the editor"]


def test_completion_of_commands_settings_and_paths(tmp_path: Path) -> None:
    def complete(text: str) -> list[str]:
        return [c.text for c in ChatCompleter().get_completions(Document(text), CompleteEvent(completion_requested=True))]

    assert complete("/re") == ["/reset", "/retry"]
    assert complete("/") == [f"/{name}" for c in COMMANDS for name in (c.name, *c.aliases) if name != "?"]
    assert complete("/b") == ["/bye"] and complete("/q") == ["/quit"] and complete("/cl") == ["/clear"]
    assert complete("/co") == ["/continue", "/copy"] and complete("/fi") == ["/file"]
    assert complete("/set parameter te") == ["temperature ", "temp "] and complete("/set ver") == ["verbose"]
    assert complete("/show p") == ["parameters"]
    assert complete("/set te") == ["temperature ", "temp "]  # ollama's short form too
    assert "system " in complete("/set ")
    assert "compile " not in complete("/set ")  # only what /set can change
    assert complete("/set seed n") == ["none"]
    assert complete("/stats o") == ["on", "off"]
    (tmp_path / "saved-chat.json").write_text("{}")
    assert complete(f"/save {tmp_path}/sav") == ["ed-chat.json"]
    assert complete(f"/load {tmp_path}/sav") == ["ed-chat.json"]
    assert complete("hello /re") == [] and complete("//re") == [] and complete("/undo x") == []


def test_tab_completes_a_command(backend: FakeBackend, session: Session, paths: UserPaths) -> None:
    # Tab picks /help; the first Enter takes the completion, the second sends it.
    offered = Until("completions while typing", lambda buffer: bool(buffer.complete_state and buffer.complete_state.completions))
    picked = Until("Tab to pick /help", lambda buffer: buffer.text == "/help")
    result = chat(backend, session, paths, ["/he", offered, "\t", picked, "\r", Send("\r"), "/exit\r"])
    listing = result.out.removeprefix(BANNER)
    assert listing.startswith("/help, /?  ") and "/reset" in listing and "Error" not in result.out
