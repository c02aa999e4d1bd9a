"""A small OpenAI-compatible server of the tests' own (stdlib http.server in a thread on 127.0.0.1).

Each route is a function of (handler, parsed JSON body); the default routes serve one model, "blue",
and stream a scripted answer. Tests replace routes to produce each failure a real server can show.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = Callable[["Handler", Any], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        fake = self.server.fake
        # A forward proxy is sent the absolute URL (`GET http://host/v1/models`): the fake serves as one too.
        path = self.path
        if path.lower().startswith(("http://", "https://")):
            fake.proxied.append(path)
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        fake.requests.append((method, path, body, dict(self.headers)))
        route = fake.routes.get((method, path))
        if route is None:
            self.send_json(404, {"detail": "Not Found"})
            return
        route(self, body)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # ------------------------------------------------------------------------------------- replies
    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_events(self) -> None:
        """An SSE response in chunked encoding (as uvicorn and vLLM send it)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (a status line, headers, a body): for what no well-behaved server sends."""
        self.wfile.write(data)
        self.wfile.flush()

    def send_redirect(self, status: int, location: str) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_events(self, events: Iterable[str]) -> None:
        self.start_events()
        for event in events:
            self.send_chunk(event)
        self.end_events()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # The TLS handshake runs in the connection's own thread: a client that never finishes it (or refuses
        # the certificate) holds up no other connection.
        secure = self.tls.wrap_socket(request, server_side=True)
        try:
            super().finish_request(secure, client_address)
        finally:
            self.shutdown_request(secure)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that closes a stream early (Ctrl-C, or after `[DONE]`) resets the connection, and one that
        # does not trust the certificate ends the handshake: no failure.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ssl.SSLError)):
            super().handle_error(request, client_address)


def chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> str:
    """One `data:` event of a chat completion stream."""
    delta = {} if content is None else {"content": content}
    payload: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "blue",
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


def answer_events(pieces: list[str], finish: str = "stop", done: bool = True, usage: dict[str, int] | None = None) -> list[str]:
    events = [chunk(piece) for piece in pieces] + [chunk(None, finish)]
    if usage is not None:
        events.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
    if done:
        events.append("data: [DONE]\n\n")
    return events


class FakeOpenAI:
    """Serve until `close()`; `url` is the API base (…/v1). With `tls` (a server-side SSLContext) it serves
    HTTPS, and `url` names it `localhost` (the name a test certificate is made for)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str, Any, dict[str, str]]] = []
        self.proxied: list[str] = []  # absolute URLs asked of it as a forward proxy
        self.answer = ["Hello", ", world", "!"]
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/v1/models"): lambda h, _: h.send_json(200, {"object": "list", "data": [{"id": "blue", "object": "model", "max_model_len": 4096}]}),
            ("POST", "/v1/chat/completions"): lambda h, _: h.send_events(answer_events(self.answer)),
        }
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.fake = self
        self._server.tls = tls
        # shutdown() waits for the loop's next poll: a short interval keeps each test's teardown short.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        if self._server.tls is not None:
            return f"https://localhost:{self.port}/v1"
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_bodies(self) -> list[Any]:
        return [body for method, path, body, _ in self.requests if path == "/v1/chat/completions"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
