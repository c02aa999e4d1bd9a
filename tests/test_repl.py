"""The chat REPL driven through prompt_toolkit (pipe input, dummy output) with a tiny real model.

Keys are fed from a thread, a chunk at a time with a pause between chunks, because prompt_toolkit
completes, searches and runs the editor asynchronously: a key sent too early would arrive before
the previous one has had its effect. The console is not a terminal, so answers come out verbatim.
"""

from __future__ import annotations

import base64
import io
import json
import re
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from bluelm_cli.chat import Chat as ChatService
from bluelm_cli.clipboard import MAX_OSC52_BYTES, copy_to_clipboard, osc52_sequence
from bluelm_cli.commands import COMMANDS, ChatCompleter, code_blocks
from bluelm_cli.engine import ChatEngine
from bluelm_cli.loading import load_model
from bluelm_cli.paths import UserPaths, user_paths
from bluelm_cli.repl import ChatRepl, run_chat
from bluelm_cli.session import Session, Turn
from bluelm_cli.tiny_checkpoint import TinySpec, build_checkpoint

PAUSE = 0.25  # between key chunks; see the module docstring


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec())


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> ChatEngine:
    return ChatEngine(load_model(str(checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> ChatEngine:
    """A 96-token context, so that a few turns overflow it."""
    folder = build_checkpoint(
        tmp_path_factory.mktemp("tiny96"), TinySpec(max_position_embeddings=96), tokenizer_model=checkpoint / "tokenizer.model"
    )
    return ChatEngine(load_model(str(folder), device="cpu"))


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()  # under the temporary BLUELM_HOME set by conftest


@pytest.fixture
def session(paths: UserPaths, engine: ChatEngine) -> Session:
    return _new_session(paths, engine)


def _new_session(paths: UserPaths, engine: ChatEngine, name: str = "t") -> Session:
    session = Session.new(paths.sessions_dir, name=name, model_id=engine.loaded.model_id)
    session.set_setting("temperature", "0")
    session.set_setting("max_new_tokens", "8")
    return session


class Chat:
    """What a run of the REPL left: exit status, screen text, the session."""

    def __init__(self, status: int, out: str, session: Session) -> None:
        self.status, self.out, self.session = status, out, session

    @property
    def users(self) -> list[str]:
        return [turn.user for turn in self.session.turns]


def chat(
    engine: Any,
    session: Session,
    paths: UserPaths,
    keys: Sequence[str],
    *,
    verbose: bool = False,
    resumed: bool = False,
    keep_history: bool = True,
) -> Chat:
    """Run the prompt_toolkit REPL on `keys` (chunks sent one by one); a final Ctrl-D ends it if nothing did.

    After a chunk that submits a line, the next waits until the REPL has handled it (answered it): keys
    that arrive while an answer streams are read together at the next prompt, as one burst, and a burst
    of lines is one message."""
    console = Console(file=io.StringIO(), width=200, highlight=False)
    done = threading.Event()
    handled = threading.Semaphore(0)
    handle = ChatRepl.handle

    def handle_and_tell(self: ChatRepl, text: str) -> None:
        try:
            handle(self, text)
        finally:
            handled.release()

    ChatRepl.handle = handle_and_tell  # type: ignore[method-assign]
    with create_pipe_input() as pipe:

        def feed() -> None:
            for chunk in [*keys, "\x04"]:
                if done.wait(PAUSE):
                    return
                pipe.send_text(chunk)
                if chunk.endswith("\r") and chunk.strip("\r") and not chunk.startswith("\x1b[200~"):
                    while not handled.acquire(timeout=0.1):  # until the REPL has handled the line
                        if done.is_set():
                            return

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            status = run_chat(
                ChatService(engine, session), console=console, paths=paths, verbose=verbose, resumed=resumed,
                pt_input=pipe, pt_output=DummyOutput(), keep_history=keep_history,
            )
        finally:
            done.set()
            feeder.join()  # before the pipe closes: its descriptor number may be reused by the next test
            ChatRepl.handle = handle  # type: ignore[method-assign]
    return Chat(status, console.file.getvalue(), session)  # type: ignore[attr-defined]


def journal(session: Session) -> list[dict[str, Any]]:
    assert session.journal is not None
    return [json.loads(line) for line in session.journal.read_text("utf-8").splitlines()]


# ------------------------------------------------------------------------------------------ messages
def test_message_streams_and_is_journaled(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["hello\r", "/exit\r"])
    assert result.status == 0
    assert result.users == ["hello"]
    answer = session.turns[0].answer
    assert answer and answer in result.out
    assert "BlueLM chat" in result.out and "2048-token context" in result.out and "/help" in result.out
    turns = [r for r in journal(session) if r["type"] == "turn"]
    assert [(r["user"], r["answer"]) for r in turns] == [("hello", answer)]
    assert turns[0]["answer_ids"] == session.turns[0].answer_ids and turns[0]["finish_reason"] == "length"


def test_multi_turn_sends_the_history(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["one\r", "two\r", "/exit\r"])
    assert result.users == ["one", "two"]
    # The second prompt held the first exchange: the cache holds both turns now.
    assert len(engine.cached_ids) > 2 * len(session.turns[0].answer_ids)


@pytest.mark.parametrize("keys", [["\r"], ["   \r"], ["\x1b\r\x1b\r  \r"]], ids=["empty", "spaces", "newlines"])
def test_empty_or_whitespace_message_is_ignored(engine: ChatEngine, session: Session, paths: UserPaths, keys: list[str]) -> None:
    result = chat(engine, session, paths, [*keys, "/exit\r"])
    assert result.status == 0 and result.users == []
    assert "Error" not in result.out


def test_alt_enter_inserts_a_newline(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["first line\x1b\rsecond line\r", "/exit\r"])
    assert result.users == ["first line\nsecond line"]


def test_bracketed_paste_is_one_message(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["\x1b[200~a\nb\r\nc\x1b[201~", "\r", "/exit\r"])
    assert result.users == ["a\nb\nc"]


def test_a_burst_of_lines_is_one_message(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    # What tmux paste-buffer (without -p) sends: the whole block at once, each newline an Enter (CR).
    result = chat(engine, session, paths, ["first line\rsecond line\r/third line\r", "/exit\r"])
    assert result.users == ["first line\nsecond line\n/third line"]
    assert "Error" not in result.out


def test_typed_triple_quote_block_is_one_message(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    # Typed: every Enter arrives on its own, long after the last key, so only the quotes keep the block open.
    keys = ['"""', "\r", "line one", "\r", "/line two", "\r", '"""', "\r", "/exit\r"]
    result = chat(engine, session, paths, keys)
    assert result.users == ["line one\n/line two"]


def test_huge_paste_is_refused_with_its_token_count(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    paste = "word " * 20_000  # 100k characters
    result = chat(engine, session, paths, ["hi\r", "\x1b[200~" + paste + "\x1b[201~", "\r", "after\r", "/exit\r"])
    tokens = engine.count_tokens(paste.strip())
    assert f"Error: the message is {tokens} tokens but at most " in result.out
    assert "fit in the context window" in result.out
    assert result.users == ["hi", "after"]  # refused, not recorded; the conversation went on


def test_ctrl_c_at_the_prompt_clears_the_line(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["half typed", "\x03", "ok\r", "/exit\r"])
    assert result.status == 0 and result.users == ["ok"]


def test_ctrl_d_quits(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["\x04"])
    assert result.status == 0 and result.users == []


class _InterruptingStream:
    """A real stream on which the consumer sees Ctrl-C (KeyboardInterrupt) after a few deltas."""

    def __init__(self, stream: Any, after: int) -> None:
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


class _Proxy:
    """The real engine, with its stream() wrapped."""

    def __init__(self, engine: ChatEngine, wrap: Any) -> None:
        self._engine, self._wrap = engine, wrap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._engine.stream(*args, **kwargs))


def test_ctrl_c_during_an_answer_keeps_the_partial_answer(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    session.set_setting("max_new_tokens", "1000")
    interrupting = _Proxy(engine, lambda stream: _InterruptingStream(stream, after=4))
    result = chat(interrupting, session, paths, ["tell me a long story\r", "/exit\r"])
    assert result.status == 0
    (turn,) = session.turns
    assert turn.finish_reason == "interrupted"
    assert 3 <= len(turn.answer_ids) < 1000
    assert "[interrupted]" in result.out
    assert [r["finish_reason"] for r in journal(session) if r["type"] == "turn"] == ["interrupted"]


def test_an_unexpected_error_does_not_end_the_chat(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    calls = []

    def wrap(stream: Any) -> Any:
        calls.append(stream)
        if len(calls) == 1:
            stream.finish()
            raise RuntimeError("boom")
        return stream

    result = chat(_Proxy(engine, wrap), session, paths, ["first\r", "second\r", "/exit\r"])
    assert "Error: unexpected RuntimeError: boom" in result.out
    assert result.users == ["second"]


def test_dropped_turns_are_announced(small_engine: ChatEngine, paths: UserPaths) -> None:
    session = _new_session(paths, small_engine)
    session.set_setting("max_new_tokens", "20")
    keys = [f"message number {n} with a few more words\r" for n in range(4)]
    result = chat(small_engine, session, paths, [*keys, "/exit\r"])
    assert len(session.turns) == 4
    assert session.context_start >= 1
    assert "oldest turn" in result.out and "no longer fit the context window" in result.out
    assert any(r["type"] == "drop" for r in journal(session))


# ------------------------------------------------------------------------------------------ input
def test_history_file_is_private_and_searchable(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    chat(engine, session, paths, ["remember this\r", "/exit\r"])
    history = paths.history_file
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "remember this" in history.read_text("utf-8")
    # A new chat finds it with Ctrl-R; Enter ends the search, a second Enter sends it.
    other = _new_session(paths, engine, name="t2")
    result = chat(engine, other, paths, ["\x12rememb", "\r", "\r", "/exit\r"])
    assert result.users == ["remember this"]


def test_no_history_keeps_no_file(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["my secret\r", "\x1b[A", "\r", "/exit\r"], keep_history=False)
    assert result.users == ["my secret", "my secret"]  # Up still recalls it within the chat
    assert not paths.history_file.exists() and not paths.data_dir.exists()


def test_show_info_describes_the_loaded_model(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/show info\r", "/exit\r"])
    config = engine.model.config
    count = sum(parameter.numel() for parameter in engine.model.parameters())
    assert (
        f"architecture  BlueLMForCausalLM, {config.num_hidden_layers} layers, hidden size {config.hidden_size},"
        f" {config.num_attention_heads} attention heads\n"
        f"parameters    {count / 1e3:.2f}K ({count:,})\n"
        "context       2048 tokens\n"
        "dtype         float32\n"
        "device        cpu\n"
        "quantization  none\n"
        f"from          {engine.loaded.folder}\n"
    ) in result.out


def test_history_that_cannot_be_written_is_a_warning(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    paths.data_dir.parent.mkdir(parents=True, exist_ok=True)
    paths.data_dir.write_text("a file where the data directory should be")
    result = chat(engine, session, paths, ["still works\r", "/exit\r"])
    assert "Warning: the prompt history is not kept" in result.out
    assert result.users == ["still works"]


def test_ctrl_x_ctrl_e_opens_the_editor(engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "written in the editor\\n" > "$1"\n')
    editor.chmod(0o755)
    monkeypatch.setenv("EDITOR", str(editor))
    monkeypatch.delenv("VISUAL", raising=False)
    result = chat(engine, session, paths, ["draft", "\x18\x05", "\r", "/exit\r"])
    assert result.users == ["written in the editor"]


def test_completion_of_commands_settings_and_paths(tmp_path: Path) -> None:
    def complete(text: str) -> list[str]:
        return [c.text for c in ChatCompleter().get_completions(Document(text), CompleteEvent(completion_requested=True))]

    assert complete("/re") == ["/reset", "/retry"]
    assert complete("/") == [f"/{name}" for c in COMMANDS for name in (c.name, *c.aliases) if name != "?"]
    assert complete("/b") == ["/bye"] and complete("/q") == ["/quit"] and complete("/cl") == ["/clear"]
    assert complete("/co") == ["/continue", "/copy"] and complete("/fi") == ["/file"]
    assert complete("/set parameter te") == ["temperature "] and complete("/set ver") == ["verbose"]
    assert complete("/show p") == ["parameters"]
    assert complete("/set te") == ["temperature "]
    assert "system " in complete("/set ")
    assert "compile " not in complete("/set ")  # only what /set can change
    assert complete("/set seed n") == ["none"]
    assert complete("/stats o") == ["on", "off"]
    (tmp_path / "saved-chat.json").write_text("{}")
    assert complete(f"/save {tmp_path}/sav") == ["ed-chat.json"]
    assert complete(f"/load {tmp_path}/sav") == ["ed-chat.json"]
    assert complete("hello /re") == [] and complete("//re") == [] and complete("/undo x") == []


def test_tab_completes_a_command(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    # Tab picks /help; the first Enter takes the completion, the second sends it.
    result = chat(engine, session, paths, ["/he", "\t", "\r", "\r", "/exit\r"])
    assert "/reset" in result.out and "Error" not in result.out


# ------------------------------------------------------------------------------------------ commands
def test_help_lists_every_command_from_the_table(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/help\r", "/exit\r"])
    for command in COMMANDS:
        assert f"{command.usage}" in result.out and command.help in result.out
    assert "Alt-Enter" in result.out and "Ctrl-R" in result.out


def test_unknown_command_gets_a_hint_and_is_not_sent(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/rset\r", "/zzzz\r", "/exit\r"])
    assert "Error: unknown command /rset; did you mean /reset? (/help lists them)\n" in result.out
    assert "Error: unknown command /zzzz (/help lists them)\n" in result.out
    assert result.users == []


def test_double_slash_sends_a_message_starting_with_a_slash(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["//etc/hosts is what?\r", "/exit\r"])
    assert result.users == ["/etc/hosts is what?"]


def test_reset_keeps_settings(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/set temperature 0.5\r", "hi\r", "/reset\r", "/exit\r"])
    assert "temperature = 0.5" in result.out and "New conversation; settings kept." in result.out
    assert session.turns == [] and session.sampling["temperature"] == 0.5


def test_retry_replaces_the_last_answer(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/retry\r", "question\r", "/retry\r", "/exit\r"])
    assert "Error: nothing to retry yet; send a message first" in result.out
    assert result.users == ["question"]
    assert [r["type"] for r in journal(session)][-3:] == ["turn", "undo", "turn"]


def test_undo_drops_the_last_exchange(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["one\r", "two\r", "/undo\r", "/exit\r"])
    assert result.users == ["one"] and "Removed the last exchange (“two”)" in result.out
    result = chat(engine, _new_session(paths, engine, "empty"), paths, ["/undo\r", "/exit\r"])
    assert "Error: nothing to undo; the conversation is empty" in result.out


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("/set temperature 5", "Error: temperature must be a number from 0 to 2 (0 = greedy), got '5'"),
        ("/set top_p 0", "Error: top_p must be a number greater than 0 and at most 1, got '0'"),
        ("/set max_new_tokens lots", "Error: max_new_tokens must be a whole number of at least 1, got 'lots'"),
        ("/set temprature 1", "Error: unknown setting 'temprature'; did you mean temperature?; /set can change: "),
        ("/set device cpu", "Error: device can't be changed in a running chat; restart with --device"),
        ("/set temperature", "Error: usage: /set KEY VALUE; keys: max_new_tokens, temperature"),
    ],
)
def test_invalid_set_values_name_the_valid_range(
    engine: ChatEngine, session: Session, paths: UserPaths, command: str, message: str
) -> None:
    before = dict(session.sampling)
    result = chat(engine, session, paths, [command + "\r", "/exit\r"])
    assert message in result.out
    assert session.sampling == before


def test_set_system_and_show(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/set system You are terse.\r", "hi\r", "/show\r", "/exit\r"])
    assert session.system == "You are terse."
    assert "system = 'You are terse.'" in result.out
    assert f"{engine.loaded.model_id} (cpu, float32)" in result.out
    # Context used = the conversation so far, closing </s> included: what the stats line reports too.
    used = session.turns[-1]
    expected = 1 + len(engine.tokenizer.encode_plain("You are terse.[|Human|]:hi[|AI|]:")) + len(used.answer_ids) + 1
    assert f"{expected} / 2048 tokens in use" in result.out
    assert "temperature" in result.out and "max_new_tokens" in result.out


def test_stats_line(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["quiet\r", "/stats on\r", "loud\r", "/stats off\r", "/exit\r"])
    lines = [line for line in result.out.splitlines() if "tokens/s" in line]
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d+ prompt tokens \(\d+ reused\) · 8 new · first token \d+ ms · [\d.]+ tokens/s · context \d+/2048 · finish: length",
        lines[0],
    ), lines[0]
    verbose = chat(engine, _new_session(paths, engine, "v"), paths, ["x\r", "/exit\r"], verbose=True)
    assert "tokens/s" in verbose.out


def test_save_json_and_markdown(engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path) -> None:
    target = tmp_path / "chat.md"
    result = chat(engine, session, paths, ["hello\r", "/save\r", f"/save {target}\r", "/exit\r"])
    default = paths.sessions_dir / "t.json"
    assert f"Saved to {default}\n" in result.out and f"Saved to {target}\n" in result.out
    saved = json.loads(default.read_text("utf-8"))
    assert saved["model_id"] == engine.loaded.model_id and saved["turns"][0]["user"] == "hello"
    assert saved["sampling"]["max_new_tokens"] == 8
    assert "**You:**" in target.read_text("utf-8")


def test_save_to_a_missing_directory_fails_and_the_chat_goes_on(
    engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path
) -> None:
    missing = tmp_path / "nope" / "chat.json"
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    result = chat(engine, session, paths, ["hi\r", f"/save {missing}\r", f"/save {not_a_dir}/chat.json\r", "more\r", "/exit\r"])
    assert f"Error: cannot save to {missing}: {missing.parent} does not exist" in result.out
    assert f"Error: cannot save to {not_a_dir}/chat.json: {not_a_dir} is not a directory" in result.out
    assert result.users == ["hi", "more"] and not missing.parent.exists()


def test_failed_save_leaves_an_existing_file_untouched(
    engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.json"
    target.write_text("precious")

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bluelm_cli.transcript.os.replace", full_disk)
    result = chat(engine, session, paths, ["hi\r", f"/save {target}\r", "/exit\r"])
    assert f"Error: cannot save to {target} (No space left on device)" in result.out
    assert target.read_text() == "precious" and list(tmp_path.iterdir()) == [target]
    assert result.users == ["hi"]


def test_load_replaces_the_conversation_and_warns_about_another_model(
    engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path
) -> None:
    other = Session(name="old", model_id="vivo-ai/BlueLM-7B-Base", system="be kind",
                    turns=[Turn("old question", "old answer", [5, 6])])
    saved = other.save(tmp_path / "old.json")
    result = chat(engine, session, paths, ["current\r", f"/load {saved}\r", "follow-up\r", "/exit\r"])
    assert f"Warning: {saved} was saved with vivo-ai/BlueLM-7B-Base; continuing with {engine.loaded.model_id}" in result.out
    assert f"Loaded 1 turn from {saved}" in result.out
    assert "old answer" in result.out  # replayed on screen
    assert result.users == ["old question", "follow-up"] and session.system == "be kind"
    assert session.model_id == engine.loaded.model_id


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "Error: no such file: {path}; check the path"),
        ("{not json", "Error: {path} is not a bluelm session (not valid JSON)"),
        ('{"hello": "world"}', "Error: {path} is not a bluelm session file"),
        ('{"format": "bluelm-cli.session", "version": 1, "model_id": "m", "turns": [{"user": 1}]}',
         "Error: {path} is a damaged bluelm session"),
    ],
    ids=["missing", "corrupt", "foreign", "damaged"],
)
def test_bad_load_leaves_the_conversation_untouched(
    engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    result = chat(engine, session, paths, ["keep me\r", f"/load {path}\r", "/load\r", "/exit\r"])
    assert message.format(path=path) in result.out
    assert "Error: usage: /load PATH" in result.out
    assert result.users == ["keep me"]


def test_copy_uses_osc52(engine: ChatEngine, session: Session, paths: UserPaths, tmp_path: Path) -> None:
    answer = "Use this:\n\n```python\nprint('hi')\n```\n\nor this:\n\n```sh\necho hi\n```\n"
    saved = Session(name="c", model_id=engine.loaded.model_id, turns=[Turn("q", answer, [7])]).save(tmp_path / "c.json")
    result = chat(engine, session, paths, ["/copy\r", f"/load {saved}\r", "/copy\r", "/copy 2\r", "/copy 3\r", "/exit\r"])
    assert "Error: there is no answer to copy yet" in result.out
    assert osc52_sequence(answer, {}) in result.out
    assert osc52_sequence("echo hi\n", {}) in result.out
    assert "Copied code block 2 (8 characters) to the clipboard" in result.out
    assert "Error: the last answer has 2 code blocks; use a number from 1 to 2" in result.out


def test_exit_ends_with_status_0_and_ignores_what_follows(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    result = chat(engine, session, paths, ["/exit\r", "never sent\r"])
    assert result.status == 0 and result.users == []


# ------------------------------------------------------------------------------------------ sessions
def test_resume_after_a_crash_shows_every_complete_turn(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    chat(engine, session, paths, ["first\r", "second\r", "/exit\r"])
    answers = [turn.answer for turn in session.turns]
    assert session.journal is not None
    with open(session.journal, "ab") as handle:  # a crash in the middle of writing a record
        handle.write(b'{"type":"turn","user":"third","answ')
    resumed = Session.resume(paths.sessions_dir, "t")
    result = chat(engine, resumed, paths, ["/exit\r"], resumed=True)
    assert "Resumed session t: 2 earlier turns" in result.out
    assert "> first" in result.out and "> second" in result.out
    assert all(answer in result.out for answer in answers)
    assert [turn.user for turn in resumed.turns] == ["first", "second"]


# ------------------------------------------------------------------------------------------ script mode
def test_script_mode_reads_one_line_at_a_time(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO("hello\n\n/rset\n/set temperature 9\n//slash\n/exit\nnever\n")
    status = run_chat(
        ChatService(engine, session), console=Console(file=out, width=80), paths=paths, stdin=stdin,
        err_console=Console(file=err, width=80),
    )
    assert status == 1  # a line failed
    assert [t.user for t in session.turns] == ["hello", "/slash"]
    first, second = (t.answer for t in session.turns)
    # stdout carries only the answers; notes and errors go to stderr.
    assert out.getvalue() == f"{first}\n{second}\n"
    assert err.getvalue() == (
        "[cut off at max_new_tokens; /set max_new_tokens N allows longer answers]\n"
        "Error: unknown command /rset; did you mean /reset? (/help lists them)\n"
        "Error: temperature must be a number from 0 to 2 (0 = greedy), got '9'\n"
        "[cut off at max_new_tokens; /set max_new_tokens N allows longer answers]\n"
    )


def test_script_mode_refuses_copy(engine: ChatEngine, session: Session, paths: UserPaths) -> None:
    err = io.StringIO()
    run_chat(ChatService(engine, session), console=Console(file=io.StringIO()), paths=paths, stdin=io.StringIO("hi\n/copy\n"),
             err_console=Console(file=err))
    assert "Error: /copy needs a terminal" in err.getvalue()


# ------------------------------------------------------------------------------------------ helpers
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
