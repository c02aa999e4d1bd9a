"""`--api` against a real server: `transformers serve` on a free loopback port, serving a tiny checkpoint
exported by `bluelm export`. Greedy answers through the server equal the local engine's for the same
conversation, over several turns, with /retry and /undo.

Needs transformers' `serving` extra (fastapi, uvicorn, openai), which the test extra installs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.export.hf import export_hf
from bluelm_cli.local.loading import load_model
from bluelm_cli.config.paths import user_paths
from bluelm_cli.core.prompt import HistoryTurn, fit_continuation, fit_prompt
from bluelm_cli.session import Session
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

pytest.importorskip("fastapi", reason="transformers serve needs the 'serving' extra (pip install -e '.[test,serving]')")
pytestmark = pytest.mark.slow

NEW_TOKENS = 12
READY_DEADLINE_S = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    source = build_checkpoint(root / "bluelm", TinySpec(seed=5))
    export_hf(source, root / "llama", dtype="float32")
    return source, root / "llama"


@pytest.fixture(scope="module")
def served(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve` on the export; yields the API URL once /health answers (deadline, no fixed sleep)."""
    _, export = checkpoints
    port = _free_port()
    home = tmp_path_factory.mktemp("serve-home")
    log = (home / "serve.log").open("wb")
    env = {**__import__("os").environ, "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(export),
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{(home / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve was not ready in {READY_DEADLINE_S:.0f} s")
            # Polling an HTTP port: there is no event to wait on; the pause only spaces the probes.
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def local_engine(checkpoints: tuple[Path, Path]) -> ChatEngine:
    source, _ = checkpoints
    return ChatEngine(load_model(str(source), device="cpu", dtype="float32"))


def _local_answer(engine: ChatEngine, turns: list[tuple[str, str]], message: str) -> str:
    """The local engine's greedy answer after `turns` (as text: what the server is sent)."""
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
    history = [HistoryTurn(user, [], answer) for user, answer in turns]
    plan = fit_prompt(engine.encoder, None, history, message, context_limit=engine.context_limit, max_new_tokens=NEW_TOKENS)
    return engine.stream(plan, settings).finish().text


def test_greedy_answers_through_the_server_equal_the_local_engine(served: str, checkpoints, local_engine: ChatEngine) -> None:
    _, export = checkpoints
    script = "hello there\nhello again\n/retry\n/undo\ntell me a story\ngo on\n"
    result = CliRunner().invoke(app, [
        "chat", "--api", served, "--model", str(export), "--session", "served",
        "-t", "0", "--repetition-penalty", "1.0", "-n", str(NEW_TOKENS),
    ], input=script)
    assert result.exit_code == 0, result.stderr
    assert "tokens counted by the local tokenizer" in result.stderr

    session = Session.resume(user_paths().sessions_dir, "served")
    turns = [(turn.user, turn.answer) for turn in session.turns]
    assert [user for user, _ in turns] == ["hello there", "tell me a story", "go on"]
    expected: list[tuple[str, str]] = []
    for user, _ in turns:
        expected.append((user, _local_answer(local_engine, expected, user)))
    assert turns == expected
    assert all(answer for _, answer in turns)

    # What was shown: the kept answers, and the undone message answered twice the same (greedy /retry).
    lines = result.stdout.splitlines()
    assert lines[0] == turns[0][1] and lines[1] == lines[2] and lines[3] == "Removed the last exchange (“hello again”)"
    assert lines[4:] == [turns[1][1], turns[2][1]]


def test_continue_through_the_server_goes_on_with_the_answer(served: str, checkpoints, local_engine: ChatEngine) -> None:
    """`/continue` against the real `transformers serve` (which refused vLLM's continue_final_message with a
    422): the cut answer is extended with what the local engine generates after the same prompt text."""
    _, export = checkpoints
    result = CliRunner().invoke(app, [
        "chat", "--api", served, "--model", str(export), "--session", "continued",
        "-t", "0", "--repetition-penalty", "1.0", "-n", str(NEW_TOKENS),
    ], input="hello there\n/continue\n")
    assert result.exit_code == 0, result.stderr
    assert "Error" not in result.stderr
    first = _local_answer(local_engine, [], "hello there")
    turn = Session.resume(user_paths().sessions_dir, "continued").turns[-1]
    assert turn.answer.startswith(first) and len(turn.answer) > len(first)

    # What the local engine adds after the same text (the answer re-encoded from its text, as a server sees it).
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
    plan = fit_continuation(local_engine.encoder, None, [], HistoryTurn("hello there", [], first),
                            context_limit=local_engine.context_limit, max_new_tokens=NEW_TOKENS)
    expected = first + local_engine.stream(plan, settings).finish().text
    # The tiny model ends on byte pieces of an unfinished UTF-8 character: the local engine shows them as
    # U+FFFD, the server's stream drops them; every character before them is the same.
    assert turn.answer.rstrip("\ufffd") == expected.rstrip("\ufffd")
