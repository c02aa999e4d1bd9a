"""A small HTTP client for OpenAI-compatible servers (stdlib only: `--api` must start without heavy imports).

Every failure becomes a :class:`RemoteError` whose message is one line saying what went wrong and what
to do; the server's own message (from a JSON error body) is kept, shortened, in that line.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bluelm_cli.core.errors import BlueLMError, UsageError

CONNECT_TIMEOUT_S = 10.0
# A busy server may queue a request for a long time before its first token; Ctrl-C stops sooner.
READ_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 5.0
_DETAIL_CHARS = 300


class RemoteError(BlueLMError):
    """The server could not be reached, or refused or failed a request."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail  # the server's own message, for callers that recognise it


@dataclass(frozen=True)
class ServerURL:
    """`--api` split into the OpenAI API base (…/v1) and the server root (where /tokenize, /props live)."""

    scheme: str
    host: str
    port: int
    api_path: str  # e.g. "/v1"
    root_path: str  # e.g. "" (the api path without its trailing /v1)

    @property
    def api(self) -> str:
        return f"{self.origin}{self.api_path}"

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{port}"

    @classmethod
    def parse(cls, url: str) -> ServerURL:
        """`http://host:8000/v1`; a URL with no path gets `/v1` (what every OpenAI-compatible server uses)."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--api must be an http:// or https:// URL such as http://localhost:8000/v1, got '{url}'")
        path = parts.path.rstrip("/")
        if not path:
            path = "/v1"
        root = path[: -len("/v1")] if path.endswith("/v1") else path
        return cls(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path, root)


class HttpClient:
    """JSON requests and streamed responses against one server, with the API key as a bearer token."""

    def __init__(self, url: ServerURL, api_key: str | None) -> None:
        self.url = url
        self._api_key = api_key

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(self.url.host, self.url.port, timeout=timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self.url.host, self.url.port, timeout=timeout)

    def headers(self, *, streaming: bool = False) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if streaming else "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def request_json(self, method: str, path: str, body: Any = None, *, timeout: float = CONNECT_TIMEOUT_S) -> Any:
        """The decoded JSON answer to one request; RemoteError (with `status`) for any failure."""
        conn = self.connection(timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            try:
                conn.request(method, path, body=payload, headers=self.headers())
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                raise self.connection_error(error, timeout) from None
            if response.status >= 400:
                raise self.status_error(response.status, data, f"{method} {path}")
            try:
                return json.loads(data)
            except ValueError:
                raise RemoteError(
                    f"the server at {self.url.api} answered {method} {path} with something that is not JSON; "
                    "check that --api points at an OpenAI-compatible server", response.status
                ) from None
        finally:
            conn.close()

    def connection_error(self, error: BaseException, timeout: float) -> RemoteError:
        where = self.url.api
        if isinstance(error, ConnectionRefusedError):
            return RemoteError(f"cannot reach the server at {where}: connection refused; is it running? (check --api)")
        if isinstance(error, socket.gaierror):
            return RemoteError(f"cannot reach the server at {where}: unknown host '{self.url.host}'; check --api")
        if isinstance(error, (TimeoutError, socket.timeout)):
            return RemoteError(f"the server at {where} did not answer within {timeout:.0f} s; check --api or try again")
        if isinstance(error, ssl.SSLError):
            return RemoteError(f"TLS failed with the server at {where} ({error.reason or error}); check the URL's scheme")
        if isinstance(error, http.client.HTTPException) or isinstance(error, ConnectionError):
            return RemoteError(f"the server at {where} closed the connection ({_describe(error)}); "
                               "check that --api points at an OpenAI-compatible server")
        return RemoteError(f"cannot reach the server at {where}: {_describe(error)}; check --api")

    def status_error(self, status: int, data: bytes, what: str) -> RemoteError:
        detail = error_detail(data)
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            fix = ("check --api-key (or BLUELM_API_KEY / OPENAI_API_KEY)" if self._api_key
                   else "pass --api-key or set BLUELM_API_KEY")
            return RemoteError(f"the server at {self.url.api} refused the request (HTTP {status}{said}); {fix}", status, detail)
        if status == 404 and what.endswith("/models"):
            return RemoteError(
                f"{self.url.api} is not an OpenAI-compatible API ({what}: HTTP 404{said}); "
                "check --api (e.g. http://localhost:8000/v1)", status, detail,
            )
        return RemoteError(f"the server at {self.url.api} answered {what} with HTTP {status}{said}", status, detail)


def error_detail(data: bytes) -> str:
    """The server's own message from an error body (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, …), one line."""
    text = data.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message: Any = text
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message", text)))
        if isinstance(error, dict):
            error = error.get("message", error.get("msg", error))
        message = error
    if not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)
    message = " ".join(message.split())
    return message if len(message) <= _DETAIL_CHARS else message[: _DETAIL_CHARS - 1] + "…"


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
