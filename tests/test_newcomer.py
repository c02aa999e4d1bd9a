"""Issue 21, the newcomer's first hour: what people coming from `ollama run`, `llm chat` and `aichat` trip on.

Each test is written from the user's side: the REPL through the scripted fake backend with exact
transcripts (``repl_for``, script mode, or prompt_toolkit's pipe input as in test_repl.py), the CLI
through typer's CliRunner with exact output, on tiny checkpoints.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from bluelm_cli.chat.service import Chat
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.testing.fakes import FakeBackend
from test_chat import journal, new_session, run_script
from test_habits import repl_for
from test_repl import BANNER, Send
from test_repl import chat as repl_chat


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()  # under the temporary BLUELM_HOME set by conftest


def users(chat: Chat) -> list[str]:
    return [turn.user for turn in chat.session.turns]


# ---------------------------------------------------------------------------- 3. exit and quit alone
@pytest.mark.parametrize("word", ["exit", "quit", "exit  "])
def test_exit_or_quit_alone_ends_the_chat(paths: UserPaths, word: str) -> None:
    backend = FakeBackend()
    repl, screen = repl_for(Chat(backend, new_session(paths)), paths)
    repl.handle(word)
    assert repl.exit_requested and screen.getvalue() == "" and backend.plans == []


@pytest.mark.parametrize("typed", [" exit", '"""exit"""', '"""\nquit\n"""'])
def test_a_leading_space_or_a_block_sends_the_literal_word(paths: UserPaths, typed: str) -> None:
    backend = FakeBackend().queue("Sent.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle(typed)
    assert not repl.exit_requested and screen.getvalue() == "Sent.\n\n"
    assert users(chat) == [typed.strip().strip('"').strip()]


def test_exit_typed_at_the_prompt_ends_the_chat(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Hi.")
    result = repl_chat(backend, new_session(paths), paths, ["hello\r", "exit\r", "never sent\r"])
    assert result.status == 0 and result.users == ["hello"] and result.out == BANNER + "Hi.\n\n"


def test_exit_in_script_mode_ends_it_and_exiting_words_in_a_sentence_are_messages(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Bye then.")
    chat = Chat(backend, new_session(paths))
    status, out, err = run_script(chat, paths, "exit the loop how?\nquit\nnever sent\n")
    assert (status, out, err) == (0, "Bye then.\n", "")
    assert users(chat) == ["exit the loop how?"]


def test_help_says_how_to_send_the_word_exit(paths: UserPaths) -> None:
    repl, screen = repl_for(Chat(FakeBackend(), new_session(paths)), paths, width=200)
    repl.handle("/help")
    assert screen.getvalue().endswith(
        "Ctrl-C stops an answer or clears the line · Ctrl-D, /exit, or exit or quit alone quits\n"
        '//text sends a message starting with / · " exit" (a leading space) or """exit""" sends the word exit\n'
    )


# ---------------------------------------------------------------------------- 5. a paste is a message
@pytest.mark.parametrize("paste", ["/usr/bin/python3 crashes with\nSegmentation fault", "// a comment\nint x = 1;"])
def test_a_multi_line_paste_starting_with_a_slash_is_a_message(paths: UserPaths, paste: str) -> None:
    backend = FakeBackend().queue("Looked.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle(paste)
    assert screen.getvalue() == "Looked.\n\n" and users(chat) == [paste]


@pytest.mark.parametrize(
    "keys",
    [["\x1b[200~/etc/hosts\nhas this line\x1b[201~", Send("\r"), "/exit\r"], ["/etc/hosts\rhas this line\r", "/exit\r"]],
    ids=["bracketed-paste", "burst-of-lines"],
)
def test_a_paste_starting_with_a_path_is_sent(paths: UserPaths, keys: list[str]) -> None:
    backend = FakeBackend().queue("A path.")
    result = repl_chat(backend, new_session(paths), paths, keys)
    assert result.users == ["/etc/hosts\nhas this line"] and result.out == BANNER + "A path.\n\n"


def test_a_multi_line_command_is_still_a_command(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle("/set system Be brief.\nAnswer in French.")
    assert chat.system == "Be brief.\nAnswer in French." and screen.getvalue() == "system = 27 characters\n"


def test_an_unknown_single_line_command_says_how_to_send_it(paths: UserPaths) -> None:
    backend = FakeBackend()
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths, width=200)
    repl.handle("/etc/hosts")
    assert screen.getvalue() == "Error: unknown command /etc/hosts (/help lists them; //etc/hosts sends it as a message)\n"
    assert backend.plans == []


# ---------------------------------------------------------------------------- 4. ollama's words
@pytest.mark.parametrize(
    ("command", "key", "shown"),
    [
        ("/set parameter num_predict 64", "max_new_tokens", "64"),
        ("/set num_predict 64", "max_new_tokens", "64"),
        ("/set parameter temperature 0.2", "temperature", "0.2"),
        ("/set temp 0.2", "temperature", "0.2"),
        ("/set parameter top_k 40", "top_k", "40"),
        ("/set parameter top_p 0.5", "top_p", "0.5"),
        ("/set parameter repeat_penalty 1.3", "repetition_penalty", "1.3"),
        ("/set parameter seed 7", "seed", "7"),
    ],
)
def test_ollama_parameter_names_and_short_forms_set_the_setting(paths: UserPaths, command: str, key: str, shown: str) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle(command)
    assert screen.getvalue() == f"{key} = {shown}\n"
    assert str(chat.session.sampling[key]) == shown
    assert journal(chat.session)[-1] == {"type": "set", "key": key, "value": chat.session.sampling[key]}


def test_ollama_parameters_we_lack_say_what_to_use(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    repl, screen = repl_for(chat, paths, width=200)
    repl.handle("/set parameter num_ctx 4096")
    assert screen.getvalue() == (
        "Error: /set num_ctx is ollama's; the context window is the model's own; /show says how much of it is in use\n"
    )


def test_a_bare_set_lists_the_settings_and_their_usage(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    repl, screen = repl_for(chat, paths, width=200)
    repl.handle("/set")
    assert screen.getvalue() == (
        "Usage: /set KEY VALUE (also ollama's /set parameter KEY VALUE)\n"
        "max_new_tokens N      512 · Most tokens generated per answer (also num_predict, max_tokens)\n"
        "temperature T         0.7 · Sampling temperature; 0 = greedy (also temp)\n"
        "top_p P               0.9 · Nucleus sampling: keep the smallest token set with this much probability\n"
        "top_k K               0 · Keep only the K most likely tokens; 0 disables\n"
        "repetition_penalty R  1.1 · Penalty for repeating tokens; 1.0 = none (also repeat_penalty)\n"
        "seed N                (unset) · Random seed for reproducible sampling; unset = random\n"
        "system TEXT           (unset) · Text placed before the first turn (BlueLM has no system role)\n"
        "verbose | quiet       quiet · show or hide the stats line after each answer\n"
    )
    assert repl.failures == 0


def test_show_template_shows_the_chat_format_with_its_special_tokens(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(), new_session(paths, system="Be brief."))
    repl, screen = repl_for(chat, paths, width=200)
    repl.handle("/show template")
    assert screen.getvalue() == (
        "<s>{system}[|Human|]:{message 1}[|AI|]:{answer 1}</s>[|Human|]:{message 2}[|AI|]:\n"
        "<s> opens the conversation and </s> closes each answer; [|Human|]: and [|AI|]: are single tokens. BlueLM"
        " has no system role: the system prompt is plain text before the first [|Human|]: (now: 'Be brief.').\n"
    )


# ---------------------------------------------------------------------------- 2. nothing becomes unreachable
def _sessions(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from bluelm_cli.cli.app import app

    result = CliRunner().invoke(app, ["sessions", *args])
    return result.exit_code, result.stdout, result.stderr


def test_clear_starts_a_new_session_and_the_old_turns_stay_findable(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Paris.", "Blue.")
    chat = Chat(backend, new_session(paths, name="trip"))
    repl, screen = repl_for(chat, paths, width=200)
    repl.handle("capital of France?")
    repl.handle("/clear")
    new_name = chat.session.name
    repl.handle("colour of the sky?")
    assert new_name != "trip" and chat.session.journal.name == f"{new_name}.jsonl"
    assert screen.getvalue() == (
        "Paris.\n\n"
        f"New session {new_name}; settings kept. The earlier turns stay in session trip (bluelm chat --resume trip).\n"
        "Blue.\n\n"
    )
    assert backend.prompt_text() == "<s>[|Human|]:colour of the sky?[|AI|]:"  # the new conversation alone
    assert [r["type"] for r in journal(chat.session)] == ["start", "message", "turn"]
    chat.session.close()
    status, out, _ = _sessions("search", "France")
    assert status == 0 and "trip" in out and "capital of France?" in out
    status, out, _ = _sessions("show", "trip")
    assert status == 0 and "capital of France?" in out and "Paris." in out
    from bluelm_cli.session import Session

    resumed = Session.resume(paths.sessions_dir, "trip")
    assert [t.user for t in resumed.turns] == ["capital of France?"]


def test_clear_on_an_empty_chat_keeps_its_session(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(), new_session(paths, name="empty"))
    repl, screen = repl_for(chat, paths)
    repl.handle("/clear")
    assert chat.session.name == "empty" and screen.getvalue() == "New conversation; settings kept.\n"


def test_load_goes_into_a_new_session_and_the_current_turns_stay(paths: UserPaths, tmp_path) -> None:
    backend = FakeBackend().queue("Saved answer.", "Current answer.")
    saved_chat = Chat(backend, new_session(paths, name="saved"))
    repl, _ = repl_for(saved_chat, paths)
    repl.handle("saved question")
    saved = saved_chat.session.save(tmp_path / "saved.json")
    chat = Chat(backend, new_session(paths, name="current"))
    repl, screen = repl_for(chat, paths, width=300)
    repl.handle("current question")
    repl.handle(f"/load {saved}")
    new_name = chat.session.name
    assert new_name not in ("current", "saved")
    assert screen.getvalue() == (
        "Current answer.\n\n"
        f"Loaded 1 turn from {saved} into new session {new_name}. The earlier turns stay in session current"
        " (bluelm chat --resume current).\n"
        "> saved question\nSaved answer.\n\n"
    )
    chat.session.close()
    status, out, _ = _sessions("show", "current")
    assert status == 0 and "current question" in out
    status, out, _ = _sessions("show", new_name)
    assert status == 0 and "saved question" in out


# ---------------------------------------------------------------------------- 12 and 7. what a long chat shows
def test_the_stats_line_shows_prefill_beside_decode_speed(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Short answer.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths, width=300, verbose=True)
    repl.handle("hi")
    prompt = len(backend.plans[0].ids)  # the fake: 50 ms to the first token, 100 tokens/s after it
    assert screen.getvalue() == (
        "Short answer.\n"
        f"{prompt} prompt tokens (0 reused) · 13 new · first token 50 ms · prefill {prompt * 20} tokens/s"
        f" · decode 100.0 tokens/s · context {prompt + 14}/2048\n\n"
    )


def test_after_an_early_ctrl_c_the_stats_line_shows_no_speed_it_cannot_know(paths: UserPaths) -> None:
    from bluelm_cli.testing.fakes import Scripted

    backend = FakeBackend().queue(Scripted("Long answer", chunk=1, stop_after=1))
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths, width=300, verbose=True)
    repl.handle("hi")
    prompt = len(backend.plans[0].ids)
    assert screen.getvalue() == (
        "L\n[interrupted]\n"
        f"{prompt} prompt tokens (0 reused) · 1 new · first token 50 ms · prefill {prompt * 20} tokens/s"
        f" · context {prompt + 2}/2048 · finish: interrupted\n\n"
    )


def test_the_context_meter_is_in_the_toolbar_and_in_show(paths: UserPaths) -> None:
    backend = FakeBackend(context_limit=100).queue("Ok.")
    chat = Chat(backend, new_session(paths, name="meter", max_new_tokens="20"))
    repl, screen = repl_for(chat, paths, width=200)
    assert repl.context_toolbar() == [("class:bottom-toolbar.text", " context 1 / 100 tokens in use (1%) · session meter ")]
    repl.handle("hello")  # <s> [|Human|]: hello [|AI|]: Ok. </s> = 12 positions
    assert repl.context_toolbar() == [("class:bottom-toolbar.text", " context 12 / 100 tokens in use (12%) · session meter ")]
    repl.handle("/show")
    assert "context             12 / 100 tokens in use (12%)\n" in screen.getvalue()
