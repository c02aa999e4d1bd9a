"""A small HTTP client for OpenAI-compatible servers (stdlib only: `--api` must start without heavy imports).

Every failure becomes a :class:`RemoteError` whose message is one line saying what went wrong and what
to do; the server's own message (from a JSON error body) is kept, shortened, in that line.

What it does as curl, httpx and openai-python do:
- credentials in the URL (`http://user:pass@host/v1`) are sent as basic auth (an API key, as a bearer
  token, takes their place), and never to another origin: a 307/308 redirect elsewhere is followed without
  them (a GET also follows 301/302/303);
- informational responses (103 Early Hints) before the real one are skipped;
- `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` are honoured with httpx's rules (read with
  urllib's `getproxies`, as httpx does); http:// proxies, tunnelled with CONNECT for https:// servers
  (`CONNECT host:port HTTP/1.1` with its Host header, as curl sends it; the proxy's credentials go in its
  Proxy-Authorization only, the API key only inside the TLS tunnel);
- the server's certificate is checked against the system's CAs, or against those of `SSL_CERT_FILE` (a PEM
  file) or `SSL_CERT_DIR` (OpenSSL's variables): how a user trusts a private CA;
- a whole JSON exchange has a total deadline as well as the read timeout (a server trickling one byte at a
  time would defeat the read timeout alone), and its body is capped.

Every text from the server goes through :meth:`HttpClient.server_text`: known secrets redacted, terminal
controls made harmless, on one line.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.core.sanitize import safe_for_terminal
from bluelm_cli.core.secrets import known_secrets, redact, redact_url

CONNECT_TIMEOUT_S = 10.0
# A busy server may queue a request for a long time before its first token; Ctrl-C stops sooner.
READ_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 5.0
# The most a whole JSON exchange (model list, tokenize, probes) may take, however the bytes trickle in.
JSON_DEADLINE_S = 60.0
# The largest JSON answer read (a model list or a tokenized prompt is far smaller).
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_REDIRECTS = 5
_DETAIL_CHARS = 300
# The longest line, and the most header lines, read from a proxy's answer to CONNECT.
_MAX_PROXY_LINE = 8192
_MAX_PROXY_HEADERS = 100
# OpenSSL's verification results that mean "a certificate for another name" and "expired".
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_REDIRECTS = (301, 302, 303, 307, 308)


class RemoteError(BlueLMError):
    """The server could not be reached, or refused or failed a request."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail  # the server's own message, for callers that recognise it


def check_api_key(key: str, source: str) -> None:
    """Refuse a key a header can't carry (a line break would inject headers), without ever printing it."""
    if not all(0x21 <= ord(char) <= 0x7E for char in key):
        raise UsageError(f"the API key from {source} contains a line break or a control character (or a space or "
                         "non-ASCII character); set it again without them (the key is not shown)")


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{port}"


@dataclass(frozen=True)
class ServerURL:
    """`--api` split into the OpenAI API base (…/v1) and the server root (where /tokenize, /props live)."""

    scheme: str
    host: str
    port: int
    api_path: str  # e.g. "/v1"
    root_path: str  # e.g. "" (the api path without its trailing /v1)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def api(self) -> str:
        """The API base as printed: never with the credentials."""
        return f"{self.origin}{self.api_path}"

    @property
    def origin(self) -> str:
        return str(self.origin_key)

    @property
    def origin_key(self) -> Origin:
        return Origin(self.scheme, self.host, self.port)

    @classmethod
    def parse(cls, url: str) -> ServerURL:
        """`http://host:8000/v1`; a URL with no path gets `/v1` (what every OpenAI-compatible server uses)."""
        try:
            parts = urlsplit(url.strip())  # the scheme comes lower-cased: `HTTP://` works as curl's does
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--api must be an http:// or https:// URL such as http://localhost:8000/v1, got '{redact_url(url)}'")
        path = parts.path.rstrip("/")
        if not path:
            path = "/v1"
        root = path[: -len("/v1")] if path.endswith("/v1") else path
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path, root,
                   username or None, password)


# ------------------------------------------------------------------------------------------ proxies
@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # Proxy-Authorization, from the URL's credentials
    source: str = "the environment"  # the variable it came from, as the user would name it: HTTPS_PROXY…
    secrets: tuple[str, ...] = field(default=(), repr=False)  # its password and token, never shown

    def __str__(self) -> str:
        """As printed: never with the credentials."""
        return f"http://{_authority(self.host, self.port)}"


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def proxy_for(origin: Origin) -> Proxy | None:
    """The proxy httpx would use for `origin` from the environment: HTTP(S)_PROXY / ALL_PROXY, unless NO_PROXY
    names the host (`*`; a domain and its subdomains; `.domain` for subdomains only; an IP; `localhost`)."""
    from urllib.request import getproxies  # what httpx reads too; imported here: it is slow to import

    found = getproxies()
    if _bypassed(origin, found.get("no", "")):
        return None
    url = found.get(origin.scheme) or found.get("all")
    if not url:
        return None
    source = f"{origin.scheme.upper()}_PROXY" if found.get(origin.scheme) else "ALL_PROXY"
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or not parts.hostname:
        raise UsageError(f"the proxy for {origin.scheme}:// in the environment is not a URL ('{redact_url(url)}'); "
                         "fix HTTP_PROXY / HTTPS_PROXY, or name the server in NO_PROXY")
    if parts.scheme != "http":
        raise UsageError(f"the proxy for {origin.scheme}:// is a {parts.scheme}:// proxy ('{redact_url(url)}'); bluelm "
                         "uses http:// proxies: change HTTP_PROXY / HTTPS_PROXY / ALL_PROXY, or name the server in NO_PROXY")
    authorization, secrets = None, ()
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(user_pass.encode()).decode()
        authorization = f"Basic {token}"
        secrets = known_secrets([token, unquote(parts.password or ""), parts.password])
    return Proxy(parts.hostname, port or 80, authorization, source, secrets)


def _bypassed(origin: Origin, no_proxy: str) -> bool:
    host = origin.host.lower()
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if "://" in entry:  # httpx: a whole origin, e.g. http://internal:8000
            scheme, _, rest = entry.partition("://")
            if scheme in (origin.scheme, "all") and _host_matches(host, origin.port, rest.rstrip("/")):
                return True
        elif _host_matches(host, origin.port, entry):
            return True
    return False


def _host_matches(host: str, port: int, entry: str) -> bool:
    pattern, wanted_port = entry, None
    if entry.startswith("["):  # [::1]:8000
        pattern, _, rest = entry[1:].partition("]")
        wanted_port = rest.removeprefix(":") or None
    elif entry.count(":") == 1:
        pattern, wanted_port = entry.split(":")
    if wanted_port is not None and wanted_port != str(port):
        return False
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(pattern)
    except ValueError:
        pass
    if pattern.startswith("*."):
        pattern = pattern[1:]
    elif pattern.startswith("*"):
        pattern = pattern[1:]
        return host == pattern or host.endswith("." + pattern)
    if pattern.startswith("."):  # subdomains only
        return host.endswith(pattern)
    return host == pattern or host.endswith("." + pattern)


# -------------------------------------------------------------------------------------- an exchange
class _FinalResponse(http.client.HTTPResponse):
    """A response that skips informational ones (103 Early Hints, 102) sent before it, as curl and httpx do.
    http.client skips only 100 Continue and would return the 103 as the answer, with no body."""

    def begin(self) -> None:
        super().begin()
        while 100 <= self.status < 200 and self.status != 101:
            self.headers = None  # type: ignore[assignment]  # begin() reads the next status line from the same stream
            super().begin()


class ProxyRefused(OSError):
    """The proxy answered CONNECT with something other than 2xx."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"the proxy refused to tunnel: HTTP {status} {reason}")
        self.status = status
        self.reason = reason


class TunnelledHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to `origin` through an http:// proxy's CONNECT tunnel.

    Not http.client's `set_tunnel`: before Python 3.12 it sends `CONNECT host:port HTTP/1.0` without a Host
    header and cannot put an IPv6 address in it, and it fails every stage with the same OSError. Here
    `stage` says how far it got ("proxy": reaching the proxy, "tunnel": its answer to CONNECT, "tls": the
    handshake with the server), so each failure gets its own message. Only the CONNECT line and these
    headers are in clear: the request, with the API key, goes inside TLS with the server.
    """

    def __init__(self, origin: Origin, proxy: Proxy, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(origin.host, origin.port, timeout=timeout, context=context)
        self.proxy = proxy
        self.stage = "proxy"
        self._tls = context

    @property
    def target(self) -> str:
        return _authority(self.host, self.port)

    def connect(self) -> None:
        self.stage = "proxy"
        self.sock = socket.create_connection((self.proxy.host, self.proxy.port), self.timeout)
        self.stage = "tunnel"
        target = _authority(_ascii_host(self.host), self.port)
        head = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.proxy.authorization:
            head.append(f"Proxy-Authorization: {self.proxy.authorization}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        status, reason = _read_proxy_answer(self.sock)
        if not 200 <= status < 300:
            raise ProxyRefused(status, reason)
        self.stage = "tls"
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host)


def _ascii_host(host: str) -> str:
    try:
        return host.encode("ascii").decode()
    except UnicodeEncodeError:
        return host.encode("idna").decode()


def _read_proxy_answer(sock: socket.socket) -> tuple[int, str]:
    """The status and reason of the proxy's answer to CONNECT, its headers read past. Read unbuffered, a
    byte at a time: nothing of what follows (the server's TLS) may be taken from the socket."""
    with sock.makefile("rb", buffering=0) as reader:
        status_line = reader.readline(_MAX_PROXY_LINE + 1)
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit() or len(status_line) > _MAX_PROXY_LINE:
            if not status_line:
                raise ConnectionResetError("the proxy closed the connection without answering CONNECT")
            raise http.client.BadStatusLine("the proxy's answer to CONNECT is not HTTP")
        for _ in range(_MAX_PROXY_HEADERS):
            line = reader.readline(_MAX_PROXY_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                break
        else:
            raise http.client.BadStatusLine("the proxy's answer to CONNECT has too many header lines")
    return int(parts[1]), parts[2].strip() if len(parts) > 2 else ""


class Exchange:
    """One request and its response, following redirects; `shutdown()` (any thread) closes it at once.

    A watchdog shuts the socket when the deadline passes (the headers of a streamed answer, or a whole JSON
    exchange): a timeout per read alone never ends a server that trickles a byte at a time.
    """

    def __init__(self, client: HttpClient, method: str, path: str, payload: bytes | None, *, streaming: bool,
                 read_timeout: float, deadline_s: float) -> None:
        self.client = client
        self.method = method
        self.path = path
        self.deadline_s = deadline_s
        self.expired = False
        self.response: http.client.HTTPResponse | None = None
        self._payload = payload
        self._streaming = streaming
        self._read_timeout = read_timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True

    def open(self) -> http.client.HTTPResponse:
        """Send the request; the final response (redirects followed). RemoteError for what can't be followed;
        OSError / HTTPException as http.client raises them (see `HttpClient.connection_error`)."""
        client = self.client
        origin, path = client.url.origin_key, self.path
        with_credentials = True
        self._timer.start()
        for _ in range(MAX_REDIRECTS + 1):
            conn, target, proxy_headers, proxy = client.connection(origin, path, self._read_timeout)
            with self._lock:
                if self._closed:
                    raise OSError("closed")
                self._conn = conn
            try:
                conn.connect()
            except ProxyRefused as error:
                assert isinstance(conn, TunnelledHTTPSConnection)
                raise client.proxy_refused(conn.proxy, conn.target, error.status, error.reason) from None
            except (OSError, http.client.HTTPException) as error:
                if proxy is not None and not self.expired:
                    stage = conn.stage if isinstance(conn, TunnelledHTTPSConnection) else "proxy"
                    if stage != "tls":
                        raise client.proxy_error(proxy, error, conn.host if stage == "tunnel" else None,
                                                 conn.port) from None
                raise client.connection_error(error, CONNECT_TIMEOUT_S, origin) from None
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)
            conn.response_class = _FinalResponse
            headers = {**client.headers(streaming=self._streaming, credentials=with_credentials), **proxy_headers}
            conn.request(self.method, target, body=self._payload, headers=headers)
            response = conn.getresponse()
            if response.status == 407 and proxy is not None and origin.scheme == "http":
                # A forward proxy (http:// servers) asking for credentials: about the proxy, not the server.
                raise client.proxy_refused(proxy, None, response.status, response.reason or "")
            location = response.getheader("Location")
            if response.status not in _REDIRECTS or not location:
                self.response = response
                return response
            if response.status in (301, 302, 303) and self.method != "GET":
                raise RemoteError(
                    f"the server at {client.url.api} redirected {self.method} {self.path} (HTTP {response.status}) to "
                    f"'{client.server_text(location)}', which would drop the request; use that address with --api",
                    response.status)
            response.read(64 * 1024)  # a redirect's body says nothing; the connection is not reused
            conn.close()
            moved = urlsplit(urljoin(f"{origin}{path}", location.strip()))
            try:
                port = moved.port
            except ValueError:
                port = None
            if moved.scheme not in ("http", "https") or not moved.hostname:
                raise RemoteError(f"the server at {client.url.api} redirected {self.method} {self.path} to "
                                  f"'{client.server_text(location)}', which is not an http(s) URL; check --api", response.status)
            origin = Origin(moved.scheme, moved.hostname, port or (443 if moved.scheme == "https" else 80))
            path = moved.path + (f"?{moved.query}" if moved.query else "")
            # Credentials go to the origin the user named only, as curl and httpx do: once elsewhere, never again.
            with_credentials = with_credentials and origin == client.url.origin_key
        raise RemoteError(f"the server at {client.url.api} redirected {self.method} {self.path} more than "
                          f"{MAX_REDIRECTS} times; check --api")

    def settle(self) -> None:
        """The headers came: a streamed answer is no longer under the deadline (it has limits of its own)."""
        self._timer.cancel()

    @property
    def sock(self) -> socket.socket | None:
        return self._conn.sock if self._conn is not None else None

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            conn = self._conn
        if conn is not None:
            conn.close()

    def _expire(self) -> None:
        self.expired = True
        self.shutdown()

    def deadline_error(self) -> RemoteError:
        return RemoteError(f"the server at {self.client.url.api} did not finish answering {self.method} {self.path} "
                           f"within {self.deadline_s:.0f} s; check --api or try again")


class HttpClient:
    """JSON requests and streamed responses against one server, with the API key as a bearer token (or the
    URL's credentials as basic auth)."""

    def __init__(self, url: ServerURL, api_key: str | None) -> None:
        if api_key:
            check_api_key(api_key, "the caller")
        self.url = url
        self._api_key = api_key
        self._authorization: str | None = None
        basic = None
        if api_key:
            self._authorization = f"Bearer {api_key}"
        elif url.username is not None or url.password is not None:
            user_pass = f"{url.username or ''}:{url.password or ''}"
            basic = base64.b64encode(user_pass.encode()).decode()
            self._authorization = f"Basic {basic}"
        lone_user = url.username if url.password is None else None
        self.secrets = known_secrets([api_key, url.password, lone_user, basic])
        self._tls: ssl.SSLContext | None = None

    @property
    def proxy(self) -> Proxy | None:
        """The proxy the environment names for this server (None: reached directly)."""
        return proxy_for(self.url.origin_key)

    @property
    def has_key(self) -> bool:
        return bool(self._authorization)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def server_text(self, text: str) -> str:
        """Text from the server as it may be printed or journaled: secrets redacted, controls made harmless."""
        return safe_for_terminal(self.redact(text))

    def connection(self, origin: Origin, path: str, timeout: float
                   ) -> tuple[http.client.HTTPConnection, str, dict[str, str], Proxy | None]:
        """A connection towards `origin` (direct, or through the environment's proxy), the request target to
        send on it, the headers the proxy needs, and the proxy."""
        proxy = proxy_for(origin)
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = tls_context()
            if proxy is None:
                return http.client.HTTPSConnection(origin.host, origin.port, timeout=timeout, context=self._tls), path, {}, None
            return TunnelledHTTPSConnection(origin, proxy, timeout, self._tls), path, {}, proxy
        if proxy is None:
            return http.client.HTTPConnection(origin.host, origin.port, timeout=timeout), path, {}, None
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
        return conn, f"{origin}{path}", {"Proxy-Authorization": proxy.authorization} if proxy.authorization else {}, proxy

    def headers(self, *, streaming: bool = False, credentials: bool = True) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if streaming else "application/json"}
        if self._authorization and credentials:
            headers["Authorization"] = self._authorization
        return headers

    def exchange(self, method: str, path: str, body: Any = None, *, streaming: bool = False,
                 read_timeout: float = CONNECT_TIMEOUT_S, deadline_s: float | None = None) -> Exchange:
        payload = None if body is None else json.dumps(body).encode()
        return Exchange(self, method, path, payload, streaming=streaming, read_timeout=read_timeout,
                        deadline_s=JSON_DEADLINE_S if deadline_s is None else deadline_s)

    def request_json(self, method: str, path: str, body: Any = None, *, timeout: float = CONNECT_TIMEOUT_S) -> Any:
        """The decoded JSON answer to one request; RemoteError (with `status`) for any failure."""
        # A probe's short timeout shortens its deadline too; never beyond JSON_DEADLINE_S.
        exchange = self.exchange(method, path, body, read_timeout=timeout, deadline_s=min(JSON_DEADLINE_S, 3 * timeout))
        try:
            try:
                response = exchange.open()
                data = _read_capped(response, MAX_JSON_BYTES)
            except (OSError, http.client.HTTPException) as error:
                if exchange.expired:
                    raise exchange.deadline_error() from None
                raise self.connection_error(error, timeout) from None
            if data is None:
                raise RemoteError(f"the server at {self.url.api} answered {method} {path} with more than "
                                  f"{_size(MAX_JSON_BYTES)}; check --api", response.status)
            if exchange.expired:
                raise exchange.deadline_error()
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
            exchange.close()

    def proxy_refused(self, proxy: Proxy, target: str | None, status: int, reason: str) -> RemoteError:
        """The proxy answered CONNECT to `target` (or, for a forward proxy, the request) with HTTP `status`."""
        said = " ".join(safe_for_terminal(redact(self.redact(reason), proxy.secrets)).split())[:80]
        what = f"to tunnel to {target} for {self.url.api}" if target else f"the request for {self.url.api}"
        variable = proxy.source if proxy.source != "the environment" else "HTTP_PROXY / HTTPS_PROXY / ALL_PROXY"
        if status == 407 and proxy.authorization:
            fix = f"check the user name and password in {variable} (http://user:password@host:port)"
        elif status == 407:
            fix = f"put the proxy's user name and password in {variable} (http://user:password@host:port)"
        elif status >= 500:
            fix = "check that the server is running and --api is right, or name the server in NO_PROXY"
        else:
            fix = "ask the proxy's administrator to allow it, or name the server in NO_PROXY"
        return RemoteError(f"the proxy {proxy} (from {proxy.source}) refused {what} (HTTP {status}"
                           f"{' ' + said if said else ''}); {fix}")

    def proxy_error(self, proxy: Proxy, error: BaseException, host: str | None, port: int) -> RemoteError:
        """The proxy could not be reached (`host` None), or failed to answer CONNECT to `host`."""
        variable = proxy.source if proxy.source != "the environment" else "HTTP_PROXY / HTTPS_PROXY / ALL_PROXY"
        described = " ".join(safe_for_terminal(redact(self.redact(_describe(error)), proxy.secrets)).split())
        if host is None:
            return RemoteError(f"cannot reach the proxy {proxy} (from {proxy.source}) for {self.url.api}: "
                               f"{described.lower()}; check {variable}, or name the server in NO_PROXY")
        return RemoteError(f"the proxy {proxy} (from {proxy.source}) failed when asked to tunnel to "
                           f"{_authority(host, port)} for {self.url.api} ({described}); check {variable}, "
                           "or name the server in NO_PROXY")

    def connection_error(self, error: BaseException, timeout: float, origin: Origin | None = None) -> RemoteError:
        where = self.url.api
        host = (origin or self.url.origin_key).host
        if isinstance(error, RemoteError):
            return error
        if isinstance(error, ssl.SSLCertVerificationError):
            if error.verify_code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
                return RemoteError(f"the certificate of the server at {where} is not valid for '{host}'; "
                                   "use the name it was issued for in --api")
            if error.verify_code == _X509_V_ERR_CERT_HAS_EXPIRED:
                return RemoteError(f"the certificate of the server at {where} has expired; its operator must renew "
                                   "it (or check this machine's clock)")
            said = safe_for_terminal(str(error.verify_message or error.reason or "verification failed"))
            return RemoteError(f"the certificate of the server at {where} is not trusted ({said}); if a private CA "
                               "signed it, set SSL_CERT_FILE to that CA's certificate (a PEM file)")
        if isinstance(error, ConnectionRefusedError):
            return RemoteError(f"cannot reach the server at {where}: connection refused; is it running? (check --api)")
        if isinstance(error, socket.gaierror):
            return RemoteError(f"cannot reach the server at {where}: unknown host '{self.url.host}'; check --api")
        if isinstance(error, (TimeoutError, socket.timeout)):
            return RemoteError(f"the server at {where} did not answer within {timeout:.0f} s; check --api or try again")
        if isinstance(error, ssl.SSLError):
            return RemoteError(f"TLS failed with the server at {where} ({error.reason or error}); check the URL's scheme")
        if isinstance(error, http.client.HTTPException) or isinstance(error, ConnectionError):
            return RemoteError(f"the server at {where} closed the connection ({self.server_text(_describe(error))}); "
                               "check that --api points at an OpenAI-compatible server")
        return RemoteError(f"cannot reach the server at {where}: {self.server_text(_describe(error))}; check --api")

    def status_error(self, status: int, data: bytes, what: str) -> RemoteError:
        detail = error_detail(data, self.server_text)
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            fix = ("check --api-key (or BLUELM_API_KEY / OPENAI_API_KEY)" if self._api_key
                   else "check the user name and password in --api" if self._authorization
                   else "pass --api-key or set BLUELM_API_KEY")
            return RemoteError(f"the server at {self.url.api} refused the request (HTTP {status}{said}); {fix}", status, detail)
        if status == 404 and what.endswith("/models"):
            return RemoteError(
                f"{self.url.api} is not an OpenAI-compatible API ({what}: HTTP 404{said}); "
                "check --api (e.g. http://localhost:8000/v1)", status, detail,
            )
        return RemoteError(f"the server at {self.url.api} answered {what} with HTTP {status}{said}", status, detail)


def tls_context() -> ssl.SSLContext:
    """The system's CAs; or those of `SSL_CERT_FILE` (a PEM file), else of `SSL_CERT_DIR` (a folder hashed with
    `openssl rehash`), instead. Read here, not left to OpenSSL (which reads the same variables, but says
    nothing of a wrong path), so that a typo is said as such rather than as an untrusted server."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = None if cafile else os.environ.get("SSL_CERT_DIR") or None
    if capath is not None and not os.path.isdir(capath):
        raise UsageError(f"SSL_CERT_DIR names '{safe_for_terminal(capath)}', which is not a folder; set it to a "
                         "folder of CA certificates, or unset it")
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except ssl.SSLError as error:
        raise UsageError(f"SSL_CERT_FILE names '{safe_for_terminal(str(cafile))}', which holds no PEM certificate "
                         f"({error.reason or error}); set it to your CA's certificate (a PEM file), or unset it") from None
    except OSError as error:
        raise UsageError(f"SSL_CERT_FILE names '{safe_for_terminal(str(cafile))}', which cannot be read "
                         f"({_describe(error).lower()}); set it to your CA's certificate (a PEM file), or unset it") from None


def _read_capped(response: http.client.HTTPResponse, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (the rest is not read)."""
    pieces: list[bytes] = []
    total = 0
    while True:
        piece = response.read1(64 * 1024)
        if not piece:
            return b"".join(pieces)
        total += len(piece)
        if total > limit:
            return None
        pieces.append(piece)


def _size(count: int) -> str:
    return f"{count // (1024 * 1024)} MiB" if count >= 1024 * 1024 else f"{count // 1024} KiB"


def error_detail(data: bytes, clean: Any = safe_for_terminal) -> str:
    """The server's own message from an error body (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, …),
    one line; `clean` (the client's `server_text`: secrets redacted) runs before it is shortened."""
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
    message = " ".join(clean(message).split())
    return message if len(message) <= _DETAIL_CHARS else message[: _DETAIL_CHARS - 1] + "…"


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
