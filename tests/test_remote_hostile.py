"""`--api` against hostile or odd servers (the fake of tests/fake_openai.py, on 127.0.0.1): nothing hangs,
nothing unbounded, no secret shown, and what curl / openai-python accept is accepted.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator

import pytest
from fake_openai import FakeOpenAI, Handler, answer_events, chunk
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.config.paths import user_paths
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.remote import RemoteError, connect
from bluelm_cli.remote import http as remote_http
from bluelm_cli.remote import stream as remote_stream

runner = CliRunner()
SECRET = "sk-very-secret-0123456789"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture
def other() -> Iterator[FakeOpenAI]:
    """A second server: another origin (another port) for redirects, or a forward proxy."""
    fake = FakeOpenAI()
    yield fake
    fake.close()


def invoke(args: list[str], input: str | None = None):  # noqa: ANN201
    result = runner.invoke(app, args, input=input)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def errors_of(result) -> list[str]:  # noqa: ANN001
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def plan() -> PromptPlan:
    return PromptPlan([1], message="hi")


def set_chat(server: FakeOpenAI, route) -> None:  # noqa: ANN001
    server.routes[("POST", "/v1/chat/completions")] = route


def _until_closed(handler: Handler, write, closed: threading.Event | None = None) -> None:  # noqa: ANN001
    """Call write() until the client closes the connection (bounded, so a broken client fails the test)."""
    try:
        for _ in range(20_000):
            write()
    except OSError:
        if closed is not None:
            closed.set()


# ------------------------------------------------------------------------------------ nothing hangs
@pytest.mark.slow
def test_a_server_trickling_the_model_list_meets_the_total_deadline(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_http, "JSON_DEADLINE_S", 1.0)
    gone = threading.Event()

    def trickle(handler: Handler, _: object) -> None:
        handler.send_raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        pause = threading.Event()

        def one_byte() -> None:
            pause.wait(0.02)  # each byte well within the read timeout
            handler.send_raw(b" ")
        _until_closed(handler, one_byte, gone)

    server.routes[("GET", "/v1/models")] = trickle
    with pytest.raises(RemoteError, match=r"did not finish answering GET /v1/models within 1 s"):
        connect(server.url, api_key=None, model=None)
    assert gone.wait(10)


@pytest.mark.slow
def test_a_server_trickling_its_headers_meets_the_total_deadline(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_http, "JSON_DEADLINE_S", 1.0)

    def trickle(handler: Handler, _: object) -> None:
        handler.send_raw(b"HTTP/1.1 200 OK\r\n")
        pause = threading.Event()

        def one_header() -> None:
            pause.wait(0.02)
            handler.send_raw(b"X-Slow: 1\r\n")
        _until_closed(handler, one_header)

    server.routes[("GET", "/v1/models")] = trickle
    with pytest.raises(RemoteError, match="within 1 s"):
        connect(server.url, api_key=None, model=None)


def test_a_server_ignoring_max_tokens_is_stopped_at_our_limit(server: FakeOpenAI) -> None:
    closed = threading.Event()

    def endless(handler: Handler, _: object) -> None:
        handler.start_events()
        _until_closed(handler, lambda: handler.send_chunk(chunk("word ")), closed)

    set_chat(server, endless)
    backend = connect(server.url, api_key=None, model=None)
    result = backend.stream(plan(), SamplingSettings(temperature=0, max_new_tokens=5)).finish()
    assert (result.finish_reason, result.text) == (FinishReason.LENGTH, "word " * 5)
    assert closed.wait(10)


def test_one_endless_chunk_is_stopped_at_our_limit_too(server: FakeOpenAI) -> None:
    def endless(handler: Handler, _: object) -> None:
        handler.start_events()
        _until_closed(handler, lambda: handler.send_chunk(chunk("x" * 4000)))

    set_chat(server, endless)
    backend = connect(server.url, api_key=None, model=None)
    result = backend.stream(plan(), SamplingSettings(temperature=0, max_new_tokens=2)).finish()
    assert result.finish_reason is FinishReason.LENGTH
    assert len(result.text) <= 2 * remote_stream.MAX_CHARS_PER_TOKEN


def test_the_turn_ends_at_finish_reason_despite_keep_alives(server: FakeOpenAI) -> None:
    closed = threading.Event()

    def keeps_alive(handler: Handler, _: object) -> None:
        handler.start_events()
        for event in answer_events(["Done."], done=False):
            handler.send_chunk(event)
        pause = threading.Event()

        def ping() -> None:
            pause.wait(0.01)
            handler.send_chunk(": keep-alive\n\n")
        _until_closed(handler, ping, closed)

    set_chat(server, keeps_alive)
    result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Done.\n", [])
    assert closed.wait(10)  # the client closed the stream: it did not wait for the server to stop pinging


def test_a_huge_single_line_event_is_capped_with_a_clear_error(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_stream, "MAX_EVENT_BYTES", 64 * 1024)

    def huge(handler: Handler, _: object) -> None:
        handler.start_events()
        handler.send_chunk(chunk("Partial"))
        handler.send_chunk('data: {"choices": [{"delta": {"content": "')
        _until_closed(handler, lambda: handler.send_chunk("a" * 8192))

    set_chat(server, huge)
    result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (1, "Partial\n", [
        "Error: the server sent an event longer than 64 KiB (the answer so far is kept); "
        "check that --api points at an OpenAI-compatible server"])


def test_a_huge_json_body_is_capped_with_a_clear_error(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_http, "MAX_JSON_BYTES", 64 * 1024)

    def huge(handler: Handler, _: object) -> None:
        handler.send_raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        _until_closed(handler, lambda: handler.send_raw(b"[" * 8192))

    server.routes[("GET", "/v1/models")] = huge
    with pytest.raises(RemoteError, match=r"answered GET /v1/models with more than 64 KiB"):
        connect(server.url, api_key=None, model=None)


# ----------------------------------------------------------------------- like curl and openai-python
@pytest.mark.parametrize(("finish", "note"), [
    ("content_filter", "[stopped by the server's content filter]"),
    ("tool_calls", "[the model asked to call a tool, which bluelm does not run]"),
])
def test_content_filter_and_tool_calls_are_told_to_the_user(server: FakeOpenAI, finish: str, note: str) -> None:
    set_chat(server, lambda h, _: h.send_events(answer_events(["Part"], finish=finish)))
    payload = json.loads(invoke(["ask", "--api", server.url, "-t", "0", "--json", "hi"]).stdout)
    assert (payload["answer"], payload["finish_reason"]) == ("Part", finish)
    result = invoke(["chat", "--api", server.url, "-t", "0"], input="hi\n")
    assert result.stdout == "Part\n" and note in result.stderr


FILTERED = (
    "Error: the server's content filter stopped the answer; what it let through is on stdout. Rephrase the"
    " question, or ask the server's operator about the filter\n"
)


def test_ask_reports_a_filtered_answer_on_stderr_and_exits_3(server: FakeOpenAI) -> None:
    set_chat(server, lambda h, _: h.send_events(answer_events(["Part of it"], finish="content_filter")))
    result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, "Part of it\n", FILTERED)
    result = invoke(["ask", "--api", server.url, "-t", "0", "--json", "hi"])
    assert (result.exit_code, json.loads(result.stdout)["finish_reason"], result.stderr) == (3, "content_filter", FILTERED)


def test_ask_exits_0_after_a_tool_call_or_a_stop(server: FakeOpenAI) -> None:
    for finish in ("stop", "tool_calls"):
        set_chat(server, lambda h, _, finish=finish: h.send_events(answer_events(["Done"], finish=finish)))
        result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
        assert (result.exit_code, result.stdout, result.stderr) == (0, "Done\n", "")


def test_content_as_a_list_of_parts_is_concatenated(server: FakeOpenAI) -> None:
    def parts(handler: Handler, _: object) -> None:
        payload = {"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "Hel"}, {"type": "image_url"},
                                                                 {"type": "text", "text": "lo"}]}, "finish_reason": None}]}
        handler.send_events([f"data: {json.dumps(payload)}\n\n", chunk(None, "stop")])

    set_chat(server, parts)
    backend = connect(server.url, api_key=None, model=None)
    assert backend.stream(plan(), SamplingSettings(temperature=0)).finish().text == "Hello"

    whole = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": [
        {"type": "text", "text": "Whole"}, {"type": "text", "text": " answer"}]}}]}
    set_chat(server, lambda h, _: h.send_json(200, whole))
    assert backend.stream(plan(), SamplingSettings(temperature=0)).finish().text == "Whole answer"


@pytest.mark.parametrize("shape", ["cr-only", "bom", "bom-crlf"])
def test_sse_with_cr_only_lines_or_a_bom_is_accepted(server: FakeOpenAI, shape: str) -> None:
    events = "".join(answer_events(["Hello", ", world", "!"]))
    if shape == "cr-only":
        events = events.replace("\n", "\r")
    elif shape == "bom":
        events = "\ufeff" + events
    else:
        events = "\ufeff" + events.replace("\n", "\r\n")
    set_chat(server, lambda h, _: h.send_events([events[i:i + 7] for i in range(0, len(events), 7)]))  # lines split anywhere
    result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", [])


def test_a_103_early_hints_response_is_skipped(server: FakeOpenAI) -> None:
    models = json.dumps({"data": [{"id": "blue", "max_model_len": 4096}]}).encode()
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_raw(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(models)).encode() + b"\r\n\r\n" + models)

    def hinted_events(handler: Handler, _: object) -> None:
        handler.send_raw(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        handler.send_events(answer_events(["Hi"]))

    set_chat(server, hinted_events)
    result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hi\n", [])


def test_same_origin_307_and_308_are_followed_with_the_key(server: FakeOpenAI) -> None:
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_redirect(308, "/new/v1/models")
    server.routes[("GET", "/new/v1/models")] = lambda h, _: h.send_json(200, {"data": [{"id": "blue"}]})
    set_chat(server, lambda h, _: h.send_redirect(307, f"http://127.0.0.1:{server.port}/new/v1/chat/completions"))
    server.routes[("POST", "/new/v1/chat/completions")] = lambda h, _: h.send_events(answer_events(["Moved"]))
    backend = connect(server.url, api_key=SECRET, model=None)
    assert backend.stream(plan(), SamplingSettings(temperature=0)).finish().text == "Moved"
    moved = [(method, body, headers) for method, path, body, headers in server.requests if path.startswith("/new/")]
    assert [method for method, _, _ in moved] == ["GET", "POST"]
    assert moved[1][1]["messages"] == [{"role": "user", "content": "hi"}]  # 307: the same method and body
    assert all(headers.get("Authorization") == f"Bearer {SECRET}" for _, _, headers in moved)


def test_a_redirect_to_another_host_never_gets_the_credentials(server: FakeOpenAI, other: FakeOpenAI) -> None:
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_redirect(308, f"http://localhost:{other.port}/v1/models")
    set_chat(server, lambda h, _: h.send_redirect(307, f"http://localhost:{other.port}/v1/chat/completions"))
    url = f"http://alice:pa55word@127.0.0.1:{server.port}/v1"
    for key in (SECRET, None):
        backend = connect(url, api_key=key, model=None)
        assert backend.stream(plan(), SamplingSettings(temperature=0)).finish().text == "Hello, world!"
    assert [path for _, path, _, _ in other.requests] == ["/v1/models", "/v1/chat/completions"] * 2
    assert all("Authorization" not in headers for _, _, _, headers in other.requests)
    assert all("Authorization" in headers for _, _, _, headers in server.requests)


def test_an_upper_case_scheme_is_accepted(server: FakeOpenAI) -> None:
    result = invoke(["ask", "--api", server.url.replace("http://", "HTTP://"), "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", [])


def test_http_proxy_and_no_proxy_are_honoured(other: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{other.port}")
    result = invoke(["ask", "--api", "http://served.invalid:8000/v1", "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", [])
    proxied = list(other.proxied)  # the model list, the probes (/props, /tokenize…), the answer
    assert (proxied[0], proxied[-1]) == ("http://served.invalid:8000/v1/models", "http://served.invalid:8000/v1/chat/completions")
    assert all(url.startswith("http://served.invalid:8000/") for url in proxied)

    for no_proxy in ("served.invalid", ".invalid", "*"):
        monkeypatch.setenv("NO_PROXY", no_proxy)
        result = invoke(["ask", "--api", "http://served.invalid:8000/v1", "-t", "0", "hi"])
        assert errors_of(result) == [
            "Error: cannot reach the server at http://served.invalid:8000/v1: unknown host 'served.invalid'; check --api"]
    assert other.proxied == proxied


def test_every_sampling_value_is_sent_explicitly(server: FakeOpenAI) -> None:
    backend = connect(server.url, api_key=None, model=None)
    backend.stream(plan(), SamplingSettings(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.0)).finish()
    body = server.chat_bodies()[-1]
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"], body["repeat_penalty"]) == (
        0.7, 0.9, 40, 1.0, 1.0)


# -------------------------------------------------------------------------------------- no secret shown
@pytest.mark.parametrize("key", ["sk-abc\r\nX-Injected: 1", "sk-abc\ndef", "sk-abc\rdef"])
def test_a_key_with_a_line_break_is_refused_without_printing_it(server: FakeOpenAI, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for args, env in ((["--api-key", key], None), ([], key)):
        if env is not None:
            monkeypatch.setenv("BLUELM_API_KEY", env)
        result = invoke(["ask", "--api", server.url, *args, "hi"])
        assert result.exit_code == 2
        assert errors_of(result)[0].startswith("Error: the API key from ")
        assert "contains a line break or a control character" in errors_of(result)[0]
        assert "sk-abc" not in result.stdout + result.stderr
    assert server.requests == []


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://alice:pa55word@127.0.0.1:{server.port}/v1"
    result = invoke(["chat", "--api", url, "-t", "0", "--session", "creds"], input="hi\n/show parameters\n")
    assert result.exit_code == 0, result.stderr
    expected = "Basic " + base64.b64encode(b"alice:pa55word").decode()
    assert {headers.get("Authorization") for _, _, _, headers in server.requests} == {expected}
    journal = next(user_paths().sessions_dir.glob("creds*")).read_text()
    shown = result.stdout + result.stderr + journal
    assert "pa55word" not in shown and "Hello, world!" in shown
    assert f"http://alice:***@127.0.0.1:{server.port}/v1" in shown  # /show parameters

    monkeypatch.setenv("BLUELM_API", url)
    config = invoke(["config"])
    assert "pa55word" not in config.stdout and f"alice:***@127.0.0.1:{server.port}" in config.stdout

    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_json(500, {"error": "boom"})
    failed = invoke(["ask", "--api", url, "hi"])
    assert failed.exit_code == 1 and "pa55word" not in failed.stdout + failed.stderr


def test_a_server_echoing_the_key_is_redacted_everywhere(server: FakeOpenAI) -> None:
    def echo(handler: Handler, _: object) -> None:
        handler.send_json(500, {"error": {"message": f"bad header Authorization: {handler.headers['Authorization']}"}})

    set_chat(server, echo)
    result = invoke(["chat", "--api", server.url, "--api-key", SECRET, "--session", "echo"], input="hi\n")
    assert result.exit_code == 1
    journal = next(user_paths().sessions_dir.glob("echo*")).read_text()
    assert SECRET not in result.stdout + result.stderr + journal
    assert "Error: the server at " in result.stderr and "Authorization: Bearer ***" in result.stderr

    # An answer echoing it, split across chunks, is redacted on screen and in the journal.
    set_chat(server, lambda h, _: h.send_events(answer_events(["your key is ", SECRET[:6], SECRET[6:], " ok"])))
    result = invoke(["chat", "--api", server.url, "--api-key", SECRET, "--session", "echo2"], input="hi\n")
    journal = next(user_paths().sessions_dir.glob("echo2*")).read_text()
    assert result.stdout == "your key is *** ok\n"
    assert SECRET not in result.stderr + journal


def test_api_key_on_the_command_line_warns_once_and_a_key_file_is_the_safe_way(server: FakeOpenAI, tmp_path) -> None:  # noqa: ANN001
    result = invoke(["ask", "--api", server.url, "--api-key", SECRET, "hi"])
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "--api-key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("Warning: ") and "--api-key-file" in warnings[0]

    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o600)
    result = invoke(["ask", "--api", server.url, "--api-key-file", str(key_file), "hi"])
    assert (result.exit_code, result.stdout, result.stderr.count("Warning")) == (0, "Hello, world!\n", 0)
    assert server.requests[-1][3]["Authorization"] == f"Bearer {SECRET}"

    missing = invoke(["ask", "--api", server.url, "--api-key-file", str(tmp_path / "nope"), "hi"])
    assert missing.exit_code == 2 and errors_of(missing)[0].startswith("Error: cannot read the API key file ")


# ----------------------------------------------------------------------------------- the model's id
def test_the_servers_model_id_is_sanitised_before_banner_and_journal(server: FakeOpenAI) -> None:
    hostile = "blue\x1b]0;pwned\x07\x1b[2J"
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_json(200, {"data": [{"id": hostile, "max_model_len": 4096}]})
    result = invoke(["chat", "--api", server.url, "-t", "0", "--session", "evil"], input="hi\n")
    assert result.exit_code == 0, result.stderr
    journal = next(user_paths().sessions_dir.glob("evil*")).read_text()
    assert "\x1b" not in result.stderr + result.stdout and "\\u001b" not in journal
    assert server.chat_bodies()[-1]["model"] == hostile  # the server is still sent its own id
    listing = invoke(["sessions"])
    assert "\x1b" not in listing.stdout


# ------------------------------------------------------------------------------------------ /continue
def test_continue_is_a_text_completion_of_the_conversation(server: FakeOpenAI) -> None:
    set_chat(server, lambda h, _: h.send_events(answer_events(["Once upon"], finish="length")))
    server.routes[("POST", "/v1/completions")] = lambda h, _: h.send_events([
        'data: {"choices": [{"index": 0, "text": " a time", "finish_reason": null}]}\n\n',
        'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}\n\n', "data: [DONE]\n\n"])
    result = invoke(["chat", "--api", server.url, "-t", "0", "--system", "Be kind.", "--session", "cont"],
                    input="tell me\n/continue\n")
    assert (result.exit_code, errors_of(result)) == (0, [])
    body = [body for _, path, body, _ in server.requests if path == "/v1/completions"][-1]
    assert body["prompt"] == "Be kind.[|Human|]:tell me[|AI|]:Once upon"
    assert "messages" not in body and body["stop"] == ["[|Human|]:"]
    from bluelm_cli.session import Session
    assert Session.resume(user_paths().sessions_dir, "cont").turns[-1].answer == "Once upon a time"


def test_continue_without_text_completions_asks_the_chat_to_continue(server: FakeOpenAI) -> None:
    replies = iter([answer_events(["Once upon"], finish="length"), answer_events([" a time"])])
    set_chat(server, lambda h, _: h.send_events(next(replies)))  # no /v1/completions here: 404
    result = invoke(["chat", "--api", server.url, "-t", "0", "--session", "cont2"], input="tell me\n/continue\n")
    assert (result.exit_code, errors_of(result)) == (0, [])
    from bluelm_cli.session import Session
    assert Session.resume(user_paths().sessions_dir, "cont2").turns[-1].answer == "Once upon a time"
    body = server.chat_bodies()[-1]
    assert body["messages"][-1] == {"role": "assistant", "content": "Once upon"}
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)


def test_keep_alives_forever_before_any_answer_meet_the_idle_limit(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_stream, "IDLE_LIMIT_S", 0.5)

    def pings(handler: Handler, _: object) -> None:
        handler.start_events()
        pause = threading.Event()

        def ping() -> None:
            pause.wait(0.01)
            handler.send_chunk(": still queued\n\n")
        _until_closed(handler, ping)

    set_chat(server, pings)
    result = invoke(["ask", "--api", server.url, "-t", "0", "hi"])
    assert (result.exit_code, result.stdout, errors_of(result)) == (1, "", [
        f"Error: the server at {server.url} sent no answer for 0.5 s (only keep-alives); check the server or try again"])


@pytest.mark.parametrize(("environment", "url", "proxy"), [
    ({"HTTP_PROXY": "proxy:3128"}, "http://served:8000/v1", "http://proxy:3128"),
    ({"HTTP_PROXY": "http://proxy:3128"}, "https://served/v1", None),  # HTTP_PROXY is for http:// only
    ({"HTTPS_PROXY": "http://tunnel:8080"}, "https://served/v1", "http://tunnel:8080"),
    ({"ALL_PROXY": "http://any:1"}, "https://served/v1", "http://any:1"),
    ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "served"}, "http://a.served:8000/v1", None),  # subdomains too
    ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "other, .served"}, "http://served:8000/v1", "http://p:1"),  # .x: subdomains only
    ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1"}, "http://127.0.0.1:8000/v1", None),
    ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "served:9000"}, "http://served:8000/v1", "http://p:1"),  # another port
    ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "http://served:8000"}, "http://served:8000/v1", None),
    ({"HTTP_PROXY": "http://p:1"}, "http://localhost:8000/v1", "http://p:1"),  # as httpx: localhost only by NO_PROXY
])
def test_proxy_rules_are_httpx_rules(environment: dict[str, str], url: str, proxy: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    found = remote_http.proxy_for(remote_http.ServerURL.parse(url).origin_key)
    assert (str(found) if found else None) == proxy


def test_a_socks_proxy_is_a_clear_error(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://user:secret-pass@127.0.0.1:1080")
    result = invoke(["ask", "--api", server.url, "hi"])
    assert result.exit_code == 2 and "secret-pass" not in result.stderr
    assert errors_of(result) == ["Error: the proxy for http:// is a socks5:// proxy ('socks5://user:***@127.0.0.1:1080'); "
                                 "bluelm uses http:// proxies: change HTTP_PROXY / HTTPS_PROXY / ALL_PROXY, or name the "
                                 "server in NO_PROXY"]


def test_refused_url_credentials_say_what_to_check(server: FakeOpenAI) -> None:
    server.routes[("GET", "/v1/models")] = lambda h, _: h.send_json(401, {"detail": "Unauthorized"})
    result = invoke(["ask", "--api", f"http://alice:pa55word@127.0.0.1:{server.port}/v1", "hi"])
    assert errors_of(result) == [f"Error: the server at {server.url} refused the request (HTTP 401: Unauthorized); "
                                 "check the user name and password in --api"]


def test_a_key_file_others_can_read_is_warned_about(server: FakeOpenAI, tmp_path) -> None:  # noqa: ANN001
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)
    key_file.chmod(0o644)
    result = invoke(["ask", "--api", server.url, "--api-key-file", str(key_file), "hi"])
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if line.startswith("Warning:")] == [
        f"Warning: other users can read the API key file {key_file}; chmod 600 {key_file}"]


@pytest.mark.slow
def test_a_trickled_error_body_meets_the_deadline(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_stream, "READ_TIMEOUT_S", 1.0)

    def trickle(handler: Handler, _: object) -> None:
        handler.send_raw(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        pause = threading.Event()

        def one_byte() -> None:
            pause.wait(0.02)
            handler.send_raw(b" ")
        _until_closed(handler, one_byte)

    set_chat(server, trickle)
    backend = connect(server.url, api_key=None, model=None)
    with pytest.raises(RemoteError, match=r"did not finish answering POST /v1/chat/completions within 1 s"):
        backend.stream(plan(), SamplingSettings(temperature=0)).finish()


def test_an_unreachable_proxy_is_named_in_the_error(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    from fake_openai import Handler as _  # noqa: F401 - the fake is imported; the proxy port is a closed one
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://user:proxy-pass@127.0.0.1:{port}")
    result = invoke(["ask", "--api", server.url, "hi"])
    assert errors_of(result) == [f"Error: cannot reach the proxy http://127.0.0.1:{port} (from HTTP_PROXY) for "
                                 f"{server.url}: connection refused; check HTTP_PROXY, or name the server in NO_PROXY"]
