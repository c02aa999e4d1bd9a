"""The `bluelm` command line, end to end: exact outputs, exact one-line errors, exit statuses.

In-process runs go through typer's CliRunner (stdout and stderr apart); what needs a real process —
import cost, a closed pipe, Ctrl-C — runs `python -m bluelm_cli` in a subprocess. Answers come from tiny
random-weight checkpoints, so they are gibberish: tests assert on structure, or compare a greedy
(temperature 0) answer with the engine driven directly on the prompt the CLI is specified to build.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bluelm_cli import __version__
from bluelm_cli.cli.app import app
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.core.prompt import ContextOverflowError, fit_prompt
from bluelm_cli.local.loading import load_model
from bluelm_cli.session import Session
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

runner = CliRunner()

MISSING_MODEL = "Error: model folder /nonexistent does not exist; pass an existing folder or a hub id such as vivo-ai/BlueLM-7B-Chat\n"
# A prompt whose greedy answer from the default tiny checkpoint runs to max_new_tokens and holds no ESC byte.
GREEDY_PROMPT = "hello"
ENDLESS_PROMPT = "Tell me a story"  # any prompt: the "endless" checkpoint never ends an answer by itself


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-checkpoints")
    specs = {
        "tiny": TinySpec(),
        "ctx128": TinySpec(max_position_embeddings=128),
        "endless": TinySpec(max_position_embeddings=8192, endless=True),
        "echo": TinySpec(echo=True, endless=True),
    }
    return {name: build_checkpoint(root / f"BlueLM-tiny-{name}", spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def tiny(models: dict[str, Path]) -> Path:
    return models["tiny"]


@pytest.fixture(scope="module")
def tiny_engine(tiny: Path) -> ChatEngine:
    """The reference: the default tiny checkpoint driven without the CLI."""
    return ChatEngine(load_model(str(tiny), device="cpu"))


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "CLICOLOR_FORCE", "COLUMNS", "BLUELM_MODEL"):
        monkeypatch.delenv(name, raising=False)


def greedy_answer(engine: ChatEngine, prompt: str, max_new_tokens: int) -> tuple[str, int, str]:
    """(answer, prompt tokens, finish reason) at temperature 0, everything else at the built-in defaults."""
    engine.reset()  # a fresh prefill, exactly like a new `bluelm ask` process
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    plan = fit_prompt(engine.encoder, None, [], prompt, context_limit=engine.context_limit, max_new_tokens=max_new_tokens)
    result = engine.stream(plan, settings).finish()
    return result.text, result.prompt_tokens, result.finish_reason


def invoke(args: list[str], input: str | bytes | None = None):  # noqa: ANN201 - typer's Result
    result = runner.invoke(app, args, input=input)
    assert "Traceback" not in result.stderr
    return result


def ask(model: Path, *args: str, input: str | bytes | None = None):  # noqa: ANN201
    return invoke(["ask", "--model", str(model), "--device", "cpu", *args], input=input)


def stderr_lines(result) -> list[str]:  # noqa: ANN001
    return result.stderr.splitlines()


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "0"
    return env


# ----------------------------------------------------------------------------------------------- ask
def test_ask_argument_prints_the_plain_answer_and_a_newline(tiny: Path, tiny_engine: ChatEngine) -> None:
    expected, _, _ = greedy_answer(tiny_engine, GREEDY_PROMPT, 12)
    result = ask(tiny, "-t", "0", "-n", "12", GREEDY_PROMPT)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "\x1b" not in expected and "\x1b" not in result.stdout and "\x1b" not in result.stderr
    assert expected.strip()  # a real answer, not an empty line


def test_ask_reads_the_prompt_from_stdin(tiny: Path, tiny_engine: ChatEngine) -> None:
    expected, prompt_tokens, _ = greedy_answer(tiny_engine, "what is this?", 8)
    result = ask(tiny, "-t", "0", "-n", "8", "--json", input="what is this?\n")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["answer"] == expected
    assert payload["prompt_tokens"] == prompt_tokens


def test_ask_puts_stdin_first_then_a_blank_line_then_the_argument(tiny: Path, tiny_engine: ChatEngine) -> None:
    combined = "line one\nline two\n\nsummarize"  # trailing newlines of stdin are dropped, then "\n\n"
    expected, prompt_tokens, _ = greedy_answer(tiny_engine, combined, 10)
    _, argument_only_tokens, _ = greedy_answer(tiny_engine, "summarize", 10)
    result = ask(tiny, "-t", "0", "-n", "10", "--json", "summarize", input="line one\nline two\n\n\n")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["answer"] == expected
    assert payload["prompt_tokens"] == prompt_tokens > argument_only_tokens

    # The same prompt, plain: the answer and one newline, nothing else.
    plain = ask(tiny, "-t", "0", "-n", "10", "summarize", input="line one\nline two\n")
    assert plain.exit_code == 0, plain.stderr
    assert plain.stdout == expected + "\n"


def test_ask_json_is_one_object_and_nothing_else(tiny: Path) -> None:
    result = ask(tiny, "-n", "5", "--seed", "7", "--json", "hi")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
    payload = json.loads(result.stdout)
    assert list(payload) == ["answer", "finish_reason", "prompt_tokens", "reused_tokens", "new_tokens", "ttft_s",
                             "prefill_tok_s", "decode_tok_s", "context_tokens", "context_limit", "forwards",
                             "forwards_per_token"]
    # Plain decoding: the prefill gives the first token and each further one takes a forward.
    assert payload["forwards"] == max(1, payload["new_tokens"]) + (payload["finish_reason"] == "stop")
    assert isinstance(payload["answer"], str)
    assert payload["finish_reason"] in ("stop", "length")
    assert isinstance(payload["prompt_tokens"], int) and payload["prompt_tokens"] > 0
    assert isinstance(payload["new_tokens"], int) and 0 <= payload["new_tokens"] <= 5
    assert payload["ttft_s"] >= 0 and payload["decode_tok_s"] >= 0


def test_ask_prompt_lookup_gives_the_same_greedy_answer_in_fewer_forwards(models: dict[str, Path]) -> None:
    # The echo checkpoint repeats itself on any torch and sentencepiece, so drafts must hit: a random model's
    # answer to a repetitive prompt loops or not depending on the vocabulary the installed trainer built.
    tiny = models["echo"]
    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."
    plain = json.loads(ask(tiny, "-t", "0", "-n", "40", "--no-prompt-lookup", "--json", prompt).stdout)
    result = ask(tiny, "-t", "0", "-n", "40", "--prompt-lookup", "--json", prompt)
    # Unset, it is on for the eager path (the CPU): the same figures as --prompt-lookup.
    default = json.loads(ask(tiny, "-t", "0", "-n", "40", "--json", prompt).stdout)
    assert (default["answer"], default["forwards"]) == (json.loads(result.stdout)["answer"], json.loads(result.stdout)["forwards"])
    assert result.exit_code == 0, result.stderr
    looked_up = json.loads(result.stdout)
    assert looked_up["answer"] == plain["answer"] and looked_up["new_tokens"] == plain["new_tokens"]
    assert looked_up["forwards"] < plain["forwards"]
    assert looked_up["forwards_per_token"] == round(looked_up["forwards"] / looked_up["new_tokens"], 4) < 1


def test_ask_verbose_statistics_go_to_stderr(tiny: Path, tiny_engine: ChatEngine) -> None:
    expected, prompt_tokens, finish = greedy_answer(tiny_engine, GREEDY_PROMPT, 6)
    result = ask(tiny, "-t", "0", "-n", "6", "--verbose", GREEDY_PROMPT)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    stats = [line for line in stderr_lines(result) if "prompt tokens" in line]
    assert len(stats) == 1
    assert stats[0].startswith(f"{prompt_tokens} prompt tokens (0 reused) · 6 new · first token ")
    assert stats[0].endswith(f"/2,048 · finish: {finish}") and finish == "length"
    assert "prompt tokens" not in result.stdout and "tok/s" not in result.stdout


# -------------------------------------------------------------------------------------------- errors
def test_missing_model_folder_is_one_line_and_status_1() -> None:
    result = invoke(["ask", "--model", "/nonexistent", "hi"])
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", MISSING_MODEL)


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["ask", "--model", "/nonexistent", "--debug", "hi"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.endswith(MISSING_MODEL)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "-1"], "temperature must be a number from 0 to 2 (0 = greedy), got '-1'"),
        (["-t", "hot"], "temperature must be a number from 0 to 2 (0 = greedy), got 'hot'"),
        (["--top-p", "2"], "top_p must be a number greater than 0 and at most 1, got '2'"),
        (["--top-k", "-3"], "top_k must be a whole number of at least 0 (0 disables it), got '-3'"),
        (["--max-new-tokens", "0"], "max_new_tokens must be a whole number of at least 1, got '0'"),
        (["--repetition-penalty", "3"], "repetition_penalty must be a number from 1.0 to 2.0 (1.0 = no penalty), got '3'"),
        (["--load-in-8bit", "--load-in-4bit"], "choose one of --load-in-8bit and --load-in-4bit"),
    ],
)
def test_bad_option_values_are_usage_errors(option: list[str], message: str) -> None:
    # /nonexistent proves the check comes before any loading.
    result = invoke(["ask", "--model", "/nonexistent", *option, "hi"])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"Error: {message}\n")


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["ask", "--frobnicate", "hi"], "Error: No such option: --frobnicate"),
        (["--frobnicate"], "Error: No such option: --frobnicate"),
        (["frobnicate"], "Error: No such command 'frobnicate'"),
        (["ask", "-t"], "Error: Option '-t' requires an argument"),
        (["config", "extra"], "Error: Got unexpected extra argument"),
    ],
)
def test_click_usage_errors_are_one_line_and_status_2(args: list[str], start: str) -> None:
    result = invoke(args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(start)
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("--help')\n")


def test_no_arguments_shows_the_help_without_an_error_line() -> None:
    result = invoke([])
    assert result.exit_code == 2
    assert "ask" in result.stdout and "config" in result.stdout
    assert "Error" not in result.stderr


def test_empty_prompt_is_a_usage_error() -> None:
    message = "Error: nothing to ask: give a prompt as an argument or on standard input, e.g. bluelm ask '你好'\n"
    for args, stdin in ((["ask"], ""), (["ask"], "\n\n"), (["ask", "   "], None)):
        result = invoke([*args[:1], "--model", "/nonexistent", *args[1:]], input=stdin)
        assert (result.exit_code, result.stdout, result.stderr) == (2, "", message)


def test_invalid_utf8_on_stdin_is_a_usage_error() -> None:
    result = invoke(["ask", "--model", "/nonexistent"], input=b"ok \xff\xfe then")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "Error: standard input is not valid UTF-8 (byte 3); convert it first, e.g. with iconv -t UTF-8\n"


def test_prompt_over_the_context_is_refused_with_the_token_counts(models: dict[str, Path]) -> None:
    small = models["ctx128"]
    prompt = " ".join(f"word{i}" for i in range(150))
    engine = ChatEngine(load_model(str(small), device="cpu"))
    with pytest.raises(ContextOverflowError) as overflow:
        fit_prompt(engine.encoder, None, [], prompt, context_limit=engine.context_limit, max_new_tokens=16)
    assert overflow.value.message_tokens == engine.count_tokens(prompt) > 128
    assert 0 < overflow.value.fits < 128 - 16

    result = ask(small, "-n", "16", prompt)
    assert result.exit_code == 1
    assert result.stdout == ""
    last = stderr_lines(result)[-1]
    assert last == (
        f"Error: the message is {overflow.value.message_tokens} tokens but at most {overflow.value.fits} fit in the "
        "context window (with room for the answer); shorten it or lower max_new_tokens (or pass --truncate to keep only its end)"
    )
    assert all(line.startswith(("Warning:", "Loaded ", "Error:")) for line in stderr_lines(result))

    truncated = ask(small, "-n", "16", "--truncate", "--json", prompt)
    assert truncated.exit_code == 0, truncated.stderr
    notes = [line for line in stderr_lines(truncated) if line.startswith("Note:")]
    assert len(notes) == 1
    match = re.fullmatch(rf"Note: the prompt was {overflow.value.message_tokens} tokens; kept its last (\d+) \(--truncate\)", notes[0])
    assert match and 0 < int(match.group(1)) <= overflow.value.fits
    payload = json.loads(truncated.stdout)
    assert payload["prompt_tokens"] + 16 <= 128


# -------------------------------------------------------------------------------------------- config
def write_config(text: str) -> Path:
    path = Path(os.environ["BLUELM_HOME"]) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_line(name: str, shown: str, source: str) -> str:
    return f"{name:<18}  {shown:<28}  {source}"


def test_config_shows_defaults_and_paths() -> None:
    home = Path(os.environ["BLUELM_HOME"])
    result = invoke(["config"])
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == 'model               "vivo-ai/BlueLM-7B-Chat"      default'
    assert config_line("temperature", "0.7", "default") in lines
    assert config_line("seed", "(unset)", "default") in lines
    assert config_line("compile", "true", "default") in lines
    assert lines[-3:] == [
        f"config file   {home / 'config.toml'}  (not created yet)",
        f"sessions      {home / 'sessions'}",
        f"history       {home / 'data' / 'history'}",
    ]


def test_config_precedence_flag_over_env_over_file(monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config('temperature = 0.3\nmodel = "/from/config"\n')
    source = f"config file {path}"

    lines = invoke(["config"]).stdout.splitlines()
    assert config_line("model", '"/from/config"', source) in lines
    assert config_line("temperature", "0.3", source) in lines
    assert config_line("top_p", "0.9", "default") in lines
    assert f"config file   {path}" in lines

    monkeypatch.setenv("BLUELM_MODEL", "/from/env")
    lines = invoke(["config"]).stdout.splitlines()
    assert config_line("model", '"/from/env"', "env BLUELM_MODEL") in lines
    assert config_line("temperature", "0.3", source) in lines

    result = invoke(["config", "--model", "/from/flag", "--json"])
    assert result.exit_code == 0
    settings = json.loads(result.stdout)["settings"]
    assert settings["model"] == {"value": "/from/flag", "source": "flag"}
    assert settings["temperature"] == {"value": 0.3, "source": source}
    assert settings["top_k"] == {"value": 0, "source": "default"}


def test_ask_uses_the_configured_model_and_temperature(
    tiny: Path, tiny_engine: ChatEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(f"temperature = 0\nmodel = {json.dumps(str(tiny))}\ndevice = \"cpu\"\n")
    expected, _, _ = greedy_answer(tiny_engine, GREEDY_PROMPT, 6)
    result = invoke(["ask", "-n", "6", "--json", "-v", GREEDY_PROMPT])  # -v: the "Loaded …" line says which model
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["answer"] == expected  # greedy: the config's temperature 0 was used
    assert f"Loaded {tiny} on cpu" in result.stderr

    monkeypatch.setenv("BLUELM_MODEL", "/nonexistent")  # the environment beats the file
    result = invoke(["ask", "-n", "6", GREEDY_PROMPT])
    assert (result.exit_code, result.stderr) == (1, MISSING_MODEL)

    result = invoke(["ask", "--model", str(tiny), "-n", "6", GREEDY_PROMPT])  # the flag beats the environment
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("command", [["config"], ["ask", "hi"]])
def test_bad_config_value_is_one_line_and_status_1(command: list[str]) -> None:
    path = write_config("temperature = 5\n")
    result = invoke(command)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: config file {path}, key 'temperature': temperature must be a number from 0 to 2 (0 = greedy), got '5'\n"
    )


def test_bad_config_syntax_and_unknown_key() -> None:
    path = write_config("temperature = \n")
    result = invoke(["config"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"Error: config file {path} is not valid TOML: ")
    assert result.stderr.endswith("; fix that line\n") and result.stderr.count("\n") == 1

    write_config("temprature = 0.5\n")
    result = invoke(["config"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: config file {path}: unknown setting 'temprature'; known settings: model, source, device, dtype, "
        "max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system, api, compile, kv_cache, quantize, "
            "context_shift, prompt_lookup, history\n"
    )


# --------------------------------------------------------------------------- version, help, sessions
def test_version() -> None:
    for flag in ("--version", "-V"):
        result = invoke([flag])
        assert (result.exit_code, result.stdout, result.stderr) == (0, f"bluelm-cli {__version__}\n", "")
    assert __version__ == "0.1.0"


def test_help() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0 and result.stderr == ""
    for command in ("ask", "chat", "config", "sessions"):
        assert command in result.stdout
    result = invoke(["ask", "-h"])
    assert result.exit_code == 0
    assert "--truncate" in result.stdout and "--json" in result.stdout


def test_sessions_when_there_are_none() -> None:
    result = invoke(["sessions"])
    sessions_dir = Path(os.environ["BLUELM_HOME"]) / "sessions"
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"No sessions yet in {sessions_dir}.\n", "")


@pytest.mark.parametrize(
    ("args", "status", "stdout_start"),
    [
        (["--help"], 0, ""),
        (["--version"], 0, "bluelm-cli "),
        (["ask", "--temperature", "-1", "x"], 2, ""),
        (["ask", "--frobnicate", "x"], 2, ""),
        (["config"], 0, "model "),
    ],
)
def test_light_commands_never_import_torch(args: list[str], status: int, stdout_start: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bluelm_cli", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=subprocess_env(), timeout=60,
    )
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stdout.startswith(stdout_start)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "bluelm_cli.cli.app" in imported  # the report was parsed
    top_level = {name.split(".")[0] for name in imported}
    assert "torch" not in top_level and "transformers" not in top_level
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ real processes, signals
def wait_readable(stream, timeout: float) -> None:  # noqa: ANN001
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        assert selector.select(timeout), "no output in time"


@pytest.mark.slow
def test_closed_pipe_ends_quietly_with_status_0(models: dict[str, Path]) -> None:
    endless = models["endless"]
    _, _, finish = greedy_answer(ChatEngine(load_model(str(endless), device="cpu")), ENDLESS_PROMPT, 200)
    assert finish == "length"  # the answer goes on long after the reader has gone
    proc = subprocess.Popen(
        [sys.executable, "-m", "bluelm_cli", "ask", "--model", str(endless), "--device", "cpu", "-t", "0", "-n", "200", ENDLESS_PROMPT],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(),
    )
    try:
        wait_readable(proc.stdout, 60)
        assert os.read(proc.stdout.fileno(), 1)  # like `| head -c 1`
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        status = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert status == 0, stderr
    assert "Traceback" not in stderr and "Error" not in stderr and "Exception" not in stderr


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_with_status_130(models: dict[str, Path]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bluelm_cli", "ask", "--model", str(models["endless"]), "--device", "cpu",
         "-t", "0", "-n", "8000", ENDLESS_PROMPT],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if the test runner ignores SIGINT
    )
    try:
        wait_readable(proc.stdout, 60)
        first = os.read(proc.stdout.fileno(), 1)
        assert first
        proc.send_signal(signal.SIGINT)
        rest, stderr_bytes = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stderr = stderr_bytes.decode()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.splitlines()[-1] == "Interrupted."
    assert (first + rest).endswith(b"\n")  # the partial answer is kept and ends the line


# ------------------------------------------------------------------------------ ask -c, --session, -f
def test_ask_continues_a_session_like_a_chat_turn(tiny: Path, tiny_engine: ChatEngine) -> None:
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.core.prompt import HistoryTurn

    first = ask(tiny, "-t", "0", "-n", "6", "--session", "pipe", GREEDY_PROMPT)
    assert first.exit_code == 0, first.stderr
    second = ask(tiny, "-t", "0", "-n", "6", "-c", "and then?")
    assert second.exit_code == 0, second.stderr
    session = Session.resume(user_paths().sessions_dir, "pipe")
    assert [turn.user for turn in session.turns] == [GREEDY_PROMPT, "and then?"]
    assert first.stdout == session.turns[0].answer + "\n" and second.stdout == session.turns[1].answer + "\n"
    # The second answer is what the engine gives with the first exchange in the prompt.
    tiny_engine.reset()
    history = [HistoryTurn(GREEDY_PROMPT, session.turns[0].answer_ids)]
    plan = fit_prompt(tiny_engine.encoder, None, history, "and then?", context_limit=2048, max_new_tokens=6)
    assert tiny_engine.stream(plan, SamplingSettings(max_new_tokens=6, temperature=0)).finish().text == session.turns[1].answer


def test_ask_continue_without_sessions_is_one_line() -> None:
    from bluelm_cli.config.paths import user_paths

    result = invoke(["ask", "--model", "/nonexistent", "-c", "hi"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: there are no saved sessions in {user_paths().sessions_dir} yet; there is none to continue: drop -c to"
        " ask without one, or --session NAME to start one\n"
    )


def test_ask_file_goes_before_the_question(tiny: Path, tiny_engine: ChatEngine, tmp_path: Path) -> None:
    from bluelm_cli.chat.attachments import fenced

    notes = tmp_path / "notes.txt"
    notes.write_text("alpha beta\n", encoding="utf-8")
    question = fenced(str(notes), "alpha beta") + "\n\n" + GREEDY_PROMPT
    expected, _, _ = greedy_answer(tiny_engine, question, 6)
    result = ask(tiny, "-t", "0", "-n", "6", "-f", str(notes), GREEDY_PROMPT)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    tokens = len(tiny_engine.encoder.encode_plain(fenced(str(notes), "alpha beta")))
    assert f"Attached {notes} ({tokens} tokens)" in stderr_lines(result)


def test_ask_refuses_a_binary_file_before_loading_the_model(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01\x02")
    result = invoke(["ask", "--model", "/nonexistent", "-f", str(blob), "what is it?"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {blob} is a binary file (3 bytes); only text files can go into a message\n"


def test_the_same_message_leaves_the_same_journal_records_through_ask_and_chat(tiny: Path) -> None:
    """One owner of the turn: `ask --session` and `chat --session` journal a message identically, apart from
    the times and the session's own name."""
    from bluelm_cli.chat.journal import journal_path
    from bluelm_cli.config.paths import user_paths

    flags = ["--model", str(tiny), "--temperature", "0", "--max-new-tokens", "8"]
    assert invoke(["ask", *flags, "--session", "via-ask", "hello there"]).exit_code == 0
    assert invoke(["chat", *flags, "--session", "via-chat"], input="hello there\n").exit_code == 0

    def records(name: str) -> list[dict]:
        lines = journal_path(user_paths().sessions_dir, name).read_text("utf-8").splitlines()
        timeless = [{k: v for k, v in json.loads(line).items() if k not in ("at", "created_at", "name")} for line in lines]
        return [record for record in timeless if record["type"] != "resume"]

    via_ask, via_chat = records("via-ask"), records("via-chat")
    assert [r["type"] for r in via_ask] == ["start", "message", "turn"]
    assert via_ask == via_chat
