"""Issue 21, the newcomer's first hour: what people coming from `ollama run`, `llm chat` and `aichat` trip on.

Each test is written from the user's side: the REPL through the scripted fake backend with exact
transcripts (``repl_for``, script mode, or prompt_toolkit's pipe input as in test_repl.py), the CLI
through typer's CliRunner with exact output, on tiny checkpoints.
"""

from __future__ import annotations

import re

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
        f" · decode 100.0 tokens/s · context {prompt + 14}/2,048\n\n"
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
        f" · context {prompt + 2}/2,048 · finish: interrupted\n\n"
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


# ---------------------------------------------------------------------------- the CLI, on tiny checkpoints
from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from bluelm_cli.cli.app import app  # noqa: E402
from bluelm_cli.session import Session  # noqa: E402
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint  # noqa: E402

DEFAULT_MODEL = "vivo-ai/BlueLM-7B-Chat"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("newcomer-checkpoints")
    specs = {"tiny": TinySpec(), "ctx128": TinySpec(max_position_embeddings=128)}
    return {name: build_checkpoint(root / f"BlueLM-tiny-{name}", spec) for name, spec in specs.items()}


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "CLICOLOR_FORCE", "COLUMNS", "BLUELM_MODEL"):
        monkeypatch.delenv(name, raising=False)


def invoke(args: list[str], input: str | None = None, env: dict[str, str] | None = None):  # noqa: ANN201
    result = CliRunner().invoke(app, args, input=input, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def recorded_session(paths: UserPaths, model: Path, name: str = "old") -> Session:
    session = Session.new(paths.sessions_dir, name=name, model_id=str(model))
    session.close()
    return session


# 1. A resumed session uses its own model.
def test_chat_resume_loads_the_sessions_model_and_says_so(paths: UserPaths, models: dict[str, Path]) -> None:
    recorded_session(paths, models["tiny"])
    result = invoke(["chat", "--resume", "old", "--device", "cpu"], input="/exit\n")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"Continuing session old with its model {models['tiny']} (the configured model is {DEFAULT_MODEL};"
        " --model chooses another)"
    )
    assert result.stderr.splitlines()[1].startswith(f"Loaded {models['tiny']} on cpu")


def test_ask_continue_loads_the_sessions_model(paths: UserPaths, models: dict[str, Path]) -> None:
    recorded_session(paths, models["tiny"])
    result = invoke(["ask", "-c", "--device", "cpu", "-t", "0", "-n", "3", "hi"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        f"Continuing session old with its model {models['tiny']} (the configured model is {DEFAULT_MODEL};"
        " --model chooses another)\n"
    )
    assert [t.user for t in Session.resume(paths.sessions_dir, "old").turns] == ["hi"]


def test_a_model_given_with_model_wins_over_the_sessions(paths: UserPaths, models: dict[str, Path]) -> None:
    recorded_session(paths, Path("/nonexistent/model"))
    result = invoke(["ask", "-c", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "3", "hi"])
    assert result.exit_code == 0 and result.stderr == ""


# 6. Flags mean one thing everywhere.
def test_chat_c_continues_the_latest_session(paths: UserPaths, models: dict[str, Path]) -> None:
    recorded_session(paths, models["tiny"], name="latest")
    result = invoke(["chat", "-c", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "3"],
                    input="hello\n")
    assert result.exit_code == 0, result.stderr
    assert [t.user for t in Session.resume(paths.sessions_dir, "latest").turns] == ["hello"]


def test_chat_with_a_message_starts_with_it(paths: UserPaths, models: dict[str, Path]) -> None:
    result = invoke(["chat", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "3",
                     "--session", "greeting", "hi"], input="")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1  # the answer to "hi", and nothing else
    assert [t.user for t in Session.resume(paths.sessions_dir, "greeting").turns] == ["hi"]


def test_export_f_is_no_longer_format_and_says_what_to_use() -> None:
    result = invoke(["export", "x.gguf", "-f", "gguf"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "Error: No such option: -f; the format is --format hf|gguf, or the name of OUT (model.gguf is GGUF);"
        " -f is --file in bluelm ask (see 'bluelm export --help')\n"
    )


# 9. Guessable defaults.
def test_export_infers_gguf_from_the_suffix(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    result = invoke(["export", str(out), "--model", str(models["tiny"]), "--dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"Exported {models['tiny']} to {out} (gguf)\n"
    assert out.read_bytes()[:4] == b"GGUF"


def test_bench_on_the_cpu_refuses_7b_shapes_that_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import bluelm_cli.cli.bench_command as bench_module

    monkeypatch.setattr(bench_module, "_free_memory", lambda: 8_000_000_000)  # a machine with 8 GB free
    result = invoke(["bench", "--random-weights", "--shape", "7b", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "Error: --shape 7b has 7.3B parameters: about 29.2 GB of float32 weights, and this machine has 8.0 GB"
        " free; use --shape cpu25m on the CPU, or a GPU (--device cuda)\n"
    )


def test_bench_on_the_cpu_defaults_to_cpu_sized_shapes_and_takes_max_new_tokens() -> None:
    result = invoke(["bench", "--random-weights", "--device", "cpu", "--turns", "1", "--prompt-tokens", "8",
                     "--new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert "cpu25m" in report["model"] and len(report["turns"]) == 1


# 7. Noise.
def test_ask_prints_no_loaded_line_without_v(models: dict[str, Path]) -> None:
    quiet = invoke(["ask", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "3", "hi"])
    assert quiet.exit_code == 0 and quiet.stderr == ""  # nor a CPU warning: a tiny model is not slow there
    verbose = invoke(["ask", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "3", "-v", "hi"])
    assert verbose.stderr.startswith(f"Loaded {models['tiny']} on cpu")


def test_the_cpu_warning_comes_from_the_models_size() -> None:
    from bluelm_cli.bench.local import CPU_25M
    from bluelm_cli.core.sizes import SLOW_ON_CPU_PARAMETERS, parameter_count
    from bluelm_cli.testing.tiny_checkpoint import PUBLISHED_7B

    assert parameter_count(PUBLISHED_7B) == 7_296_266_240 >= SLOW_ON_CPU_PARAMETERS
    assert parameter_count(dict(CPU_25M, vocab_size=100096)) < SLOW_ON_CPU_PARAMETERS


# 10. Small contexts.
def test_ask_on_a_small_context_clamps_the_budget_and_says_so_with_v(models: dict[str, Path]) -> None:
    quiet = invoke(["ask", "--model", str(models["ctx128"]), "--device", "cpu", "-t", "0", "hi"])
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == ""
    verbose = invoke(["ask", "--model", str(models["ctx128"]), "--device", "cpu", "-t", "0", "-v", "--json", "hi"])
    lines = verbose.stderr.splitlines()
    prompt = 128 - int(lines[1].split(" to ")[1].split(":")[0])
    assert lines[1] == (
        f"Note: max_new_tokens lowered from 512 to {128 - prompt}: the model's context is 128 tokens and the"
        f" prompt takes {prompt}"
    )
    import json

    assert json.loads(verbose.stdout)["prompt_tokens"] == prompt
    given = invoke(["ask", "--model", str(models["ctx128"]), "--device", "cpu", "-n", "512", "hi"])
    assert given.exit_code == 2
    assert given.stderr == "Error: max_new_tokens must be less than the model's context window (128 tokens), got 512\n"


# 12. Prefill speed in ask --json.
def test_ask_json_has_prefill_and_decode_speed(models: dict[str, Path]) -> None:
    import json

    result = invoke(["ask", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "-n", "4", "--json", "hi"])
    payload = json.loads(result.stdout)
    assert payload["prefill_tok_s"] > 0 and payload["reused_tokens"] == 0
    assert payload["context_limit"] == 2048 and payload["context_tokens"] > payload["prompt_tokens"]


# 8. Narrow and colourless terminals.
@pytest.mark.parametrize("command", [[], ["chat"], ["ask"], ["export"], ["bench"], ["config"], ["sessions", "show"],
                                     ["sessions", "rm"], ["sessions", "search"]])
def test_help_fits_60_columns_and_names_values_not_types(command: list[str]) -> None:
    import os
    import subprocess
    import sys

    # A real process: the help's width comes from the terminal (here COLUMNS), which CliRunner pins at 80.
    env = {**os.environ, "COLUMNS": "60", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "bluelm_cli", *command, "--help"], capture_output=True,
                            text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "<" not in text and "[[" not in text and "{" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 60, text


def test_no_color_code_blocks_are_still_fenced() -> None:
    import io

    from bluelm_cli.ui.render import render_markdown

    console = Console(file=io.StringIO(), force_terminal=True, width=60, no_color=True)
    render_markdown(console, "Run:\n\n```python\ndef f(x):\n    return x\n```\n")
    assert [line.rstrip() for line in console.file.getvalue().splitlines()] == [
        "Run:", "", "```python", "def f(x):", "    return x", "```",
    ]


def test_warnings_wrap_at_word_boundaries_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setenv("TERM", "xterm-256color")  # a real terminal, not the dumb one the tests pin

    from bluelm_cli.ui.output import ChatOutput

    console = Console(file=io.StringIO(), force_terminal=True, width=40, no_color=True)
    ChatOutput(console).warn("the prompt history is not kept: cannot write the history file here")
    assert [line.rstrip() for line in console.file.getvalue().splitlines()] == [
        "Warning: the prompt history is not kept:", "cannot write the history file here",
    ]


def test_gguf_export_without_the_gguf_package_says_what_to_install(models: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    result = invoke(["export", str(tmp_path / "m.gguf"), "--model", str(models["tiny"])])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "Error: GGUF export needs the gguf package: pip install 'bluelm-cli[export]' (or pip install gguf)\n"


def test_new_tokens_is_an_alias_of_max_new_tokens_in_ask(models: dict[str, Path]) -> None:
    import json

    result = invoke(["ask", "--model", str(models["tiny"]), "--device", "cpu", "-t", "0", "--new-tokens", "3", "--json", "hi"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["new_tokens"] <= 3


# ---------------------------------------------------------------------------- /clear names the new session after the old
def test_clear_in_a_named_session_numbers_the_next_one_after_it(paths: UserPaths) -> None:
    backend = FakeBackend().queue("One.", "Two.", "Three.")
    chat = Chat(backend, new_session(paths, name="work"))
    new_session(paths, name="work-3").close()  # taken already: skipped
    repl, screen = repl_for(chat, paths, width=200)
    repl.handle("first")
    repl.handle("/clear")
    repl.handle("second")
    repl.handle("/clear")
    repl.handle("third")
    assert chat.session.name == "work-4"
    assert screen.getvalue() == (
        "One.\n\n"
        "New session work-2; settings kept. The earlier turns stay in session work (bluelm chat --resume work).\n"
        "Two.\n\n"
        "New session work-4; settings kept. The earlier turns stay in session work-2 (bluelm chat --resume work-2).\n"
        "Three.\n\n"
    )


def test_clear_in_a_session_named_by_its_start_time_starts_one_named_by_the_time_again(paths: UserPaths) -> None:
    from bluelm_cli.session import Session

    backend = FakeBackend().queue("One.")
    chat = Chat(backend, Session.new(paths.sessions_dir, model_id="fake/BlueLM"))
    repl, _ = repl_for(chat, paths, width=200)
    repl.handle("first")
    repl.handle("/clear")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-\d{6}(-\d+)?", chat.session.name)


def test_clear_in_a_session_whose_numbered_name_would_be_too_long_falls_back_to_the_time(paths: UserPaths) -> None:
    backend = FakeBackend().queue("One.")
    chat = Chat(backend, new_session(paths, name="x" * 100))
    repl, _ = repl_for(chat, paths, width=300)
    repl.handle("first")
    repl.handle("/clear")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-\d{6}(-\d+)?", chat.session.name)


# ---------------------------------------------------------------------------- --resume with a dash-leading value
def test_resume_takes_a_dash_leading_session_name_that_is_not_an_option(paths: UserPaths, models: dict[str, Path]) -> None:
    Session.new(paths.sessions_dir, name="-x", model_id=str(models["tiny"])).close()
    Session.new(paths.sessions_dir, name="later", model_id=str(models["tiny"])).close()  # the most recent one
    result = invoke(["chat", "--resume", "-x", "--device", "cpu", "-n", "2"], input="hello\n")
    assert result.exit_code == 0, result.stderr
    assert [t.user for t in Session.resume(paths.sessions_dir, "-x").turns] == ["hello"]
    assert Session.resume(paths.sessions_dir, "later").turns == []


def test_resume_of_a_dash_leading_name_that_does_not_exist_names_it(paths: UserPaths) -> None:
    result = invoke(["chat", "--resume", "-x"], input="")
    assert (result.exit_code, result.stdout, result.stderr) == (
        1, "", f"Error: no session named '-x' in {paths.sessions_dir}; there are no saved sessions yet\n"
    )


@pytest.mark.parametrize("option", [["-v"], ["--verbose"], ["--model", "m"], ["--model=m"], ["-n", "3"], ["-n3"], ["--"]])
def test_resume_followed_by_an_option_of_chat_continues_the_most_recent_session(paths: UserPaths, option: list[str]) -> None:
    result = invoke(["chat", "--resume", *option], input="")
    assert (result.exit_code, result.stdout, result.stderr) == (
        1, "", f"Error: there are no saved sessions in {paths.sessions_dir} yet; start a new chat instead\n"
    )


# ---------------------------------------------------------------------------- the toolbar fits the terminal
LONG_NAME = "2026-planning-for-the-hangzhou-offsite-and-the-q3-review"
from prompt_toolkit.utils import get_cwidth  # noqa: E402


def _toolbar_text(repl, width: int) -> str:  # noqa: ANN001
    [(style, text)] = repl.context_toolbar(width=width)
    assert style == "class:bottom-toolbar.text"
    return text


@pytest.mark.parametrize(("width", "expected"), [
    (120, " context 12 / 100 tokens in use (12%) · session 2026-planning-for-the-hangzhou-offsite-and-the-q3-review "),
    (60, " context 12/100 (12%) · 2026-planning-for…and-the-q3-review "),  # the meter's words go first
    (40, " context 12/100 (12%) · 2026-pl…-review "),
])
def test_the_toolbar_keeps_the_context_meter_and_shortens_a_long_session_name_in_the_middle(
    paths: UserPaths, width: int, expected: str
) -> None:
    backend = FakeBackend(context_limit=100).queue("Ok.")
    chat = Chat(backend, new_session(paths, name=LONG_NAME, max_new_tokens="20"))
    repl, _ = repl_for(chat, paths, width=200)
    repl.handle("hello")
    text = _toolbar_text(repl, width)
    assert text == expected and get_cwidth(text) <= width


def test_the_toolbar_at_a_very_narrow_terminal_keeps_the_meter_alone(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(context_limit=2048), new_session(paths, name=LONG_NAME))
    repl, _ = repl_for(chat, paths, width=200)
    assert _toolbar_text(repl, 24) == " context 1/2,048 (0%) "


@pytest.mark.parametrize(("width", "expected"), [
    (22, " 12/2,048 (0%) "),  # the meter's label goes first
    (20, " 12/2,048 (0%) "),
    (14, " 12/2,048 "),  # then its share
    (9, "12/2,048"),  # then its padding
    (4, "0%"),
])
def test_the_toolbar_at_20_columns_and_less_keeps_the_shortest_useful_meter(
    paths: UserPaths, width: int, expected: str
) -> None:
    chat = Chat(FakeBackend(context_limit=2048).queue("Ok."), new_session(paths, name=LONG_NAME, max_new_tokens="4"))
    repl, _ = repl_for(chat, paths, width=200)
    repl.handle("hello")
    used = chat.context_used()
    text = _toolbar_text(repl, width)
    assert used == 12 and text == expected and get_cwidth(text) <= width


def test_the_toolbar_measures_a_chinese_session_name_in_terminal_cells(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(context_limit=100), new_session(paths, name="杭州西湖春季旅行计划和预算表"))
    repl, _ = repl_for(chat, paths, width=200)
    text = _toolbar_text(repl, 50)
    assert text == " context 1/100 (1%) · 杭州西湖春季…计划和预算表 " and get_cwidth(text) == 48  # 2 cells a character
    assert _toolbar_text(repl, 80) == " context 1 / 100 tokens in use (1%) · session 杭州西湖春季旅行计划和预算表 "


def test_the_toolbar_follows_the_width_of_the_running_prompt(paths: UserPaths) -> None:
    from prompt_toolkit.application import Application
    from prompt_toolkit.application.current import set_app
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.output import DummyOutput

    class Narrow(DummyOutput):
        def get_size(self) -> Size:
            return Size(rows=24, columns=40)

    chat = Chat(FakeBackend(context_limit=100), new_session(paths, name=LONG_NAME))
    repl, _ = repl_for(chat, paths, width=200)
    with set_app(Application(output=Narrow())):
        [(_, text)] = repl.context_toolbar()
    assert text == " context 1/100 (1%) · 2026-pla…3-review "
