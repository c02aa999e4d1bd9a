"""Defects a tester found in bluelm-cli (round of 2026-12-06), each pinned from the user's side: the REPL through
the scripted fake backend with exact transcripts, the CLI through typer's CliRunner on tiny checkpoints."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bluelm_cli.chat.background import BackgroundBackend
from bluelm_cli.chat.service import Chat
from bluelm_cli.cli.app import app
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.session import Session
from bluelm_cli.testing.fakes import FakeBackend
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint
from bluelm_cli.ui.load_view import LoadView
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.ui.repl import ChatRepl
from test_background import GatedLoad
from test_chat import new_session
from test_habits import repl_for


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()  # under the temporary BLUELM_HOME set by conftest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("findings-checkpoints")
    specs = {"tiny": TinySpec(), "ctx128": TinySpec(max_position_embeddings=128)}
    return {name: build_checkpoint(root / f"BlueLM-tiny-{name}", spec) for name, spec in specs.items()}


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "CLICOLOR_FORCE", "COLUMNS", "BLUELM_MODEL"):
        monkeypatch.delenv(name, raising=False)


def invoke(args: list[str], input: str | bytes | None = None):  # noqa: ANN201
    result = CliRunner().invoke(app, args, input=input)
    assert "Traceback" not in result.stderr, result.stderr
    return result


# ------------------------------------------------------------------ 1. a system prompt too long for the context
TOO_LONG_128 = (
    "the system prompt is 200 tokens but at most 108 fit in the 128-token context window"
    " (with the shortest message and a 16-token answer)"
)


def test_set_system_too_long_for_the_context_is_refused_and_the_old_one_stays(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(context_limit=128), new_session(paths, max_new_tokens="16"))
    repl, screen = repl_for(chat, paths, width=300)
    for line in ("/set system Be terse.", "/set system " + "s" * 200):
        repl.handle(line)
    assert screen.getvalue() == (
        "system = 'Be terse.'\n"
        f"Error: {TOO_LONG_128}; the system prompt is unchanged; give a shorter one\n"
    )
    assert chat.session.system == "Be terse." and repl.failures == 1
    # The longest that fits is taken.
    repl.handle("/set system " + "s" * 108)
    assert chat.session.system == "s" * 108


def test_set_max_new_tokens_that_leaves_the_system_prompt_no_room_is_refused(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(context_limit=128), new_session(paths, max_new_tokens="16"))
    chat.set_setting("system", "s" * 100)
    repl, screen = repl_for(chat, paths, width=300)
    repl.handle("/set max_new_tokens 64")
    assert screen.getvalue() == (
        "Error: the system prompt is 100 tokens but at most 60 fit in the 128-token context window (with the"
        " shortest message and a 64-token answer); max_new_tokens is unchanged; shorten the system prompt first"
        " (/set system none clears it)\n"
    )
    assert chat.sampling.max_new_tokens == 16


def test_a_message_after_a_system_prompt_too_long_is_not_left_pending(paths: UserPaths) -> None:
    # A journal from before the check (or edited by hand) holds a system prompt that leaves no room.
    session = new_session(paths, max_new_tokens="16")
    session.set_setting("system", "s" * 200)
    chat = Chat(FakeBackend(context_limit=128), session)
    repl, screen = repl_for(chat, paths, width=300)
    repl.handle("hi")
    assert screen.getvalue() == f"Error: {TOO_LONG_128}; shorten it or lower max_new_tokens (/set system none clears it)\n"
    assert session.pending is None and session.turns == []


def test_a_system_prompt_set_while_the_model_loads_is_checked_once_it_has(paths: UserPaths) -> None:
    load = GatedLoad(FakeBackend(context_limit=128).queue("Hi."), warn=False)
    backend = BackgroundBackend(load, status="Loading fake/BlueLM")
    chat = Chat(backend, new_session(paths, max_new_tokens="16"))
    console = Console(file=io.StringIO(), width=300)
    repl = ChatRepl(chat, ChatOutput(console, interactive=True), paths=paths)
    repl.loading = LoadView(backend, repl.out, on_loaded=repl.model_loaded)
    repl.handle("/set system Be terse.")
    repl.handle("/set system " + "s" * 200)  # can't be counted yet: taken, and checked once loaded
    assert chat.session.system == "s" * 200
    load.release.set()
    repl.handle("hi")  # waits for the model; the check runs before the message is sent
    assert console.file.getvalue() == (
        "system = 'Be terse.'\n"
        f"system = '{'s' * 60} …' (200 characters; /show system shows it all)\n"
        "Loaded fake/BlueLM in 0.1 s\n"
        f"Error: {TOO_LONG_128}; the one before is back (/set system TEXT sets a shorter one)\n"
        "Hi.\n\n"
    )
    assert chat.session.system == "Be terse."
    assert [(t.user, t.answer) for t in chat.session.turns] == [("hi", "Hi.")]


def test_ask_with_a_system_prompt_too_long_is_one_error_and_leaves_no_session(
    paths: UserPaths, models: dict[str, Path]
) -> None:
    model = ["--model", str(models["ctx128"]), "--device", "cpu", "-t", "0"]
    result = invoke(["ask", *model, "-n", "16", "--session", "s1", "--system", "word " * 300, "hi"])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: the system prompt is ") and line.endswith(
        "fit in the 128-token context window (with the shortest message and a 16-token answer); give a shorter"
        " --system (--system none drops it)"
    )
    assert list(paths.sessions_dir.glob("*.jsonl")) == []


def test_chat_script_with_a_system_prompt_too_long_is_refused_before_a_session_begins(
    paths: UserPaths, models: dict[str, Path]
) -> None:
    model = ["--model", str(models["ctx128"]), "--device", "cpu", "-t", "0"]
    result = invoke(["chat", *model, "-n", "16", "--system", "word " * 300], input="hi\n")
    assert result.exit_code == 1
    loaded, line = result.stderr.splitlines()
    assert loaded.startswith(f"Loaded {models['ctx128']} on cpu")
    assert line.startswith("Error: the system prompt is ") and line.endswith("; give a shorter --system (--system none drops it)")
    assert list(paths.sessions_dir.glob("*.jsonl")) == []


# ------------------------------------------------------------------ 2. one format for token counts
def test_a_question_too_long_counts_its_tokens_with_separators_from_stdin_and_from_a_file(
    models: dict[str, Path], tmp_path: Path
) -> None:
    model = ["--model", str(models["ctx128"]), "--device", "cpu", "-t", "0", "-n", "16"]
    text = "word " * 1200
    piped = invoke(["ask", *model], input=text)
    assert piped.exit_code == 1
    assert re.fullmatch(r"Error: the message is \d,\d{3} tokens but at most 10\d fit in the context window \(with room"
                        r" for the answer\); shorten it or lower max_new_tokens \(or pass --truncate to keep only its end\)\n",
                        piped.stderr), piped.stderr
    attached = tmp_path / "notes.txt"
    attached.write_text(text)
    from_file = invoke(["ask", *model, "-f", str(attached), "summarise"])
    assert from_file.exit_code == 1
    assert re.fullmatch(rf"Error: {re.escape(str(attached))} is \d,\d{{3}} tokens \(.*\) but at most \d+ fit in the 128-token.*\n",
                        from_file.stderr), from_file.stderr


def test_the_stats_line_and_the_meter_use_thousands_separators(paths: UserPaths) -> None:
    from bluelm_cli.core.finish import FinishReason
    from bluelm_cli.core.backend import AnswerResult
    from bluelm_cli.ui.commands import context_meter
    from bluelm_cli.ui.stats import stats_line

    assert context_meter(12345, 32768) == "12,345 / 32,768 tokens in use (37%)"
    result = AnswerResult(text="", answer_ids=[], finish_reason=FinishReason.STOP, prompt_tokens=12345, reused_tokens=1024,
                          new_tokens=1200, ttft_s=0.5, decode_tok_s=10.0, context_tokens=13545, context_limit=32768)
    line = stats_line(result)
    assert line.startswith("12,345 prompt tokens (1,024 reused) · 1,200 new") and "context 13,545/32,768" in line


# ------------------------------------------------------------------ 4. binary standard input
def test_ask_refuses_binary_standard_input_as_it_refuses_a_binary_file(models: dict[str, Path], tmp_path: Path) -> None:
    model = ["--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "3"]
    piped = invoke(["ask", *model], input=b"a\x00b")
    assert (piped.exit_code, piped.stdout, piped.stderr) == (
        1, "", "Error: standard input is binary (a NUL byte at byte 1); only text can be asked; pipe text, or extract"
        " it first (e.g. pdftotext FILE -)\n"
    )
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"a\x00b")
    from_file = invoke(["ask", *model, "-f", str(binary), "what is it?"])
    assert (from_file.exit_code, from_file.stderr) == (1, f"Error: {binary} is a binary file (3 bytes); only text files can go into a message\n")


# ------------------------------------------------------------------ 5. an existing --session NAME
@pytest.mark.parametrize(("name", "command"), [("work", "bluelm chat --resume work"), ("-x", "bluelm chat --resume=-x")])
def test_chat_session_with_a_name_in_use_gives_the_command_that_resumes_it(
    paths: UserPaths, models: dict[str, Path], name: str, command: str
) -> None:
    Session.new(paths.sessions_dir, name=name, model_id=str(models["tiny"])).close()
    result = invoke(["chat", "--model", str(models["tiny"]), "--device", "cpu", f"--session={name}"], input="")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == (
        f"Error: session '{name}' already exists in {paths.sessions_dir}; continue it with `{command}`, or choose"
        " another name"
    )
