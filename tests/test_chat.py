"""The chat service and the REPL on a scripted fake backend: exact transcripts, no model, no sleeps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from bluelm_cli.chat.service import Chat
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.core.prompt import ContextOverflowError
from bluelm_cli.ui.repl import ChatRepl, run_chat
from bluelm_cli.session import Session
from bluelm_cli.testing.fakes import FakeBackend, Scripted

CUT = "[cut off at max_new_tokens; /set max_new_tokens N allows longer answers]"


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()


def new_session(paths: UserPaths, name: str = "t", **settings: str) -> Session:
    session = Session.new(paths.sessions_dir, name=name, model_id="fake/BlueLM")
    for key, value in settings.items():
        session.set_setting(key, value)
    return session


def journal(session: Session) -> list[dict]:
    assert session.journal is not None
    return [json.loads(line) for line in session.journal.read_text("utf-8").splitlines()]


def answer(chat: Chat, message: str) -> str:
    stream = chat.send(message)
    text = "".join(stream)
    stream.finish()
    return text


# ----------------------------------------------------------------------------------- the chat service
def test_a_turn_is_sent_streamed_and_committed(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hi there.", "Paris.")
    chat = Chat(backend, new_session(paths, system="Be brief."))
    assert answer(chat, "hello") == "Hi there."
    assert answer(chat, "capital of France?") == "Paris."
    assert backend.prompt_text(0) == "<s>Be brief.[|Human|]:hello[|AI|]:"
    assert backend.prompt_text(1) == "<s>Be brief.[|Human|]:hello[|AI|]:Hi there.</s>[|Human|]:capital of France?[|AI|]:"
    assert [(t.user, t.answer, t.finish_reason) for t in chat.session.turns] == [
        ("hello", "Hi there.", FinishReason.STOP), ("capital of France?", "Paris.", FinishReason.STOP)]
    assert [r["type"] for r in journal(chat.session)] == ["start", "set", "message", "turn", "message", "turn"]
    assert chat.context_used() == len(backend.plans[1].ids) + len("Paris.") + 1


def test_nothing_is_recorded_until_commit_and_a_refusal_records_nothing(paths: UserPaths) -> None:
    backend = FakeBackend(context_limit=64).queue("ok")
    chat = Chat(backend, new_session(paths, max_new_tokens="16"))
    stream = chat.send("hi")
    assert chat.session.turns == []  # streaming, not yet committed
    "".join(stream)
    stream.finish()
    with pytest.raises(ContextOverflowError, match="the message is 60 tokens but at most 45 fit"):
        chat.send("x" * 60)
    assert [t.user for t in chat.session.turns] == ["hi"] and len(backend.plans) == 1


def test_retry_replaces_the_last_turn_only_when_committed(paths: UserPaths) -> None:
    backend = FakeBackend().queue("first answer", "second answer")
    chat = Chat(backend, new_session(paths))
    answer(chat, "question")
    stream = chat.retry()
    assert backend.prompt_text() == "<s>[|Human|]:question[|AI|]:"  # without the answer being replaced
    assert [t.answer for t in chat.session.turns] == ["first answer"]
    "".join(stream)
    stream.finish()
    assert [(t.user, t.answer) for t in chat.session.turns] == [("question", "second answer")]
    assert [r["type"] for r in journal(chat.session)][-3:] == ["turn", "undo", "turn"]
    with pytest.raises(BlueLMError, match="nothing to undo"):
        Chat(backend, new_session(paths, "empty")).undo()
    with pytest.raises(BlueLMError, match="nothing to retry yet"):
        Chat(backend, new_session(paths, "empty2")).retry()


def test_an_interrupted_answer_is_kept_and_marked(paths: UserPaths) -> None:
    backend = FakeBackend().queue(Scripted("one two three four five", chunk=4, stop_after=2))
    chat = Chat(backend, new_session(paths))
    stream = chat.send("count")
    assert list(stream) == ["one ", "two "]
    committed = stream.finish()
    assert committed.result.finish_reason is FinishReason.INTERRUPTED
    assert chat.session.turns[0].answer == "one two "
    assert journal(chat.session)[-1]["finish_reason"] == "interrupted"


def test_old_turns_are_dropped_to_fit_and_the_drop_is_journaled(paths: UserPaths) -> None:
    backend = FakeBackend(context_limit=80).queue("a" * 10, "b" * 10, "c" * 10, "d" * 10)
    chat = Chat(backend, new_session(paths, max_new_tokens="10"))
    for number in range(4):
        answer(chat, f"question {number}")
    # Budget 80 - 10 = 70; each exchange is [|Human|]: + 10 + [|AI|]: + 10 + </s> = 23 ids, a new message 12:
    # the fourth prompt would be 1 + 3 * 23 + 12 = 82. Dropping the oldest turn would fit (59), but turns go in
    # a block holding half the history's tokens (core.prompt.DROP_BLOCK_FRACTION): two of the three (1 + 23 + 12 = 36).
    assert [plan.dropped_turns for plan in backend.plans] == [0, 0, 0, 2]
    assert backend.prompt_text() == "<s>[|Human|]:question 2[|AI|]:" + "c" * 10 + "</s>[|Human|]:question 3[|AI|]:"
    assert chat.session.context_start == 2 and len(chat.session.turns) == 4
    assert [r["count"] for r in journal(chat.session) if r["type"] == "drop"] == [2]


def test_a_journal_failure_keeps_the_turn_in_memory(paths: UserPaths) -> None:
    backend = FakeBackend().queue("kept")
    session = new_session(paths)
    chat = Chat(backend, session)
    assert session.journal is not None
    session.journal.unlink()
    session.journal.mkdir()  # appending now fails
    stream = chat.send("hi")
    "".join(stream)
    committed = stream.finish()
    assert committed.journal_error is not None and "could not write the session journal" in committed.journal_error
    assert [t.answer for t in session.turns] == ["kept"]


# ------------------------------------------------------------------------- the REPL, exact transcripts
def run_script(chat: Chat, paths: UserPaths, lines: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(chat, console=Console(file=out, width=100), paths=paths, stdin=io.StringIO(lines),
                      err_console=Console(file=err, width=100))
    return status, out.getvalue(), err.getvalue()


def test_script_mode_transcript(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hello! How can I help?", "Scripted answer cut", "Again.")
    chat = Chat(backend, new_session(paths, max_new_tokens="15"))
    status, out, err = run_script(chat, paths, "hi\n/set system Be kind.\nsecond\n/retry\n/undo\n/show\n")
    assert status == 0
    # <s> + "Be kind." + [|Human|]: + "hi" + [|AI|]: + 15 answer ids + </s> = 29 positions.
    assert out == (
        "Hello! How can \n"
        "system = 'Be kind.'\n"
        "Scripted answer\n"
        "Again.\n"
        "Removed the last exchange (“second”)\n"
        "model               fake/BlueLM (cpu, float32)\n"
        "session             t · 1 turn, 1 in the context\n"
        "context             29 / 2,048 tokens in use (1%)\n"
        "system              'Be kind.'\n"
        "max_new_tokens      15\n"
        "temperature         0.7\n"
        "top_p               0.9\n"
        "top_k               0\n"
        "repetition_penalty  1.1\n"
        "seed                (unset)\n"
        "stats               off\n"
    )
    assert err == f"{CUT}\n{CUT}\n"
    assert backend.prompt_text(2) == "<s>Be kind.[|Human|]:hi[|AI|]:Hello! How can </s>[|Human|]:second[|AI|]:"


def test_repl_transcript_with_stats_and_notes(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Short answer.", Scripted("Long long answer", stop_after=1))
    chat = Chat(backend, new_session(paths))
    console = Console(file=io.StringIO(), width=200)
    repl = ChatRepl(chat, ChatOutput(console, interactive=True), paths=paths)
    repl.handle("/stats on")
    repl.handle("hello")
    repl.handle("tell me more")
    repl.handle("/bogus")
    repl.handle("/exit")
    assert repl.exit_requested
    ids = len(backend.plans[0].ids)
    assert console.file.getvalue() == (
        "Stats on\n"
        "Short answer.\n"
        f"{ids} prompt tokens (0 reused) · 13 new · first token 50 ms · prefill {ids * 20} tokens/s · decode 100.0 tokens/s"
        f" · context {ids + 14}/2,048\n"
        "\n"
        "Long\n"
        "[interrupted]\n"
        f"{len(backend.plans[1].ids)} prompt tokens (0 reused) · 4 new · first token 50 ms"
        f" · prefill {len(backend.plans[1].ids) * 20} tokens/s · decode 100.0 tokens/s"
        f" · context {len(backend.plans[1].ids) + 5}/2,048 · finish: interrupted\n"
        "\n"
        "Error: unknown command /bogus (/help lists them; //bogus sends it as a message)\n"
    )
