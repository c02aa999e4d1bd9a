"""A hostile-user campaign against the `--api` client: every case is a misbehaving server (the tests' fake,
on 127.0.0.1) or a hostile invocation, run through the real CLI (Typer's runner, in this process, so the
time limits can be shortened). Prints one line per case and "N tried, M clean, K turns lost".

A case is clean when: it ends (no hang: each run has a wall-clock bound), no traceback, a failure is one
`Error:` line and a non-zero exit, no secret appears in stdout, stderr or the session's journal, and no
ESC or bidi control reaches stderr (stdout is no terminal here: answers are written as given, by design). A turn is lost when a chat that connected ends without the
typed message in its journal.

    PYTHONPATH=$PWD python scripts/hostile_remote.py
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai import FakeOpenAI, Handler, answer_events, chunk  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from bluelm_cli.cli.app import app  # noqa: E402
from bluelm_cli.remote import http as remote_http  # noqa: E402
from bluelm_cli.remote import stream as remote_stream  # noqa: E402

SECRET = "sk-campaign-secret-4242"
PASSWORD = "hunter2-pw"
CASE_LIMIT_S = 30.0
_UNSAFE = re.compile("[\x1b\x9b\u202a-\u202e\u2066-\u2069]")


@dataclass
class Case:
    name: str
    setup: Callable[[FakeOpenAI, FakeOpenAI], None] = lambda server, other: None
    args: Callable[[FakeOpenAI], list[str]] = lambda server: ["--api", server.url, "--api-key", SECRET]
    command: str = "chat"  # chat (with a session and "hi" typed) or ask
    env: dict[str, str] = field(default_factory=dict)
    expect_ok: bool | None = None  # None: either, as long as a failure is one Error: line
    connects: bool = True  # whether the chat gets as far as a prompt (then the typed message must be journaled)


def _until_closed(handler: Handler, write: Callable[[], None]) -> None:
    try:
        for _ in range(100_000):
            write()
    except OSError:
        pass


def _paced(handler: Handler, data: bytes, pause_s: float = 0.01) -> Callable[[], None]:
    pause = threading.Event()

    def write() -> None:
        pause.wait(pause_s)
        handler.send_raw(data)
    return write


def chat_route(route: Callable[[Handler, Any], None]) -> Callable[[FakeOpenAI, FakeOpenAI], None]:
    def setup(server: FakeOpenAI, other: FakeOpenAI) -> None:
        server.routes[("POST", "/v1/chat/completions")] = route
    return setup


def models_route(route: Callable[[Handler, Any], None]) -> Callable[[FakeOpenAI, FakeOpenAI], None]:
    def setup(server: FakeOpenAI, other: FakeOpenAI) -> None:
        server.routes[("GET", "/v1/models")] = route
    return setup


def raw_events(text: str) -> Callable[[Handler, Any], None]:
    return lambda h, _: h.send_events([text])


def endless(piece: str) -> Callable[[Handler, Any], None]:
    def route(handler: Handler, _: Any) -> None:
        handler.start_events()
        _until_closed(handler, lambda: handler.send_chunk(piece))
    return route


def after_finish_pings(handler: Handler, _: Any) -> None:
    handler.start_events()
    for event in answer_events(["Done."], done=False):
        handler.send_chunk(event)
    pause = threading.Event()
    _until_closed(handler, lambda: (pause.wait(0.01), handler.send_chunk(": ping\n\n")))


def pings_only(handler: Handler, _: Any) -> None:
    handler.start_events()
    pause = threading.Event()
    _until_closed(handler, lambda: (pause.wait(0.01), handler.send_chunk(": queued\n\n")))


def trickle_models(handler: Handler, _: Any) -> None:
    handler.send_raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    _until_closed(handler, _paced(handler, b" "))


def trickle_headers(handler: Handler, _: Any) -> None:
    handler.send_raw(b"HTTP/1.1 200 OK\r\n")
    _until_closed(handler, _paced(handler, b"X-Slow: 1\r\n"))


def trickle_chat_headers(handler: Handler, _: Any) -> None:
    handler.send_raw(b"HTTP/1.1 200 OK\r\n")
    _until_closed(handler, _paced(handler, b"X-Slow: 1\r\n"))


def huge_models(handler: Handler, _: Any) -> None:
    handler.send_raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
    _until_closed(handler, lambda: handler.send_raw(b"[" * 65536))


def huge_event(handler: Handler, _: Any) -> None:
    handler.start_events()
    handler.send_chunk(chunk("Partial"))
    handler.send_chunk('data: {"choices": [{"delta": {"content": "')
    _until_closed(handler, lambda: handler.send_chunk("a" * 65536))


def echo_auth(status: int) -> Callable[[Handler, Any], None]:
    return lambda h, _: h.send_json(status, {"error": {"message": f"bad Authorization: {h.headers.get('Authorization')}"}})


def echo_auth_html(handler: Handler, _: Any) -> None:
    data = f"<html><body>Denied for {handler.headers.get('Authorization')}</body></html>".encode()
    handler.send_response(502)
    handler.send_header("Content-Type", "text/html")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def answer_with_usage(usage: dict[str, Any]) -> Callable[[Handler, Any], None]:
    return lambda h, _: h.send_events(answer_events(["ok"], usage=usage))


def answer_with(text_pieces: list[str], finish: str = "stop") -> Callable[[Handler, Any], None]:
    return lambda h, _: h.send_events(answer_events(text_pieces, finish=finish))


def dies_mid_answer(handler: Handler, _: Any) -> None:
    handler.start_events()
    handler.send_chunk(chunk("Partial"))
    handler.wfile.write(b"40\r\nda")
    handler.wfile.flush()
    handler.close_connection = True
    import socket
    handler.connection.shutdown(socket.SHUT_RDWR)


def closes_at_once(handler: Handler, _: Any) -> None:
    import socket
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def hinted(handler: Handler, _: Any) -> None:
    handler.send_raw(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
    handler.send_events(answer_events(["Hi"]))


def redirect(status: int, where: Callable[[FakeOpenAI, FakeOpenAI], str], path: str = "/v1/chat/completions",
             method: str = "POST") -> Callable[[FakeOpenAI, FakeOpenAI], None]:
    def setup(server: FakeOpenAI, other: FakeOpenAI) -> None:
        target = where(server, other)
        server.routes[(method, path)] = lambda h, _: h.send_redirect(status, target)
    return setup


def parts_event(handler: Handler, _: Any) -> None:
    payload = {"choices": [{"delta": {"content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
                            "finish_reason": "stop"}]}
    handler.send_events([f"data: {json.dumps(payload)}\n\n"])


def lf_events(pieces: list[str], line_end: str = "\n", bom: bool = False) -> Callable[[Handler, Any], None]:
    text = "".join(answer_events(pieces)).replace("\n", line_end)
    if bom:
        text = "\ufeff" + text
    return lambda h, _: h.send_events([text[i:i + 5] for i in range(0, len(text), 5)])


def split_utf8(handler: Handler, _: Any) -> None:
    """An "é" whose two bytes come in two HTTP chunks, then a byte that is no UTF-8 at all."""
    handler.start_events()
    event = 'data: {"choices": [{"delta": {"content": "ok\u00e9 \u00ff"}, "finish_reason": "stop"}]}\n\n'.encode()
    event = event.replace(b"\xc3\xbf", b"\xff")
    cut = event.index(b"\xc3\xa9") + 1
    for piece in (event[:cut], event[cut:]):
        handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        handler.wfile.flush()
    handler.end_events()


def whole_json(handler: Handler, _: Any) -> None:
    handler.send_json(200, {"choices": [{"message": {"role": "assistant", "content": "Whole."}, "finish_reason": "stop"}]})


def models_with(ids: list[Any]) -> Callable[[FakeOpenAI, FakeOpenAI], None]:
    return models_route(lambda h, _: h.send_json(200, {"data": [{"id": name, "max_model_len": 4096} for name in ids]}))


def key_file(content: str | None, mode: int = 0o600) -> Callable[[FakeOpenAI], list[str]]:
    def args(server: FakeOpenAI) -> list[str]:
        path = Path(tempfile.mkdtemp()) / "key"
        if content is not None:
            path.write_text(content)
            path.chmod(mode)
        return ["--api", server.url, "--api-key-file", str(path)]
    return args


CASES = [
    # the model list
    Case("models trickled a byte at a time", models_route(trickle_models), connects=False, expect_ok=False),
    Case("models headers trickled", models_route(trickle_headers), connects=False, expect_ok=False),
    Case("models body of 1 GB announced", models_route(huge_models), connects=False, expect_ok=False),
    Case("models 103 then 200", models_route(lambda h, _: h.send_raw(
        b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n"
        b'{"data":[{"id":"b"}]} ')), expect_ok=True),
    Case("models 308 same origin", redirect(308, lambda s, o: "/v2/models", "/v1/models", "GET"), connects=False, expect_ok=False),
    Case("models 308 to another host", redirect(308, lambda s, o: f"http://localhost:{o.port}/v1/models", "/v1/models", "GET"), expect_ok=True),
    Case("models 302 loop", redirect(302, lambda s, o: "/v1/models", "/v1/models", "GET"), connects=False, expect_ok=False),
    Case("models redirect to file://", redirect(307, lambda s, o: "file:///etc/passwd", "/v1/models", "GET"), connects=False, expect_ok=False),
    Case("models not JSON", models_route(lambda h, _: h.send_raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/html\r\n\r\n<html")), connects=False, expect_ok=False),
    Case("models empty list", models_with([]), connects=False, expect_ok=False),
    Case("model id with ESC and bidi", models_with(["blue\x1b]0;pwn\x07\u202e\x1b[2J"]), expect_ok=True),
    Case("model id a number", models_with([42]), expect_ok=True),
    Case("models 401 echoing the key", models_route(echo_auth(401)), connects=False, expect_ok=False),
    Case("models 500 HTML echoing the key", models_route(echo_auth_html), connects=False, expect_ok=False),
    Case("models connection closed at once", models_route(closes_at_once), connects=False, expect_ok=False),
    # the answer
    Case("server ignores max_tokens", chat_route(endless(chunk("word "))), expect_ok=True),
    Case("one endless chunk", chat_route(endless(chunk("x" * 4000))), expect_ok=True),
    Case("keep-alives after finish_reason", chat_route(after_finish_pings), expect_ok=True),
    Case("keep-alives only", chat_route(pings_only), expect_ok=False),
    Case("chat headers trickled", chat_route(trickle_chat_headers), expect_ok=False),
    Case("1 GB single-line event", chat_route(huge_event), expect_ok=False),
    Case("CR-only line ends", chat_route(lf_events(["A", "b"], "\r")), expect_ok=True),
    Case("CRLF line ends and a BOM", chat_route(lf_events(["A", "b"], "\r\n", bom=True)), expect_ok=True),
    Case("content as parts", chat_route(parts_event), expect_ok=True),
    Case("content_filter", chat_route(answer_with(["Par"], "content_filter")), expect_ok=True),
    Case("tool_calls", chat_route(answer_with([], "tool_calls")), expect_ok=None),
    Case("unknown finish reason", chat_route(answer_with(["X"], "eos_token")), expect_ok=True),
    Case("103 before the stream", chat_route(hinted), expect_ok=True),
    Case("307 to another host", redirect(307, lambda s, o: f"http://localhost:{o.port}/v1/chat/completions"), expect_ok=True),
    Case("303 on the POST", redirect(303, lambda s, o: "/elsewhere"), expect_ok=False),
    Case("500 echoing the key", chat_route(echo_auth(500)), expect_ok=False),
    Case("error event echoing the key", chat_route(lambda h, _: h.send_events(
        [chunk("Part"), f'data: {{"error": "denied {h.headers.get("Authorization")}"}}\n\n'])), expect_ok=False),
    Case("answer echoing the key in pieces", chat_route(answer_with(["key=", SECRET[:5], SECRET[5:], "."])), expect_ok=True),
    Case("answer with escapes", chat_route(answer_with(["\x1b]52;c;AAAA\x07hi \u202eevil"])), expect_ok=True),
    Case("dies mid-answer", chat_route(dies_mid_answer), expect_ok=False),
    Case("closes before any answer", chat_route(closes_at_once), expect_ok=False),
    Case("malformed JSON event", chat_route(raw_events("data: {oops\n\n")), expect_ok=False),
    Case("choices not a list", chat_route(raw_events('data: {"choices": 3}\n\n')), expect_ok=False),
    Case("UTF-8 split across chunks, invalid byte", chat_route(split_utf8), expect_ok=True),
    Case("non-streamed JSON answer", chat_route(whole_json), expect_ok=True),
    Case("429 with Retry-After", chat_route(lambda h, _: h.send_json(429, {"error": "slow down"})), expect_ok=False),
    Case("401 after connecting", chat_route(echo_auth(401)), expect_ok=False),
    Case("usage with garbage values", chat_route(answer_with_usage({"prompt_tokens": "many", "completion_tokens": None})), expect_ok=True),
    Case("event: and id: lines, retry", chat_route(raw_events(
        'event: message\nid: 1\nretry: 10\ndata: {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\n')), expect_ok=True),
    Case("10,000 models listed", models_with([f"m{i}" for i in range(10_000)]), expect_ok=True),
    Case("redirect with credentials in Location", redirect(
        307, lambda s, o: f"http://mallory:pw@localhost:{o.port}/v1/chat/completions"), expect_ok=True),
    # the invocation
    Case("key with CRLF", args=lambda s: ["--api", s.url, "--api-key", SECRET + "\r\nX-Evil: 1"], connects=False, expect_ok=False),
    Case("key with non-ASCII", args=lambda s: ["--api", s.url, "--api-key", SECRET + "é"], connects=False, expect_ok=False),
    Case("key env with LF", args=lambda s: ["--api", s.url], env={"BLUELM_API_KEY": SECRET + "\nx"}, connects=False, expect_ok=False),
    Case("URL credentials", args=lambda s: ["--api", f"http://bob:{PASSWORD}@127.0.0.1:{s.port}/v1"], expect_ok=True),
    Case("URL credentials and a 500", chat_route(echo_auth(500)), args=lambda s: ["--api", f"http://bob:{PASSWORD}@127.0.0.1:{s.port}/v1"], expect_ok=False),
    Case("URL credentials, bad scheme", args=lambda s: ["--api", f"ftp://bob:{PASSWORD}@127.0.0.1:{s.port}/v1"], connects=False, expect_ok=False),
    Case("upper-case scheme", args=lambda s: ["--api", s.url.replace("http", "HTTP")], expect_ok=True),
    Case("HTTP_PROXY to the fake", args=lambda s: ["--api", "http://served.invalid/v1"], env={"HTTP_PROXY": "__OTHER__"}, expect_ok=True),
    Case("https through a proxy refusing CONNECT", args=lambda s: ["--api", "https://served.invalid/v1"],
         env={"HTTPS_PROXY": "__OTHER__"}, connects=False, expect_ok=False),
    Case("dead proxy", args=lambda s: ["--api", s.url], env={"HTTP_PROXY": "http://127.0.0.1:9"}, connects=False, expect_ok=False),
    Case("socks proxy with a password", args=lambda s: ["--api", s.url], env={"ALL_PROXY": f"socks5://u:{PASSWORD}@h:1"}, connects=False, expect_ok=False),
    Case("key file", args=key_file(SECRET + "\n"), expect_ok=True),
    Case("key file missing", args=key_file(None), connects=False, expect_ok=False),
    Case("key file empty", args=key_file(""), connects=False, expect_ok=False),
    Case("key file with CR", args=key_file(SECRET + "\r\n"), expect_ok=True),
]


def run_case(case: Case) -> tuple[bool, bool, str]:
    """(clean, turn lost, why not clean)."""
    server, other = FakeOpenAI(), FakeOpenAI()
    home = tempfile.mkdtemp()
    saved = dict(os.environ)
    try:
        os.environ.update({"BLUELM_HOME": home, "HF_HUB_OFFLINE": "1"})
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                     "no_proxy", "BLUELM_API_KEY", "OPENAI_API_KEY", "BLUELM_API"):
            os.environ.pop(name, None)
        os.environ.update({k: v.replace("__OTHER__", f"http://127.0.0.1:{other.port}") for k, v in case.env.items()})
        case.setup(server, other)
        args = case.args(server)
        if case.command == "chat":
            argv, given = ["chat", *args, "-t", "0", "-n", "8", "--session", "c"], "hi\n"
        else:
            argv, given = ["ask", *args, "-t", "0", "-n", "8", "hi"], None
        outcome: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: outcome.update(r=CliRunner().invoke(app, argv, input=given)), daemon=True)
        worker.start()
        worker.join(CASE_LIMIT_S)
        if worker.is_alive():
            return False, case.connects, f"hung (> {CASE_LIMIT_S:.0f} s)"
        result = outcome["r"]
        shown = result.stdout + result.stderr
        journals = "".join(p.read_text(errors="replace") for p in Path(home).rglob("*.jsonl"))
        problems = []
        if "Traceback" in shown or (result.exception and not isinstance(result.exception, SystemExit)):
            problems.append(f"traceback {type(result.exception).__name__}")
        if SECRET in shown + journals or PASSWORD in shown + journals:
            problems.append("secret shown")
        # stdout here is no terminal: the answer is written as the model gave it, by design (a terminal gets it
        # through the sanitiser, ui.output); what bluelm itself says on stderr must be safe everywhere.
        if _UNSAFE.search(result.stderr):
            problems.append("raw control reached stderr")
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        if result.exit_code != 0 and not errors:
            problems.append(f"exit {result.exit_code} without an Error: line")
        if case.expect_ok is True and result.exit_code != 0:
            problems.append(f"failed: {errors[:1]}")
        if case.expect_ok is False and result.exit_code == 0:
            problems.append("succeeded where it should fail")
        lost = case.command == "chat" and case.connects and '"user":"hi"' not in journals.replace(" ", "")
        if lost:
            problems.append("turn lost")
        summary = (errors[0] if errors else result.stdout.strip()[:60])
        return not problems, lost, "; ".join(problems) or f"ok ({result.exit_code}: {summary[:110]})"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.close()
        other.close()


def main() -> int:
    # Short limits so that the hang cases end in seconds; what is tested is that they end at all.
    remote_http.JSON_DEADLINE_S = 2.0
    remote_http.READ_TIMEOUT_S = 3.0
    remote_stream.READ_TIMEOUT_S = 3.0
    remote_stream.IDLE_LIMIT_S = 2.0
    remote_stream.MAX_EVENT_BYTES = 1024 * 1024
    clean = lost = 0
    for case in CASES:
        ok, turn_lost, why = run_case(case)
        clean += ok
        lost += turn_lost
        print(f"{'clean' if ok else 'NOT CLEAN':9}  {case.name:38}  {why}", flush=True)
    print(f"{len(CASES)} tried, {clean} clean, {lost} turns lost")
    return 0 if clean == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
