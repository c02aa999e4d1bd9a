"""Messages and slash commands in the chat REPL, as exact transcripts on the scripted fake backend.

Each test drives :meth:`ChatRepl.handle` (what the prompt hands over for one submitted input) or script
mode (``run_chat`` with a StringIO stdin) and compares the whole output, the journal and the prompts the
backend was sent. No prompt_toolkit input, no model, no sleeps: what needs prompt_toolkit's own key
handling is in test_repl.py. The few facts only a real model shows (its cache, its info, its timings,
stopping it mid-answer) are checked at the end with a tiny real checkpoint, still without prompt_toolkit.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.cells import cell_len
from rich.console import Console

from bluelm_cli.chat.service import Chat
from bluelm_cli.ui.clipboard import MAX_OSC52_BYTES, copy_to_clipboard, osc52_sequence
from bluelm_cli.ui.commands import COMMANDS, code_blocks
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.local.loading import load_model
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.ui.repl import ChatRepl, run_chat
from bluelm_cli.session import Session, Turn
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint
from bluelm_cli.testing.fakes import CharEncoder, FakeBackend, FakeStream, Scripted
from test_chat import CUT, journal, new_session, run_script
from test_habits import repl_for


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()  # under the temporary BLUELM_HOME set by conftest


def users(chat: Chat) -> list[str]:
    return [turn.user for turn in chat.session.turns]


def stats(backend: FakeBackend, index: int, new: int, finish: str = "") -> str:
    """The stats line of the fake's `index`-th answer (fixed timings: 50 ms to the first token, 100 tokens/s)."""
    prompt = len(backend.plans[index].ids)
    return (f"{prompt} prompt tokens (0 reused) · {new} new · first token 50 ms · prefill {prompt * 20} tokens/s"
            f" · decode 100.0 tokens/s"
            f" · context {prompt + new + 1}/2,048{finish}")


# ------------------------------------------------------------------------------------------ messages
def test_a_message_streams_and_is_journaled(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hello there, friend.")
    chat = Chat(backend, new_session(paths, max_new_tokens="8"))
    repl, screen = repl_for(chat, paths)
    repl.handle("hello")
    assert screen.getvalue() == f"Hello th\n{CUT}\n\n"
    assert backend.prompt_text() == "<s>[|Human|]:hello[|AI|]:"
    turns = [r for r in journal(chat.session) if r["type"] == "turn"]
    assert [(r["user"], r["answer"]) for r in turns] == [("hello", "Hello th")]
    assert turns[0]["answer_ids"] == chat.session.turns[0].answer_ids == CharEncoder().encode_plain("Hello th")
    assert turns[0]["finish_reason"] == "length"


def test_multi_turn_sends_the_history(paths: UserPaths) -> None:
    backend = FakeBackend().queue("One.", "Two.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle("one")
    repl.handle("two")
    assert screen.getvalue() == "One.\n\nTwo.\n\n"
    assert users(chat) == ["one", "two"]
    assert backend.prompt_text(1) == "<s>[|Human|]:one[|AI|]:One.</s>[|Human|]:two[|AI|]:"


@pytest.mark.parametrize("text", ["", "   ", "\n\n  "], ids=["empty", "spaces", "newlines"])
def test_empty_or_whitespace_message_is_ignored(paths: UserPaths, text: str) -> None:
    backend = FakeBackend()
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle(text)
    assert screen.getvalue() == "" and users(chat) == [] and backend.plans == [] and repl.failures == 0


def test_huge_paste_is_refused_with_its_token_count(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hi.", "After.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    paste = "word " * 20_000  # 100k characters
    repl.handle("hi")
    repl.handle(paste)
    repl.handle("after")
    tokens = len(paste.strip())  # one id per character
    # 2048 - 512 for the answer, less <s> and the message's two tags (older turns would be dropped to fit).
    assert screen.getvalue() == (
        "Hi.\n\n"
        f"Error: the message is {tokens:,} tokens but at most 1,533 fit in the context window (with room for the"
        " answer); shorten it or lower max_new_tokens\n"
        "After.\n\n"
    )
    assert users(chat) == ["hi", "after"]  # refused, not recorded; the conversation went on
    assert len(backend.plans) == 2


class _FailingOnce(FakeBackend):
    """The fake backend, except that its first stream() fails as a bug would."""

    def stream(self, plan: Any, settings: Any) -> FakeStream:
        if not self.plans:
            self.plans.append(plan)
            raise RuntimeError("boom")
        return super().stream(plan, settings)


def test_an_unexpected_error_does_not_end_the_chat(paths: UserPaths) -> None:
    backend = _FailingOnce().queue("Second.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle("first")
    repl.handle("second")
    assert screen.getvalue() == "Error: unexpected RuntimeError: boom\nSecond.\n\n"
    assert users(chat) == ["second"] and repl.failures == 1
    assert backend.prompt_text() == "<s>[|Human|]:second[|AI|]:"


class _InterruptingStream:
    """A fake stream on which the consumer sees Ctrl-C (KeyboardInterrupt) at its `after`-th delta."""

    def __init__(self, stream: FakeStream, after: int) -> None:
        self._stream, self._after, self._seen = stream, after, 0

    def __iter__(self) -> _InterruptingStream:
        return self

    def __next__(self) -> str:
        self._seen += 1
        if self._seen == self._after:
            raise KeyboardInterrupt
        return next(self._stream)

    def stop(self) -> None:
        self._stream.stop()

    @property
    def result(self) -> Any:
        return self._stream.result

    def finish(self) -> Any:
        return self._stream.finish()


class _InterruptedBackend(FakeBackend):
    def stream(self, plan: Any, settings: Any) -> Any:
        return _InterruptingStream(super().stream(plan, settings), after=3)


def test_ctrl_c_during_an_answer_keeps_the_partial_answer(paths: UserPaths) -> None:
    backend = _InterruptedBackend().queue(Scripted("one two three four five", chunk=4))
    chat = Chat(backend, new_session(paths, max_new_tokens="1000"))
    repl, screen = repl_for(chat, paths)
    repl.handle("tell me a long story")
    assert screen.getvalue() == "one two \n[interrupted]\n\n"
    (turn,) = chat.session.turns
    assert (turn.user, turn.answer, turn.finish_reason) == ("tell me a long story", "one two ", FinishReason.INTERRUPTED)
    assert turn.answer_ids == CharEncoder().encode_plain("one two ")
    assert [r["finish_reason"] for r in journal(chat.session) if r["type"] == "turn"] == ["interrupted"]
    assert repl.failures == 0 and not repl.exit_requested  # the chat goes on


def test_dropped_turns_are_announced(paths: UserPaths) -> None:
    # As in test_chat: a budget of 80 - 10 fits three exchanges of 23 ids but not four (see there).
    backend = FakeBackend(context_limit=80).queue("a" * 10, "b" * 10, "c" * 10, "d" * 10)
    chat = Chat(backend, new_session(paths, max_new_tokens="10"))
    repl, screen = repl_for(chat, paths)
    for number in range(4):
        repl.handle(f"question {number}")
    assert screen.getvalue() == (
        "aaaaaaaaaa\n\n"
        "bbbbbbbbbb\n\n"
        "cccccccccc\n\n"
        "dddddddddd\n"
        "(the 2 oldest turns no longer fit the context window and were dropped from what the model sees)\n\n"
    )
    # Half the history's tokens go in one block (core.prompt.DROP_BLOCK_FRACTION), not just the one turn that would fit.
    assert len(chat.session.turns) == 4 and chat.session.context_start == 2
    assert [r["count"] for r in journal(chat.session) if r["type"] == "drop"] == [2]
    assert backend.prompt_text().startswith("<s>[|Human|]:question 2[|AI|]:")


# ------------------------------------------------------------------------------------------ commands
def test_rows_in_script_mode_are_one_line_each(paths: UserPaths) -> None:
    # Piped (`bluelm chat < script`), /show info's long quantization row was cut at 80 columns mid-phrase.
    screen = io.StringIO()
    out = ChatOutput(Console(file=screen, width=80), interactive=False)
    value = "GPTQ-for-LLaMa v1 (BlueLM-7B-Chat-4bits), 4-bit, group 128, kept 4-bit, computing in float32"
    out.rows([("model", "m"), ("quantization", value)])
    assert screen.getvalue() == f"model         m\nquantization  {value}\n"


@pytest.mark.parametrize("width", [80, 50])
def test_help_in_a_narrow_terminal_keeps_its_columns(paths: UserPaths, width: int) -> None:
    # The terminal used to wrap each long row at its edge, so a description ran on under the command names
    # ("/copy [N]        Copy the" / "last answer, …"). Now it wraps in its own column, or, where that column
    # would be too narrow, under the name, indented.
    screen = io.StringIO()
    # (a height too: rich takes TERM=unknown, as the tests set it, for a dumb 80x25 terminal otherwise)
    console = Console(file=screen, width=width, height=25, force_terminal=True, color_system=None)
    repl = ChatRepl(Chat(FakeBackend(), new_session(paths)), ChatOutput(console, interactive=True), paths=paths)
    repl.handle("/help")
    lines = screen.getvalue().splitlines()
    assert [line for line in lines if cell_len(line) > width] == []
    copy_row = lines.index(next(line for line in lines if line.startswith("/copy [N]")))
    if width == 80:  # the names take 40 columns: the descriptions wrap in the 38 beside them
        assert lines[copy_row : copy_row + 3] == [
            "/copy [N]                                Copy the last answer, or its N-th code",
            "                                         block, to the clipboard.",
            "/stats on|off                            Show tokens, time to first token and",
        ]
    else:
        assert lines[copy_row] == "/copy [N]"
        assert lines[copy_row + 1].startswith("    Copy the last answer,")
        assert all(line.startswith("    ") for line in lines[copy_row + 1 : lines.index("/stats on|off")])


def test_help_lists_every_command_from_the_table(paths: UserPaths) -> None:
    repl, screen = repl_for(Chat(FakeBackend(), new_session(paths)), paths, width=200)
    repl.handle("/help")
    assert screen.getvalue() == (
        "/help, /?                                List the commands and keys.\n"
        "/reset, /clear                           Start a new conversation in a new session; settings are kept.\n"
        "/save [PATH]                             Save the conversation: JSON, or a Markdown transcript for .md.\n"
        "/load PATH                               Load a conversation saved with /save into a new session.\n"
        "/retry                                   Answer the last message again.\n"
        "/continue                                Go on with an answer that was cut off or interrupted.\n"
        "/file PATH                               Put a text file into your next message (/file clear drops it).\n"
        "/undo                                    Remove the last exchange.\n"
        "/set [KEY VALUE]                         Change a sampling setting or the system prompt; alone: list them.\n"
        "/show [info|parameters|system|template]  Settings and context used; info: the model; parameters: with"
        " sources; system: the prompt; template: the chat format.\n"
        "/copy [N]                                Copy the last answer, or its N-th code block, to the clipboard.\n"
        "/stats on|off                            Show tokens, time to first token and speed after each answer.\n"
        "/exit, /quit, /bye                       Quit (Ctrl-D, or exit or quit alone, too).\n"
        'Enter sends · Alt-Enter (or Esc Enter) adds a line · a multi-line paste is one message · """ starts and'
        " ends a block\n"
        "Ctrl-R searches earlier messages · Ctrl-X Ctrl-E edits the message in $EDITOR · Tab completes\n"
        "Ctrl-C stops an answer or clears the line · Ctrl-D, /exit, or exit or quit alone quits\n"
        '//text sends a message starting with / · " exit" (a leading space) or """exit""" sends the word exit\n'
    )
    for command in COMMANDS:  # the table, not the literal above, is what /help reads
        assert command.usage in screen.getvalue() and command.help in screen.getvalue()


def test_unknown_command_gets_a_hint_and_is_not_sent(paths: UserPaths) -> None:
    backend = FakeBackend()
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle("/rset")
    repl.handle("/zzzz")
    assert screen.getvalue() == (
        "Error: unknown command /rset; did you mean /reset? (/help lists them; //rset sends it as a message)\n"
        "Error: unknown command /zzzz (/help lists them; //zzzz sends it as a message)\n"
    )
    assert users(chat) == [] and backend.plans == [] and repl.failures == 2


def test_double_slash_sends_a_message_starting_with_a_slash(paths: UserPaths) -> None:
    backend = FakeBackend().queue("A hosts file.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle("//etc/hosts is what?")
    assert screen.getvalue() == "A hosts file.\n\n"
    assert users(chat) == ["/etc/hosts is what?"]
    assert backend.prompt_text() == "<s>[|Human|]:/etc/hosts is what?[|AI|]:"


def test_reset_keeps_settings(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hi.", "Fresh.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    for line in ("/set temperature 0.5", "hi", "/reset", "again"):
        repl.handle(line)
    assert screen.getvalue() == (  # /reset: a new session; the first one keeps "hi"
        f"temperature = 0.5\nHi.\n\nNew session {chat.session.name}; settings kept. The earlier turns stay in session t"
        " (bluelm chat --resume t).\nFresh.\n\n"
    )
    assert users(chat) == ["again"] and chat.session.sampling["temperature"] == 0.5
    assert backend.prompt_text() == "<s>[|Human|]:again[|AI|]:" and backend.settings[-1].temperature == 0.5
    repl.handle("/reset")
    assert chat.session.turns == [] and chat.session.sampling["temperature"] == 0.5


def test_retry_replaces_the_last_answer(paths: UserPaths) -> None:
    backend = FakeBackend().queue("First.", "Second.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    for line in ("/retry", "question", "/retry"):
        repl.handle(line)
    assert screen.getvalue() == "Error: nothing to retry yet; send a message first\nFirst.\n\nSecond.\n\n"
    assert [(t.user, t.answer) for t in chat.session.turns] == [("question", "Second.")]
    assert backend.prompt_text(1) == backend.prompt_text(0) == "<s>[|Human|]:question[|AI|]:"
    assert [r["type"] for r in journal(chat.session)][-3:] == ["turn", "undo", "turn"]


def test_undo_drops_the_last_exchange(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("One.", "Two."), new_session(paths))
    repl, screen = repl_for(chat, paths)
    for line in ("one", "two", "/undo"):
        repl.handle(line)
    assert screen.getvalue() == "One.\n\nTwo.\n\nRemoved the last exchange (“two”)\n"
    assert users(chat) == ["one"] and [r["type"] for r in journal(chat.session)][-1] == "undo"
    repl, screen = repl_for(Chat(FakeBackend(), new_session(paths, "empty")), paths)
    repl.handle("/undo")
    assert screen.getvalue() == "Error: nothing to undo; the conversation is empty\n"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("/set temperature 5", "Error: temperature must be a number from 0 to 2 (0 = greedy), got '5'"),
        ("/set top_p 0", "Error: top_p must be a number greater than 0 and at most 1, got '0'"),
        ("/set max_new_tokens lots", "Error: max_new_tokens must be a whole number of at least 1, got 'lots'"),
        ("/set temprature 1", "Error: unknown setting 'temprature'; did you mean temperature?; /set can change: "
                              "max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system"),
        ("/set device cpu", "Error: device can't be changed in a running chat; restart with --device (settings /set"
                            " can change: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system)"),
        ("/set temperature", "Error: usage: /set temperature T; temperature must be a number from 0 to 2 (0 = greedy)"),
    ],
)
def test_invalid_set_values_name_the_valid_range(paths: UserPaths, command: str, message: str) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    before = dict(chat.session.sampling)
    repl, screen = repl_for(chat, paths)
    repl.handle(command)
    assert screen.getvalue() == message + "\n"
    assert chat.session.sampling == before and [r["type"] for r in journal(chat.session)] == ["start"]


def test_a_long_system_prompt_is_not_echoed_whole(paths: UserPaths) -> None:
    # `/set system <a page of instructions>` printed the page back in quotes, and /show printed it again;
    # both now show its start and its length, and /show system the whole of it.
    system = "Answer as a careful reviewer. " * 20
    chat = Chat(FakeBackend(), new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    for line in (f"/set system {system}", "/show"):
        repl.handle(line)
    shown = "'Answer as a careful reviewer. Answer as a careful reviewer. …' (599 characters; /show system shows it all)"
    assert chat.session.system == system.strip()
    assert screen.getvalue().splitlines()[0] == f"system = {shown}"
    assert f"system              {shown}" in screen.getvalue().splitlines()
    screen.truncate(0), screen.seek(0)
    repl.handle("/show system")
    assert system.strip() in screen.getvalue()


def test_set_system_and_show(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hi.")
    chat = Chat(backend, new_session(paths, temperature="0", max_new_tokens="8"))
    repl, screen = repl_for(chat, paths)
    for line in ("/set system You are terse.", "hi", "/show"):
        repl.handle(line)
    assert chat.session.system == "You are terse."
    # Context used = the conversation so far, closing </s> included: what the stats line reports too.
    used = 1 + len(CharEncoder().encode_plain("You are terse.[|Human|]:hi[|AI|]:")) + len("Hi.") + 1
    assert used == 23
    assert screen.getvalue() == (
        "system = 'You are terse.'\n"
        "Hi.\n\n"
        "model               fake/BlueLM (cpu, float32)\n"
        "session             t · 1 turn, 1 in the context\n"
        "context             23 / 2,048 tokens in use (1%)\n"
        "system              'You are terse.'\n"
        "max_new_tokens      8\n"
        "temperature         0.0\n"
        "top_p               0.9\n"
        "top_k               0\n"
        "repetition_penalty  1.1\n"
        "seed                (unset)\n"
        "stats               off\n"
    )
    assert backend.prompt_text() == "<s>You are terse.[|Human|]:hi[|AI|]:"


def test_stats_line(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Quiet answer", "Loud answer", "Calm answer")
    chat = Chat(backend, new_session(paths, max_new_tokens="8"))
    repl, screen = repl_for(chat, paths)
    for line in ("quiet", "/stats on", "loud", "/stats off", "calm"):
        repl.handle(line)
    assert screen.getvalue() == (
        f"Quiet an\n{CUT}\n\n"
        "Stats on\n"
        f"Loud ans\n{CUT}\n{stats(backend, 1, 8, ' · finish: length')}\n\n"
        "Stats off\n"
        f"Calm ans\n{CUT}\n\n"
    )
    backend = FakeBackend().queue("x")
    repl, screen = repl_for(Chat(backend, new_session(paths, "v")), paths, verbose=True)
    repl.handle("x")
    prompt = len(backend.plans[0].ids)  # one token: no decode speed, which needs an interval between two
    assert screen.getvalue() == (
        f"x\n{prompt} prompt tokens (0 reused) · 1 new · first token 50 ms · prefill {prompt * 20} tokens/s"
        f" · context {prompt + 2}/2,048\n\n"
    )


def test_save_json_and_markdown(paths: UserPaths, tmp_path: Path) -> None:
    target = tmp_path / "chat.md"
    chat = Chat(FakeBackend().queue("Hello!"), new_session(paths, max_new_tokens="8"))
    repl, screen = repl_for(chat, paths, width=300)
    for line in ("hello", "/save", f"/save {target}"):
        repl.handle(line)
    default = paths.sessions_dir / "t.json"
    assert screen.getvalue() == f"Hello!\n\nSaved to {default}\nSaved to {target}\n"
    saved = json.loads(default.read_text("utf-8"))
    assert saved["model_id"] == "fake/BlueLM" and saved["turns"][0]["user"] == "hello"
    assert saved["turns"][0]["answer"] == "Hello!" and saved["sampling"]["max_new_tokens"] == 8
    assert "**You:**" in target.read_text("utf-8")


def test_save_never_replaces_a_file_bluelm_did_not_write(paths: UserPaths, tmp_path: Path) -> None:
    # `/save notes.md` over the user's own notes (or, as root, `/save /etc/passwd`) must not clobber them;
    # an earlier /save of a chat (JSON or Markdown) and an empty file are replaced as before.
    notes = tmp_path / "notes.md"
    notes.write_text("my own notes\n")
    data = tmp_path / "data.json"
    data.write_text('{"format": "something-else"}\n')
    earlier_json, earlier_md, empty = tmp_path / "chat.json", tmp_path / "chat.md", tmp_path / "empty.json"
    empty.touch()
    chat = Chat(FakeBackend().queue("Hi."), new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    for line in ("hi", f"/save {notes}", f"/save {data}", f"/save {earlier_json}", f"/save {earlier_md}",
                 f"/save {earlier_json}", f"/save {earlier_md}", f"/save {empty}"):
        repl.handle(line)
    assert screen.getvalue() == (
        "Hi.\n\n"
        f"Error: cannot save to {notes}: it exists and bluelm did not write it; choose another name, or remove it first\n"
        f"Error: cannot save to {data}: it exists and bluelm did not write it; choose another name, or remove it first\n"
        f"Saved to {earlier_json}\nSaved to {earlier_md}\nSaved to {earlier_json}\nSaved to {earlier_md}\nSaved to {empty}\n"
    )
    assert notes.read_text() == "my own notes\n" and data.read_text() == '{"format": "something-else"}\n'
    assert json.loads(empty.read_text("utf-8"))["turns"][0]["user"] == "hi"
    assert users(chat) == ["hi"]


def test_save_to_a_missing_directory_fails_and_the_chat_goes_on(paths: UserPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "chat.json"
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    chat = Chat(FakeBackend().queue("Hi.", "More."), new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    for line in ("hi", f"/save {missing}", f"/save {not_a_dir}/chat.json", "more"):
        repl.handle(line)
    assert screen.getvalue() == (
        "Hi.\n\n"
        f"Error: cannot save to {missing}: {missing.parent} does not exist; create it or choose another path\n"
        f"Error: cannot save to {not_a_dir}/chat.json: {not_a_dir} is not a directory; create it or choose another path\n"
        "More.\n\n"
    )
    assert users(chat) == ["hi", "more"] and not missing.parent.exists()


def test_failed_save_leaves_an_existing_file_untouched(
    paths: UserPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.json"
    target.write_text("# BlueLM chat: an earlier transcript\n")

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bluelm_cli.chat.transcript.os.replace", full_disk)
    chat = Chat(FakeBackend().queue("Hi."), new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    repl.handle("hi")
    repl.handle(f"/save {target}")
    assert screen.getvalue() == f"Hi.\n\nError: cannot save to {target} (No space left on device); the existing file, if any, is unchanged\n"
    assert target.read_text() == "# BlueLM chat: an earlier transcript\n" and list(tmp_path.iterdir()) == [target]
    assert users(chat) == ["hi"]


def test_load_replaces_the_conversation_and_warns_about_another_model(paths: UserPaths, tmp_path: Path) -> None:
    old = Session(name="old", model_id="vivo-ai/BlueLM-7B-Base", system="be kind",
                  turns=[Turn("old question", "old answer", CharEncoder().encode_plain("old answer"))])
    saved = old.save(tmp_path / "old.json")
    backend = FakeBackend().queue("Current.", "Follow-up.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    for line in ("current", f"/load {saved}", "follow-up"):
        repl.handle(line)
    assert screen.getvalue() == (
        "Current.\n\n"
        f"Warning: {saved} was saved with vivo-ai/BlueLM-7B-Base; continuing with fake/BlueLM\n"
        f"Loaded 1 turn from {saved} into new session {chat.session.name}. The earlier turns stay in session t"
        " (bluelm chat --resume t).\n"
        "> old question\n"
        "old answer\n\n"  # replayed on screen
        "Follow-up.\n\n"
    )
    assert users(chat) == ["old question", "follow-up"] and chat.session.system == "be kind"
    assert chat.session.model_id == "fake/BlueLM"
    assert backend.prompt_text() == "<s>be kind[|Human|]:old question[|AI|]:old answer</s>[|Human|]:follow-up[|AI|]:"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "Error: no such file: {path}; check the path"),
        ("{not json", "Error: {path} is not a bluelm session (not valid JSON); load a file saved with /save"),
        ('{"hello": "world"}', "Error: {path} is not a bluelm session file; load a file saved with /save"),
        ('{"format": "bluelm-cli.session", "version": 1, "model_id": "m", "turns": [{"user": 1}]}',
         "Error: {path} is a damaged bluelm session (a turn lacks its user or answer text); it cannot be loaded"),
    ],
    ids=["missing", "corrupt", "foreign", "damaged"],
)
def test_bad_load_leaves_the_conversation_untouched(paths: UserPaths, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    chat = Chat(FakeBackend().queue("Kept."), new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    for line in ("keep me", f"/load {path}", "/load"):
        repl.handle(line)
    assert screen.getvalue() == (
        "Kept.\n\n"
        f"{message.format(path=path)}\n"
        "Error: usage: /load PATH (a session saved with /save as .json)\n"
    )
    assert users(chat) == ["keep me"] and repl.failures == 2


def test_copy_uses_osc52(paths: UserPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TMUX", raising=False)  # no tmux or screen wrapping around the sequence
    monkeypatch.setenv("TERM", "xterm-256color")
    answer = "Use this:\n\n```python\nprint('hi')\n```\n\nor this:\n\n```sh\necho hi\n```\n"
    saved = Session(name="c", model_id="fake/BlueLM", turns=[Turn("q", answer, [7])]).save(tmp_path / "c.json")
    repl, screen = repl_for(Chat(FakeBackend(), new_session(paths)), paths, width=300)
    for line in ("/copy", f"/load {saved}", "/copy", "/copy 2", "/copy 3"):
        repl.handle(line)
    assert screen.getvalue() == (
        "Error: there is no answer to copy yet\n"
        f"Loaded 1 turn from {saved}\n"
        "> q\n"
        "Use this:\n\n```python\nprint('hi')\n```\n\nor this:\n\n```sh\necho hi\n```\n\n\n"
        f"{osc52_sequence(answer, {})}Copied the last answer ({len(answer)} characters) to the clipboard\n"
        f"{osc52_sequence('echo hi' + chr(10), {})}Copied code block 2 (8 characters) to the clipboard\n"
        "Error: the last answer has 2 code blocks; use a number from 1 to 2\n"
    )


def test_osc52_sequences() -> None:
    encoded = base64.b64encode("héllo".encode()).decode()
    assert osc52_sequence("héllo", {}) == f"\x1b]52;c;{encoded}\x07"
    assert osc52_sequence("x", {"TMUX": "/tmp/tmux-0/default,1,0"}) == (
        "\x1b]52;c;eA==\x07" "\x1bPtmux;\x1b\x1b]52;c;eA==\x07\x1b\\"
    )
    assert osc52_sequence("x", {"TERM": "screen-256color"}) == "\x1bP\x1b]52;c;eA==\x07\x1b\\"
    stream = io.StringIO()
    copy_to_clipboard("x", stream, {})
    assert stream.getvalue() == "\x1b]52;c;eA==\x07"
    with pytest.raises(ValueError, match="too large"):
        copy_to_clipboard("x" * MAX_OSC52_BYTES, io.StringIO(), {})


def test_code_blocks() -> None:
    text = "a\n\n```\none\n```\n\n    indented\n\n~~~py\ntwo\n~~~\n"
    assert code_blocks(text) == ["one\n", "indented\n", "two\n"]
    assert code_blocks("no code") == []


def test_exit_ends_the_chat_and_ignores_what_follows(paths: UserPaths) -> None:
    backend = FakeBackend()
    repl, screen = repl_for(Chat(backend, new_session(paths)), paths)
    repl.handle("/exit")
    assert repl.exit_requested and screen.getvalue() == ""
    status, out, err = run_script(Chat(backend, new_session(paths, "s")), paths, "/exit\nnever sent\n")
    assert (status, out, err) == (0, "", "") and backend.plans == []


# ------------------------------------------------------------------------------------------ sessions
def test_resume_after_a_crash_shows_every_complete_turn(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("First answer.", "Second answer."), new_session(paths))
    repl, _ = repl_for(chat, paths)
    repl.handle("first")
    repl.handle("second")
    assert chat.session.journal is not None
    with open(chat.session.journal, "ab") as handle:  # a crash in the middle of writing a record
        handle.write(b'{"type":"turn","user":"third","answ')
    resumed = Session.resume(paths.sessions_dir, "t")
    screen = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("/exit\r")  # one line, read at the first prompt: nothing to pace
        status = run_chat(Chat(FakeBackend(), resumed), console=Console(file=screen, width=300), paths=paths,
                          resumed=True, pt_input=pipe, pt_output=DummyOutput())
    assert status == 0
    assert screen.getvalue() == (
        "BlueLM chat · fake/BlueLM · cpu · float32 · 2,048-token context\n"
        "Session t · /help for commands · Alt-Enter for a new line · Ctrl-D or /exit quits\n"
        "Resumed session t: 2 earlier turns\n\n"
        "> first\nFirst answer.\n\n"
        "> second\nSecond answer.\n\n"
    )
    assert [turn.user for turn in resumed.turns] == ["first", "second"]


def test_resume_shows_the_unanswered_message_and_retry_sends_it(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("First answer."), new_session(paths))
    repl, _ = repl_for(chat, paths)
    repl.handle("first")
    chat.session.record_message("never answered")  # as a server failing before its first token leaves it
    chat.session.close()
    resumed = Session.resume(paths.sessions_dir, "t")
    backend = FakeBackend().queue("Now answered.")
    repl, screen = repl_for(Chat(backend, resumed), paths)
    repl.show_resumed()
    repl.handle("/retry")
    assert screen.getvalue() == (
        "Resumed session t: 1 earlier turn\n\n"
        "> first\nFirst answer.\n\n"
        "> never answered\n(not answered; /retry sends it)\n\n"
        "Now answered.\n\n"
    )
    assert [(turn.user, turn.answer) for turn in resumed.turns] == [("first", "First answer."), ("never answered", "Now answered.")]


# ------------------------------------------------------------------------------------------ script mode
def test_script_mode_reads_one_line_at_a_time(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hello, scripted world.", "A slash answer here.")
    chat = Chat(backend, new_session(paths, max_new_tokens="8"))
    status, out, err = run_script(chat, paths, "hello\n\n/rset\n/set temperature 9\n//slash\n/exit\nnever\n")
    assert status == 1  # a line failed
    assert users(chat) == ["hello", "/slash"]
    # stdout carries only the answers; notes and errors go to stderr.
    assert out == "Hello, s\nA slash \n"
    assert err == (
        f"{CUT}\n"
        "Error: unknown command /rset; did you mean /reset? (/help lists them; //rset sends it as a message)\n"
        "Error: temperature must be a number from 0 to 2 (0 = greedy), got '9'\n"
        f"{CUT}\n"
    )
    assert backend.prompt_text() == "<s>[|Human|]:hello[|AI|]:Hello, s</s>[|Human|]:/slash[|AI|]:"


def test_script_mode_refuses_copy(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("Hi."), new_session(paths))
    status, out, err = run_script(chat, paths, "hi\n/copy\n")
    assert (status, out) == (1, "Hi.\n")
    assert err == "Error: /copy needs a terminal: it asks the terminal to set the clipboard (OSC 52)\n"


# ------------------------------------------------------------------------- what only a real model shows
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ChatEngine:
    return ChatEngine(load_model(str(build_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec())), device="cpu"))


def real_chat(engine: ChatEngine, paths: UserPaths, max_new_tokens: str = "8") -> Chat:
    session = Session.new(paths.sessions_dir, name="t", model_id=engine.loaded.model_id)
    session.set_setting("temperature", "0")
    session.set_setting("max_new_tokens", max_new_tokens)
    return Chat(engine, session)


def test_multi_turn_keeps_both_turns_in_the_engine_cache(engine: ChatEngine, paths: UserPaths) -> None:
    chat = real_chat(engine, paths)
    repl, _ = repl_for(chat, paths)
    repl.handle("one")
    repl.handle("two")
    assert users(chat) == ["one", "two"]
    # The second prompt held the first exchange: the cache holds both turns now.
    assert len(engine.cached_ids) > 2 * len(chat.session.turns[0].answer_ids)


def test_ctrl_c_stops_the_real_engine_and_keeps_the_partial_answer(engine: ChatEngine, paths: UserPaths) -> None:
    chat = real_chat(engine, paths, max_new_tokens="1000")

    class Interrupted:  # the engine, with Ctrl-C seen at the fourth delta of its stream
        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def stream(self, *args: Any) -> Any:
            return _InterruptingStream(engine.stream(*args), after=4)

    chat = Chat(Interrupted(), chat.session)  # type: ignore[arg-type]
    repl, screen = repl_for(chat, paths)
    repl.handle("tell me a long story")
    (turn,) = chat.session.turns
    assert turn.finish_reason == "interrupted"
    assert 3 <= len(turn.answer_ids) < 1000
    assert screen.getvalue().endswith("\n[interrupted]\n\n")
    assert [r["finish_reason"] for r in journal(chat.session) if r["type"] == "turn"] == ["interrupted"]


def test_show_info_describes_the_loaded_model(engine: ChatEngine, paths: UserPaths) -> None:
    repl, screen = repl_for(real_chat(engine, paths), paths, width=300)
    repl.handle("/show info")
    config = engine.model.config
    count = sum(parameter.numel() for parameter in engine.model.parameters())
    assert screen.getvalue() == (
        f"model         {engine.loaded.model_id}\n"
        f"architecture  BlueLMForCausalLM, {config.num_hidden_layers} layers, hidden size {config.hidden_size},"
        f" {config.num_attention_heads} attention heads\n"
        f"parameters    {count / 1e3:.2f}K ({count:,})\n"
        "context       2,048 tokens\n"
        "dtype         float32\n"
        "device        cpu\n"
        "quantization  none\n"
        f"from          {engine.loaded.folder}\n"
    )


def test_stats_line_of_a_real_answer(engine: ChatEngine, paths: UserPaths) -> None:
    repl, screen = repl_for(real_chat(engine, paths), paths, verbose=True)
    repl.handle("x")
    lines = [line for line in screen.getvalue().splitlines() if "tokens/s" in line]
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d+ prompt tokens \(\d+ reused\) · 8 new · first token \d+ ms · prefill \d+ tokens/s · decode [\d.]+ tokens/s"
        r" · context \d+/2,048 · finish: length",
        lines[0],
    ), lines[0]
