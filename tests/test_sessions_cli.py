"""`bluelm sessions` (list, show, rm, search): read the journals without a model; exact outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.config.paths import user_paths
from bluelm_cli.session import Session, Turn

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201 - typer's Result
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.stderr
    return result


def make_session(name: str, model_id: str, turns: list[tuple[str, str]], when: float, system: str | None = None) -> Session:
    session = Session.new(user_paths().sessions_dir, name=name, model_id=model_id, system=system)
    for user, answer in turns:
        session.add_turn(Turn(user, answer, finish_reason=FinishReason.STOP))
    assert session.journal is not None
    session.close()  # saved, not open in a chat (`sessions rm` refuses a session a chat holds)
    os.utime(session.journal, (when, when))
    return session


def local(when: float) -> str:
    return datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M")


@pytest.fixture
def two_sessions() -> tuple[float, float]:
    older, newer = 1_780_000_000.0, 1_780_086_400.0
    make_session("rust-help", "/data/BlueLM-7B-Chat", [
        ("How do I read a file in Rust, line by line, without loading it all?", "Use `BufReader::lines()`."),
        ("and in Python?", "Iterate over the **file object**: `for line in open(path)`."),
    ], older, system="Be brief.")
    make_session("poem", "vivo-ai/BlueLM-7B-Chat", [("写一首关于杭州的诗", "西湖春色……")], newer)
    return older, newer


def test_listing_shows_turns_time_model_and_the_first_message(two_sessions: tuple[float, float]) -> None:
    older, newer = two_sessions
    result = invoke("sessions")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"poem          1 turn   {local(newer)}  vivo-ai/BlueLM-7B-Chat  “写一首关于杭州的诗”\n"
        f"rust-help     2 turns  {local(older)}  BlueLM-7B-Chat          “How do I read a file in Rust, line by l…”\n"
    )


def test_listing_aligns_names_and_models_by_their_width_on_screen() -> None:
    # A Chinese name takes two columns a character: padded by len() it pushed its row out of line.
    make_session("杭州", "/data/BlueLM-7B-Chat-32K", [("hi", "ok")], 1_780_086_400.0)
    make_session("rust", "模型", [("hi", "ok")], 1_780_000_000.0)
    stdout = invoke("sessions").stdout
    assert stdout == (
        f"杭州     1 turn   {local(1_780_086_400.0)}  BlueLM-7B-Chat-32K  “hi”\n"
        f"rust     1 turn   {local(1_780_000_000.0)}  模型                “hi”\n"
    )


def test_show_renders_json_and_markdown(two_sessions: tuple[float, float]) -> None:
    rendered = invoke("sessions", "show", "rust-help")
    assert rendered.exit_code == 0
    assert rendered.stdout == (
        "Session rust-help · /data/BlueLM-7B-Chat · 2 turns\n"
        "System: Be brief.\n"
        "\n"
        "> How do I read a file in Rust, line by line, without loading it all?\n"
        "Use `BufReader::lines()`.\n"
        "\n"
        "> and in Python?\n"
        "Iterate over the **file object**: `for line in open(path)`.\n"
        "\n"
    )
    data = json.loads(invoke("sessions", "show", "rust-help", "--json").stdout)
    assert (data["format"], data["name"], data["system"]) == ("bluelm-cli.session", "rust-help", "Be brief.")
    assert [(t["user"], t["answer"]) for t in data["turns"]][1] == ("and in Python?", "Iterate over the **file object**: `for line in open(path)`.")
    markdown = invoke("sessions", "show", "--markdown").stdout  # no name: the most recent
    assert markdown.startswith("# BlueLM chat: poem\n\n- Model: `vivo-ai/BlueLM-7B-Chat`\n")
    assert markdown.endswith("## Turn 1\n\n**You:**\n\n写一首关于杭州的诗\n\n**BlueLM:**\n\n西湖春色……\n")


def test_rm_deletes_and_unknown_names_are_one_line_errors(two_sessions: tuple[float, float]) -> None:
    sessions_dir = user_paths().sessions_dir
    missing = invoke("sessions", "rm", "poem", "nope")
    assert (missing.exit_code, missing.stdout) == (1, "")
    assert missing.stderr == f"Error: no session named 'nope' in {sessions_dir}; known sessions: poem, rust-help\n"
    assert (sessions_dir / "poem.jsonl").exists()  # nothing is deleted when one name is wrong
    removed = invoke("sessions", "rm", "poem")
    assert (removed.exit_code, removed.stdout, removed.stderr) == (0, "Removed session poem\n", "")
    assert [p.name for p in sessions_dir.iterdir()] == ["rust-help.jsonl"]
    shown = invoke("sessions", "show", "poem")
    assert (shown.exit_code, shown.stderr) == (1, f"Error: no session named 'poem' in {sessions_dir}; known sessions: rust-help\n")
    assert invoke("sessions", "show", "a/b").stderr.startswith("Error: invalid session name 'a/b'")


def test_a_name_starting_with_a_dash_gets_told_to_follow_two_dashes() -> None:
    # "Error: No such option: -d" alone left the user of a session named -dash (which `ask --session=-dash`
    # makes) guessing; the error now shows the command that works.
    make_session("-dash", "m", [("hi", "ok")], 1_780_000_000.0)
    for verb in ("show", "rm"):
        result = invoke("sessions", verb, "-dash")
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == (
            f"Error: No such option: -d; a name starting with '-' goes after '--': bluelm sessions {verb} -- -dash"
            f" (see 'bluelm sessions {verb} --help')\n"
        )
    result = invoke("sessions", "search", "-ok")
    assert result.stderr.startswith("Error: No such option: -o; a text starting with '-' goes after '--': bluelm sessions search -- -ok")
    assert invoke("sessions", "show", "--", "-dash").exit_code == 0
    assert invoke("sessions", "show", "--jsn").stderr.startswith("Error: No such option: --jsn; did you mean --json?")


def test_search_finds_text_in_messages_and_answers(two_sessions: tuple[float, float]) -> None:
    found = invoke("sessions", "search", "PYTHON")
    assert (found.exit_code, found.stderr) == (0, "")
    assert found.stdout == "rust-help #2 you: and in Python?\n"
    found = invoke("sessions", "search", "line")
    assert found.stdout == (
        "rust-help #1 you: How do I read a file in Rust, line by line, without loading it a…\n"
        "rust-help #1 bluelm: Use `BufReader::lines()`.\n"
        "rust-help #2 bluelm: …ver the **file object**: `for line in open(path)`.\n"
    )
    assert invoke("sessions", "search", "西湖").stdout == "poem #1 bluelm: 西湖春色……\n"
    nothing = invoke("sessions", "search", "kotlin")
    assert (nothing.exit_code, nothing.stdout, nothing.stderr) == (1, "", "No session has 'kotlin'.\n")


def test_search_snippets_are_cut_around_the_match() -> None:
    make_session("long", "m", [("x " * 100 + "needle" + " y" * 100, "ok")], 1_780_000_000.0)
    assert invoke("sessions", "search", "needle").stdout == (
        "long #1 you: …x x x x x x x x x x x x x x x needle y y y y y y y y y y y y y y y…\n"
    )


def test_no_sessions_yet() -> None:
    result = invoke("sessions")
    assert (result.exit_code, result.stdout) == (0, f"No sessions yet in {user_paths().sessions_dir}.\n")


@pytest.mark.parametrize("args", [["sessions"], ["sessions", "show"], ["sessions", "search", "x"], ["sessions", "rm", "x"]])
def test_sessions_commands_never_import_torch(args: list[str], two_sessions: tuple[float, float]) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bluelm_cli", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=dict(os.environ), timeout=60,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "bluelm_cli.cli.sessions" in imported  # the report was parsed
    top_level = {name.split(".")[0] for name in imported}
    assert "torch" not in top_level and "transformers" not in top_level
    assert "Traceback" not in proc.stderr
    assert proc.returncode == (1 if args[-1] == "x" else 0)


# ---------------------------------------------------------------------------------- a message never answered
@pytest.fixture
def unanswered() -> Session:
    """A session whose last message was journaled but never answered (the server failed before its first
    token, or the process ended): it must stay reachable everywhere."""
    session = Session.new(user_paths().sessions_dir, name="cut", model_id="blue")
    session.add_turn(Turn("first question", "first answer", finish_reason=FinishReason.STOP))
    session.record_message("the question nobody answered")
    session.close()
    return session


def test_show_lists_the_unanswered_message_and_how_to_send_it(unanswered: Session) -> None:
    result = invoke("sessions", "show", "cut")
    assert result.exit_code == 0
    assert result.stdout.endswith(
        "> the question nobody answered\n(not answered; bluelm chat --resume cut, then /retry, sends it)\n\n"
    )


def test_search_finds_the_unanswered_message(unanswered: Session) -> None:
    result = invoke("sessions", "search", "nobody")
    assert (result.exit_code, result.stdout) == (0, "cut #2 you (not answered): the question nobody answered\n")


def test_json_and_markdown_keep_the_unanswered_message_and_json_loads_it_back(unanswered: Session, tmp_path: Path) -> None:
    from bluelm_cli.chat import transcript

    saved = json.loads(invoke("sessions", "show", "cut", "--json").stdout)
    assert saved["pending"] == "the question nobody answered"
    assert invoke("sessions", "show", "cut", "--markdown").stdout.endswith(
        "## Not answered\n\n**You:**\n\nthe question nobody answered\n")
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(saved), encoding="utf-8")
    loaded = transcript.load(path)
    assert (len(loaded.turns), loaded.pending) == (1, "the question nobody answered")


# ------------------------------------------------------------------ a session another bluelm holds: who holds it
_HOLDER = """
import sys
from bluelm_cli.chat.journal import announce_holder
from bluelm_cli.session import Session
if sys.argv[2]:
    announce_holder(sys.argv[2])
Session.new(sys.argv[1], name="NEW", model_id="m")
print("holding", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def holder(request: pytest.FixtureRequest):  # noqa: ANN201 - a function starting a holder process
    """Start a process that holds session NEW as a `bluelm ask` or `bluelm chat` would (or as an unnamed one)."""
    started: list[subprocess.Popen[str]] = []

    def start(command: str) -> int:
        sessions_dir = user_paths().sessions_dir
        sessions_dir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(sessions_dir), command],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "holding\n"
        return process.pid

    yield start
    for process in started:
        process.communicate("\n", timeout=60)


def test_a_second_ask_on_a_session_an_ask_holds_is_told_to_wait_for_that_answer(holder) -> None:  # noqa: ANN001
    pid = holder("ask")
    result = invoke("ask", "--session", "NEW", "hello")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", (
        f"Error: session 'NEW' is in use by a bluelm ask still answering in it (process {pid}); try again when"
        " that answer is done\n"))


def test_an_ask_on_a_session_open_in_a_chat_is_told_to_continue_it_there(holder) -> None:  # noqa: ANN001
    pid = holder("chat")
    result = invoke("ask", "--session", "NEW", "hello")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", (
        f"Error: session 'NEW' is open in a bluelm chat (process {pid}); continue it there, or end that chat"
        " and try again\n"))
    result = invoke("chat", "--resume", "NEW")
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: session 'NEW' is open in a bluelm chat (process {pid});")


def test_a_holder_that_does_not_say_what_it_is_gets_the_general_wording(holder) -> None:  # noqa: ANN001
    holder("")
    result = invoke("ask", "--session", "NEW", "hello")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", (
        "Error: session 'NEW' is in use by another bluelm (a chat, or an ask still answering); end that chat or"
        " wait for the answer, then try again\n"))


def test_a_note_left_by_a_holder_that_died_is_not_believed(holder) -> None:  # noqa: ANN001
    sessions_dir = user_paths().sessions_dir
    holder("")  # holds NEW without a note of its own …
    journal = os.stat(sessions_dir / "NEW.jsonl")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    note = sessions_dir / f".holder-{journal.st_dev}-{journal.st_ino}"  # … and one left by a process long gone
    note.write_text(json.dumps({"pid": int(dead.stdout), "command": "chat"}), encoding="utf-8")
    result = invoke("ask", "--session", "NEW", "hello")
    assert result.exit_code == 1 and "is in use by another bluelm (a chat, or an ask still answering)" in result.stderr


def test_sessions_rm_names_the_ask_holding_a_session(holder) -> None:  # noqa: ANN001
    pid = holder("ask")
    result = invoke("sessions", "rm", "NEW")
    assert (result.exit_code, result.stderr) == (1, (
        f"Error: session 'NEW' is in use by a bluelm ask still answering in it (process {pid}); remove it when"
        " that answer is done\n"))


def test_the_holder_note_goes_with_the_lock(holder) -> None:  # noqa: ANN001
    from bluelm_cli.chat.journal import announce_holder

    sessions_dir = user_paths().sessions_dir
    announce_holder("chat")
    try:
        session = Session.new(sessions_dir, name="mine", model_id="m")
        assert [p.name for p in sessions_dir.glob(".holder-*")] != []
        session.close()
        assert list(sessions_dir.glob(".holder-*")) == []
    finally:
        announce_holder(None)
