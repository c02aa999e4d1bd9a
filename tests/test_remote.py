"""`--api`: chatting with a served model, against a fake OpenAI-compatible server of the tests' own.

Every failure a server can show is one exact `Error:` line and an exit status; an answer cut by the
server keeps its partial text, marked and journaled; Ctrl-C closes the HTTP stream.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Handler, answer_events, chunk
from rich.console import Console
from typer.testing import CliRunner

from bluelm_cli.chat.service import Chat
from bluelm_cli.cli.app import app
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.config.paths import user_paths
from bluelm_cli.core.prompt import HistoryTurn, PromptPlan
from bluelm_cli.remote import RemoteError, connect
from bluelm_cli.remote.encoders import ByteEstimateEncoder, ServerEncoder
from bluelm_cli.ui.repl import run_chat
from bluelm_cli.session import Session
from bluelm_cli.core.settings import SamplingSettings

runner = CliRunner()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


def invoke(args: list[str], input: str | None = None):  # noqa: ANN201
    result = runner.invoke(app, args, input=input)
    assert "Traceback" not in result.stderr
    return result


def ask(server: FakeOpenAI, *args: str):  # noqa: ANN201
    return invoke(["ask", "--api", server.url, "-t", "0", *args, "hi"])


def errors_of(result) -> list[str]:  # noqa: ANN001
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------ answers
def test_ask_streams_the_answer_and_reports_the_servers_figures(server: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 4}}
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(answer_events(server.answer, usage=usage))
    result = ask(server, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert (payload["answer"], payload["finish_reason"], payload["prompt_tokens"], payload["new_tokens"]) == (
        "Hello, world!", "stop", 11, 3)
    assert payload["ttft_s"] > 0


@pytest.mark.parametrize("done", [True, False], ids=["with-DONE", "without-DONE"])
def test_streams_end_with_or_without_done(server: FakeOpenAI, done: bool) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(answer_events(server.answer, done=done))
    result = ask(server)
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", [])


def test_length_finish_is_reported(server: FakeOpenAI) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(answer_events(["Hel"], finish="length"))
    payload = json.loads(ask(server, "--json").stdout)
    assert (payload["answer"], payload["finish_reason"]) == ("Hel", "length")


def test_the_model_beginning_the_next_user_turn_ends_the_answer_there(server: FakeOpenAI) -> None:
    # The tag split over two chunks; the local engine stops at the [|Human|]: token, so the client does too.
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(
        answer_events(["Sure. [|Hu", "man|]: and more"], finish="length"))
    payload = json.loads(ask(server, "--json").stdout)
    assert (payload["answer"], payload["finish_reason"]) == ("Sure. ", "stop")


def test_sampling_settings_and_the_conversation_become_request_fields(server: FakeOpenAI) -> None:
    backend = connect(server.url, api_key="sk-test", model="blue")
    settings = SamplingSettings(max_new_tokens=7, temperature=0.5, top_p=0.8, top_k=20, repetition_penalty=1.2, seed=3)
    plan = PromptPlan([1, 2, 3], system="Be brief.", history=(HistoryTurn("q1", [], "a1"),), message="q2")
    assert backend.stream(plan, settings).finish().text == "Hello, world!"
    body = server.chat_bodies()[-1]
    assert body == {
        "model": "blue",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
        "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 7, "temperature": 0.5,
        "top_p": 0.8, "stop": ["[|Human|]:"], "seed": 3, "top_k": 20, "repetition_penalty": 1.2, "repeat_penalty": 1.2,
    }
    headers = server.requests[-1][3]
    assert headers["Authorization"] == "Bearer sk-test"


def test_a_server_refusing_the_extra_fields_is_asked_again_without_them(server: FakeOpenAI) -> None:
    def strict(handler: Handler, body: dict) -> None:
        extra = {"top_k", "repetition_penalty", "repeat_penalty"} & set(body)
        if extra:  # as transformers serve answers
            handler.send_json(422, {"detail": f"Unexpected fields in the request: {sorted(extra)}"})
        else:
            handler.send_events(answer_events(server.answer, done=False))

    server.routes[("POST", "/v1/chat/completions")] = strict
    backend = connect(server.url, api_key=None, model=None)
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.3)
    plan = PromptPlan([1], message="hi")
    assert backend.stream(plan, settings).finish().text == "Hello, world!"
    assert backend.stream(plan, settings).finish().text == "Hello, world!"
    sent = [set(body) & {"repetition_penalty", "repeat_penalty"} for body in server.chat_bodies()]
    assert sent == [{"repetition_penalty", "repeat_penalty"}, set(), set()]  # refused once, then not sent again
    # ... but as transformers serve's generation_config, so the penalty the user set still applies there.
    assert [json.loads(body["generation_config"]) for body in server.chat_bodies()[1:]] == [{"repetition_penalty": 1.3}] * 2


# ------------------------------------------------------------------------- context and token counts
def test_context_length_and_counting_come_from_the_server(server: FakeOpenAI) -> None:
    backend = connect(server.url, api_key=None, model=None)
    assert (backend.context_limit, backend.model.context_source) == (4096, "/v1/models max_model_len")
    assert isinstance(backend.encoder, ByteEstimateEncoder)  # no /tokenize here

    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_json(200, {"data": [{"id": "blue"}]})
    server.routes[("GET", "/props")] = lambda h, _: h.send_json(200, {"default_generation_settings": {"n_ctx": 8192}})
    server.routes[("POST", "/tokenize")] = lambda h, body: h.send_json(200, {"tokens": list(range(len(body["content"].split())))})
    backend = connect(server.url, api_key=None, model=None)
    assert (backend.context_limit, backend.model.context_source) == (8192, "/props n_ctx")
    assert isinstance(backend.encoder, ServerEncoder)
    assert backend.encoder.encode_plain("three words here") == [0, 1, 2]


def test_a_server_that_does_not_say_gets_the_default_context(server: FakeOpenAI) -> None:
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_json(200, {"data": [{"id": "blue"}]})
    backend = connect(server.url, api_key=None, model=None)
    assert (backend.context_limit, backend.model.context_source) == (2048, "assumed: the server does not say")


def test_the_byte_estimate_never_counts_fewer_than_sentencepiece(tmp_path: Path) -> None:
    from bluelm_cli.testing.tiny_checkpoint import train_tokenizer
    import sentencepiece

    train_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    estimate = ByteEstimateEncoder()
    for text in ["hello world", "你好，世界", "[|Human|]:hi[|AI|]:", "  spaces  ", "émoji 🙂 mix 混合 text", ""]:
        assert len(estimate.encode_plain(text)) >= len(sp.encode(text)), text
        assert estimate.decode(estimate.encode_plain(text)) == text


# ---------------------------------------------------------------------------------------- failures
def test_server_down(server: FakeOpenAI) -> None:
    port = free_port()
    result = invoke(["ask", "--api", f"http://127.0.0.1:{port}/v1", "hi"])
    assert (result.exit_code, errors_of(result)) == (1, [
        f"Error: cannot reach the server at http://127.0.0.1:{port}/v1: connection refused; is it running? (check --api)"])


def test_wrong_url(server: FakeOpenAI) -> None:
    result = invoke(["ask", "--api", f"http://127.0.0.1:{server.port}/api", "hi"])
    assert (result.exit_code, errors_of(result)) == (1, [
        f"Error: http://127.0.0.1:{server.port}/api is not an OpenAI-compatible API (GET /api/models: HTTP 404: Not Found); "
        "check --api (e.g. http://localhost:8000/v1)"])


def test_not_a_url_is_a_usage_error() -> None:
    result = invoke(["ask", "--api", "localhost:8000", "hi"])
    assert (result.exit_code, errors_of(result)) == (2, [
        "Error: api must be an http:// or https:// URL such as http://localhost:8000/v1, or 'none', got 'localhost:8000'"])


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_unauthorized(server: FakeOpenAI, key: str | None) -> None:
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_json(401, {"error": {"message": "Invalid API key", "type": "auth"}})
    result = invoke(["ask", "--api", server.url, *(["--api-key", key] if key else []), "hi"])
    fix = "check --api-key (or BLUELM_API_KEY / OPENAI_API_KEY)" if key else "pass --api-key or set BLUELM_API_KEY"
    assert (result.exit_code, errors_of(result)) == (1, [
        f"Error: the server at {server.url} refused the request (HTTP 401: Invalid API key); {fix}"])
    assert "sk-wrong" not in result.stdout + result.stderr


def test_unknown_model(server: FakeOpenAI) -> None:
    result = invoke(["ask", "--api", server.url, "--model", "nope", "hi"])
    assert (result.exit_code, errors_of(result)) == (1, [
        f"Error: the server at {server.url} does not serve 'nope' (it serves: blue); choose one with --model"])


@pytest.mark.parametrize(("status", "body", "said"), [
    (500, {"error": {"message": "CUDA out of memory", "code": 500}}, "CUDA out of memory"),
    (400, {"object": "error", "message": "This model's maximum context length is 4096 tokens", "code": 400},
     "This model's maximum context length is 4096 tokens"),
    (503, {"detail": "model is loading"}, "model is loading"),
])
def test_http_errors_with_a_json_body(server: FakeOpenAI, status: int, body: dict, said: str) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_json(status, body)
    result = ask(server)
    assert (result.exit_code, result.stdout, errors_of(result)) == (1, "", [
        f"Error: the server at {server.url} answered POST /v1/chat/completions with HTTP {status}: {said}"])


@pytest.mark.parametrize(("events", "said"), [
    (["data: {oops\n\n"], "the server sent a malformed event stream (not JSON: '{oops')"),
    (["<html>hi</html>\n\n"], "the server sent a malformed event stream (a line '<html>hi</html>')"),
])
def test_malformed_sse_before_any_text(server: FakeOpenAI, events: list[str], said: str) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(events)
    result = ask(server)
    assert (result.exit_code, result.stdout, errors_of(result)) == (1, "", [
        f"Error: {said}; check that --api points at an OpenAI-compatible server"])


def _dies_mid_answer(handler: Handler, _: object) -> None:
    handler.start_events()
    handler.send_chunk(chunk("Partial"))
    handler.send_chunk(chunk(" answer"))
    handler.wfile.write(b"40\r\nda")  # a chunk cut short, then the connection drops: the process died
    handler.wfile.flush()
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


MID_ANSWER = [
    (_dies_mid_answer, "the server closed the connection mid-answer (IncompleteRead); the answer so far is kept, /retry asks again"),
    (lambda h, _: h.send_events([chunk("Partial"), chunk(" answer"), 'data: {"error": "CB worker died"}\n\n']),
     "the server reported an error mid-answer: CB worker died"),
    (lambda h, _: h.send_events([chunk("Partial"), chunk(" answer"), "data: {oops\n\n"]),
     "the server sent a malformed event stream (not JSON: '{oops'); check that --api points at an OpenAI-compatible server"),
    (lambda h, _: h.send_events([chunk("Partial"), chunk(" answer")]),
     "the server ended the answer without saying why (the stream stopped before its end); the answer so far is kept, /retry asks again"),
]


@pytest.mark.parametrize(("route", "said"), MID_ANSWER, ids=["dies", "error-event", "malformed", "no-finish"])
def test_ask_keeps_the_partial_answer_when_the_server_fails_mid_answer(server: FakeOpenAI, route, said: str) -> None:  # noqa: ANN001
    server.routes[("POST", "/v1/chat/completions")] = route
    result = ask(server)
    assert (result.exit_code, result.stdout, errors_of(result)) == (1, "Partial answer\n", [f"Error: {said}"])


def test_chat_journals_the_partial_answer_and_resume_replays_it(server: FakeOpenAI) -> None:
    server.routes[("POST", "/v1/chat/completions")] = _dies_mid_answer
    result = invoke(["chat", "--api", server.url, "--session", "cut"], input="first\n")
    assert result.exit_code == 1  # script mode: a line failed
    assert result.stdout == "Partial answer\n"
    assert result.stderr.splitlines()[-2:] == [
        f"Error: {MID_ANSWER[0][1]}", "[cut off by an error; /retry asks again]"]
    session = Session.resume(user_paths().sessions_dir, "cut")
    turn = session.turns[-1]
    assert (turn.user, turn.answer, turn.finish_reason, turn.answer_ids) == ("first", "Partial answer", FinishReason.ERROR, [])

    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(answer_events(["Fine."]))
    result = invoke(["chat", "--api", server.url, "--resume", "cut"], input="/retry\n")
    assert (result.exit_code, result.stdout) == (0, "Fine.\n")
    history = server.chat_bodies()[-1]["messages"]
    assert history == [{"role": "user", "content": "first"}]  # /retry asks the cut turn's message again
    assert Session.resume(user_paths().sessions_dir, "cut").turns[-1].answer == "Fine."


def test_stop_closes_the_stream_and_keeps_the_partial_answer(server: FakeOpenAI) -> None:
    closed = threading.Event()

    def endless(handler: Handler, _: object) -> None:
        handler.start_events()
        handler.send_chunk(chunk("Partial"))
        try:
            for _ in range(10_000):
                closed.wait(0.01)
                handler.send_chunk(chunk(" more"))
        except OSError:
            closed.set()  # the client closed the stream

    server.routes[("POST", "/v1/chat/completions")] = endless
    backend = connect(server.url, api_key=None, model=None)
    stream = backend.stream(PromptPlan([1], message="hi"), SamplingSettings(temperature=0))
    assert next(stream) == "Partial"
    stream.stop()
    result = stream.finish()
    assert (result.finish_reason, result.text.startswith("Partial")) == (FinishReason.INTERRUPTED, True)
    assert closed.wait(10)


def test_chat_through_the_service_retry_undo_set_and_stats(server: FakeOpenAI, tmp_path: Path) -> None:
    replies = iter([["One."], ["Two."], ["Two again."], ["Three."]])
    server.routes[("POST", "/v1/chat/completions")] = lambda h, _: h.send_events(
        answer_events(next(replies), usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}))
    backend = connect(server.url, api_key=None, model=None)
    session = Session.new(tmp_path, name="s", model_id="blue", system="Sys.", sampling=SamplingSettings(temperature=0))
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(Chat(backend, session), console=Console(file=out, width=200), paths=user_paths(),
                      stdin=io.StringIO("q1\nq2\n/retry\n/undo\n/set temperature 0.3\n/stats on\nq3\n"),
                      err_console=Console(file=err, width=200))
    assert status == 0, err.getvalue()
    assert out.getvalue().startswith("One.\nTwo.\nTwo again.\n")
    assert [turn.answer for turn in session.turns] == ["One.", "Three."]
    bodies = server.chat_bodies()
    assert [m["content"] for m in bodies[-1]["messages"]] == ["Sys.", "q1", "One.", "q3"]
    assert bodies[-1]["temperature"] == 0.3
    stats = [line for line in (out.getvalue() + err.getvalue()).splitlines() if "prompt tokens" in line]
    assert len(stats) == 1 and stats[0].startswith("9 prompt tokens (0 reused) · 2 new · first token ")
    assert stats[0].endswith(" · context 12/4,096")


# -------------------------------------------------------------------------------- keys and startup
def test_config_never_shows_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setenv("BLUELM_API", "http://localhost:8000/v1")
    result = invoke(["config"])
    assert "sk-secret-value" not in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.split() == ["api", '"http://localhost:8000/v1"', "env", "BLUELM_API"] for line in lines)
    assert any(line.split()[:4] == ["api_key", "(set,", "not", "shown)"] and line.endswith("env OPENAI_API_KEY") for line in lines)


def test_chat_with_api_never_imports_torch(server: FakeOpenAI) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bluelm_cli", "chat", "--api", server.url, "-t", "0"],
        input="hi\n", capture_output=True, text=True, env=dict(os.environ), timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "Hello, world!\n"), proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "bluelm_cli.remote.stream" in imported  # the report was parsed
    top_level = {name.split(".")[0] for name in imported}
    assert "torch" not in top_level and "transformers" not in top_level


def test_bench_api_measures_the_served_model(server: FakeOpenAI) -> None:
    result = invoke(["bench", "--api", server.url, "--turns", "3", "--prompt-tokens", "40", "--new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model"], len(report["turns"]), report["context_limit"]) == ("blue", 3, 4096)
    assert all(turn["new_tokens"] == 3 and turn["ttft_s"] > 0 for turn in report["turns"])  # three chunks each
    bodies = server.chat_bodies()
    assert [len(body["messages"]) for body in bodies] == [1, 3, 5]
    assert all(body["temperature"] == 0.0 and body["max_tokens"] == 4 for body in bodies)


def test_a_remote_error_is_a_blueLM_error() -> None:
    assert issubclass(RemoteError, Exception) and RemoteError("x").exit_status == 1
