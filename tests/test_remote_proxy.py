"""`--api https://…` through a real HTTPS CONNECT proxy: the fake OpenAI server of tests/fake_openai.py
serving TLS with a certificate from a throwaway CA (made with the openssl command), and a small threaded
CONNECT proxy of the tests' own on 127.0.0.1 that records what it can read in clear and relays the rest.

The user trusts a private CA as with curl, httpx and openai-python: SSL_CERT_FILE names its certificate.
"""

from __future__ import annotations

import base64
import selectors
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI


SECRET = "sk-proxy-test-secret-0123456789"
PROXY_PASSWORD = "proxy-pass-5ecret"
PROXY_CREDENTIALS = base64.b64encode(f"alice:{PROXY_PASSWORD}".encode()).decode()


# ----------------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the user trusts (SSL_CERT_FILE)
    other_ca: Path  # a CA that did not sign the server's certificate
    server_cert: Path
    server_key: Path
    expired_cert: Path  # for the same key and names, valid for one day in 2020


_LEAF_EXTENSIONS = """\
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
# `openssl ca` rather than `openssl x509`: OpenSSL 3.0's x509 cannot date a certificate in the past.
_CA_DATABASE = """\
[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
[any]
commonName = supplied
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    # EC keys: made at once (RSA key generation is slow on a busy machine). X.509 v3 CA extensions, as
    # Python 3.13's strict verification asks of a CA.
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=bluelm test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: the HTTPS proxy tests make their throwaway CA with it")
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "other_ca")
    (folder / "leaf.cnf").write_text(_LEAF_EXTENSIONS)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "1",
             "-days", "2", "-extfile", "leaf.cnf", "-extensions", "leaf", "-out", "server.pem", cwd=folder)
    (folder / "ca.cnf").write_text(_CA_DATABASE + _LEAF_EXTENSIONS)
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("02\n")
    _openssl("ca", "-config", "ca.cnf", "-batch", "-notext", "-cert", "ca.pem", "-keyfile", "ca.key", "-in", "server.csr",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-extensions", "leaf", "-out", "expired.pem",
             cwd=folder)
    return Pki(folder / "ca.pem", folder / "other_ca.pem", folder / "server.pem", folder / "server.key",
               folder / "expired.pem")


@pytest.fixture
def server(pki: Pki) -> Iterator[FakeOpenAI]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    fake = FakeOpenAI(tls=context)
    yield fake
    fake.close()


# ------------------------------------------------------------------------------------------ proxy
@dataclass
class Seen:
    """One request to the proxy, as it reads it in clear."""

    line: str
    headers: dict[str, str]


@dataclass
class ConnectProxy:
    """A CONNECT proxy on 127.0.0.1. `refuse` answers every CONNECT with that status line (or "close": closes
    the connection without answering); `credentials`
    (a Basic token) is required in Proxy-Authorization; `resolve_to` tunnels every host to that address
    (a name the certificate is not for, on this machine)."""

    refuse: str | None = None
    credentials: str | None = None
    resolve_to: str | None = None
    seen: list[Seen] = field(default_factory=list)
    relayed: bytearray = field(default_factory=bytearray)  # what the client sent through the tunnels
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            rbufsize = 0  # unbuffered: the request head is read a byte at a time, nothing of the tunnel with it

            def handle(self) -> None:
                proxy.handle(self.connection, self.rfile)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle(self, client: socket.socket, reader) -> None:  # noqa: ANN001
        line = reader.readline(65536).decode("latin-1").rstrip("\r\n")
        headers: dict[str, str] = {}
        while (header := reader.readline(65536)) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        with self._lock:
            self.seen.append(Seen(line, headers))
        method, target, _ = line.split(" ", 2)
        if self.refuse == "close":  # hangs up without a word
            return
        if self.refuse is not None:
            client.sendall(f"HTTP/1.1 {self.refuse}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            return
        if self.credentials is not None and headers.get("proxy-authorization") != f"Basic {self.credentials}":
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\n"
                           b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        with socket.create_connection((self.resolve_to or host.strip("[]"), int(port)), timeout=10) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            while True:
                for key, _ in selector.select(timeout=30):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is client:
                        with self._lock:
                            self.relayed += data
                    try:
                        key.data.sendall(data)
                    except OSError:  # the other side hung up: the tunnel ends
                        return


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    started = ConnectProxy()
    started.start()
    yield started
    started.close()


# ---------------------------------------------------------------------------------------- helpers
from test_remote_hostile import errors_of, invoke  # noqa: E402 - the same CLI runner helpers as the other remote tests


def ask(server: FakeOpenAI, *args: str):  # noqa: ANN201
    return invoke(["ask", "--api", server.url, "-t", "0", *args, "hi"])


@pytest.fixture
def trusted(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user trusts the test CA the documented way."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("BLUELM_API_KEY", SECRET)


# ------------------------------------------------------------------------------------------ tests
def test_ask_streams_through_the_connect_proxy_and_the_key_stays_inside_tls(
        server: FakeOpenAI, proxy: ConnectProxy, trusted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    result = ask(server)
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", []), result.stderr
    # Every request (the model list, the probes, the answer) went through a tunnel to localhost:PORT.
    assert proxy.seen and {seen.line for seen in proxy.seen} == {f"CONNECT localhost:{server.port} HTTP/1.1"}
    assert all(seen.headers.get("host") == f"localhost:{server.port}" for seen in proxy.seen)
    assert server.requests[-1][:2] == ("POST", "/v1/chat/completions") and not server.proxied
    # The server got the key; the proxy never could read it, neither in the CONNECT nor in the tunnel.
    assert server.requests[-1][3]["Authorization"] == f"Bearer {SECRET}"
    assert all("authorization" not in seen.headers for seen in proxy.seen)
    assert SECRET not in repr([(seen.line, seen.headers) for seen in proxy.seen])
    assert proxy.relayed and SECRET.encode() not in proxy.relayed and b"chat/completions" not in proxy.relayed


def test_proxy_credentials_go_as_proxy_authorization_and_are_never_shown(
        server: FakeOpenAI, proxy: ConnectProxy, trusted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.credentials = PROXY_CREDENTIALS
    monkeypatch.setenv("HTTPS_PROXY", proxy.url(f"alice:{PROXY_PASSWORD}@"))
    result = ask(server, "-v")
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", []), result.stderr
    assert proxy.seen and all(seen.headers["proxy-authorization"] == f"Basic {PROXY_CREDENTIALS}" for seen in proxy.seen)
    # Meant for the proxy only: never sent on to the server through the tunnel.
    assert all("Proxy-Authorization" not in headers for _, _, _, headers in server.requests)
    shown = result.stdout + result.stderr
    # -v names the proxy the answer came through, as printed everywhere: without its user name and password.
    assert f"Connected to {server.url} through the proxy http://127.0.0.1:{proxy.port} (from HTTPS_PROXY): " in shown
    assert PROXY_PASSWORD not in shown and PROXY_CREDENTIALS not in shown


def test_no_proxy_localhost_goes_direct(server: FakeOpenAI, proxy: ConnectProxy, trusted: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    monkeypatch.setenv("NO_PROXY", "localhost")
    result = ask(server, "-v")
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", []), result.stderr
    assert proxy.seen == [] and server.requests
    assert f"Connected to {server.url}: " in result.stderr  # no proxy named


@pytest.mark.parametrize(("refusal", "userinfo", "fix"), [
    ("403 Forbidden", "", "ask the proxy's administrator to allow it, or name the server in NO_PROXY"),
    ("407 Proxy Authentication Required", f"alice:{PROXY_PASSWORD}@",
     "check the user name and password in HTTPS_PROXY (http://user:password@host:port)"),
    ("407 Proxy Authentication Required", "",
     "put the proxy's user name and password in HTTPS_PROXY (http://user:password@host:port)"),
    ("502 Bad Gateway", "", "check that the server is running and --api is right, or name the server in NO_PROXY"),
])
def test_a_proxy_refusing_the_tunnel_is_one_error_naming_it(
        server: FakeOpenAI, proxy: ConnectProxy, trusted: None, monkeypatch: pytest.MonkeyPatch,
        refusal: str, userinfo: str, fix: str) -> None:
    proxy.refuse = refusal
    monkeypatch.setenv("HTTPS_PROXY", proxy.url(userinfo))
    result = ask(server, "-v")
    assert result.exit_code != 0 and result.stdout == ""
    assert errors_of(result) == [
        f"Error: the proxy http://127.0.0.1:{proxy.port} (from HTTPS_PROXY) refused to tunnel to "
        f"localhost:{server.port} for {server.url} (HTTP {refusal}); {fix}"]
    assert PROXY_PASSWORD not in result.stderr and PROXY_CREDENTIALS not in result.stderr
    assert server.requests == []


def test_all_proxy_is_named_when_it_is_the_one_used(server: FakeOpenAI, proxy: ConnectProxy, trusted: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.refuse = "403 Forbidden"
    monkeypatch.setenv("ALL_PROXY", proxy.url())
    assert errors_of(ask(server))[0].startswith(f"Error: the proxy http://127.0.0.1:{proxy.port} (from ALL_PROXY) refused")


@pytest.mark.parametrize("through_proxy", [True, False])
def test_an_untrusted_certificate_is_one_error_saying_how_to_trust_it(
        server: FakeOpenAI, proxy: ConnectProxy, pki: Pki, monkeypatch: pytest.MonkeyPatch, through_proxy: bool) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))  # the server's CA is not among those trusted
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("BLUELM_API_KEY", SECRET)
    if through_proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    result = ask(server)
    assert result.exit_code != 0 and result.stdout == ""
    errors = errors_of(result)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: the certificate of the server at {server.url} is not trusted (")
    assert errors[0].endswith("); if a private CA signed it, set SSL_CERT_FILE to that CA's certificate (a PEM file)")
    assert SECRET not in result.stderr
    assert [seen.line for seen in proxy.seen] == ([f"CONNECT localhost:{server.port} HTTP/1.1"] if through_proxy else [])
    assert server.requests == []  # nothing was sent over the untrusted connection


def test_a_certificate_for_another_name_is_one_error(server: FakeOpenAI, proxy: ConnectProxy, trusted: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.resolve_to = "127.0.0.1"  # served.invalid reaches the test server, whose certificate is for localhost
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    url = f"https://served.invalid:{server.port}/v1"
    result = invoke(["ask", "--api", url, "hi"])
    assert result.exit_code != 0 and result.stdout == ""
    assert errors_of(result) == [
        f"Error: the certificate of the server at {url} is not valid for 'served.invalid'; use the name it was "
        "issued for in --api"]
    assert server.requests == []


def test_chat_answers_one_turn_through_the_proxy(server: FakeOpenAI, proxy: ConnectProxy, trusted: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.credentials = PROXY_CREDENTIALS
    monkeypatch.setenv("HTTPS_PROXY", proxy.url(f"alice:{PROXY_PASSWORD}@"))
    result = invoke(["chat", "--api", server.url, "-t", "0", "-v"], input="hi\n")
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", []), result.stderr
    assert server.chat_bodies()[-1]["messages"] == [{"role": "user", "content": "hi"}]
    assert {seen.line for seen in proxy.seen} == {f"CONNECT localhost:{server.port} HTTP/1.1"}
    assert f"through the proxy http://127.0.0.1:{proxy.port} (from HTTPS_PROXY)" in result.stderr
    assert PROXY_PASSWORD not in result.stderr + result.stdout and PROXY_CREDENTIALS not in result.stderr + result.stdout


def test_a_proxy_echoing_its_credentials_in_the_refusal_never_shows_them(
        server: FakeOpenAI, proxy: ConnectProxy, trusted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.refuse = f"403 Forbidden alice:{PROXY_PASSWORD} Basic {PROXY_CREDENTIALS} \x1b]0;title\x07"
    monkeypatch.setenv("HTTPS_PROXY", proxy.url(f"alice:{PROXY_PASSWORD}@"))
    errors = errors_of(ask(server))
    assert len(errors) == 1 and "(HTTP 403 Forbidden alice:*** Basic *** " in errors[0]
    assert "\x1b" not in errors[0] and "\x07" not in errors[0]


def test_a_proxy_hanging_up_on_connect_is_one_error_naming_it(
        server: FakeOpenAI, proxy: ConnectProxy, trusted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.refuse = "close"
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    result = ask(server)
    assert result.exit_code != 0
    assert errors_of(result) == [
        f"Error: the proxy http://127.0.0.1:{proxy.port} (from HTTPS_PROXY) failed when asked to tunnel to "
        f"localhost:{server.port} for {server.url} (the proxy closed the connection without answering CONNECT); "
        "check HTTPS_PROXY, or name the server in NO_PROXY"]


def test_a_forward_proxy_asking_for_credentials_is_named(proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.credentials = PROXY_CREDENTIALS  # an http:// server: the proxy is asked the absolute URL, no CONNECT
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    result = invoke(["ask", "--api", "http://served.invalid:8000/v1", "hi"])
    assert result.exit_code != 0
    assert errors_of(result) == [
        f"Error: the proxy http://127.0.0.1:{proxy.port} (from HTTP_PROXY) refused the request for "
        "http://served.invalid:8000/v1 (HTTP 407 Proxy Authentication Required); put the proxy's user name and "
        "password in HTTP_PROXY (http://user:password@host:port)"]
    assert [seen.line for seen in proxy.seen] == ["GET http://served.invalid:8000/v1/models HTTP/1.1"]


@pytest.mark.parametrize("contents", [None, "not a certificate\n"])
def test_a_wrong_ssl_cert_file_is_said_as_such(server: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               contents: str | None) -> None:
    bundle = tmp_path / "ca.pem"
    if contents is not None:
        bundle.write_text(contents)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    result = ask(server)
    assert result.exit_code != 0 and result.stdout == ""
    errors = errors_of(result)
    said = "cannot be read (no such file or directory)" if contents is None else "holds no PEM certificate ("
    assert len(errors) == 1 and errors[0].startswith(f"Error: SSL_CERT_FILE names '{bundle}', which {said}"), errors
    assert errors[0].endswith("; set it to your CA's certificate (a PEM file), or unset it")
    assert server.requests == []


def test_ssl_cert_dir_trusts_a_folder_of_cas(server: FakeOpenAI, pki: Pki, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cas"
    folder.mkdir()
    shutil.copy(pki.ca, folder / "test-ca.pem")
    _openssl("rehash", str(folder), cwd=tmp_path)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(folder))
    result = ask(server)
    assert (result.exit_code, result.stdout, errors_of(result)) == (0, "Hello, world!\n", []), result.stderr


def test_an_ipv6_server_is_named_in_brackets_in_connect(server: FakeOpenAI, proxy: ConnectProxy, trusted: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.resolve_to = "127.0.0.1"  # the test server listens on IPv4; its certificate is not for ::1
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    url = f"https://[::1]:{server.port}/v1"
    result = invoke(["ask", "--api", url, "hi"])
    assert [seen.line for seen in proxy.seen] == [f"CONNECT [::1]:{server.port} HTTP/1.1"]
    assert proxy.seen[0].headers["host"] == f"[::1]:{server.port}"
    assert errors_of(result) == [f"Error: the certificate of the server at {url} is not valid for '::1'; use the name "
                                 "it was issued for in --api"]


def test_an_expired_certificate_is_one_error(pki: Pki, proxy: ConnectProxy, trusted: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.expired_cert, pki.server_key)
    expired = FakeOpenAI(tls=context)
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        result = ask(expired)
        assert result.exit_code != 0 and result.stdout == ""
        assert errors_of(result) == [f"Error: the certificate of the server at {expired.url} has expired; its operator "
                                     "must renew it (or check this machine's clock)"]
        assert expired.requests == []
    finally:
        expired.close()


def test_ssl_cert_dir_that_is_no_folder_is_said_as_such(server: FakeOpenAI, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "missing"))
    result = ask(server)
    assert result.exit_code != 0
    assert errors_of(result) == [f"Error: SSL_CERT_DIR names '{tmp_path / 'missing'}', which is not a folder; set it "
                                 "to a folder of CA certificates, or unset it"]
