"""One streamed answer from `/v1/chat/completions`: SSE events in, text deltas out, timed at the client.

The request runs in a worker thread; `stop()` (any thread, or a signal handler) shuts the socket down,
which closes the HTTP stream, and the answer so far is kept as "interrupted". A failure before any text
is raised to the caller (nothing is recorded); a failure after some text — the server dying, a
malformed event, an error event — ends the answer with finish "error", the text so far kept, and the
reason in `result.error`.

Streams end with `data: [DONE]` (vLLM, SGLang, llama.cpp, ollama, TGI) or without it (`transformers
serve`): the end of the body after a chunk with a finish_reason is a normal end; the end of the body
before one is the server dying. After the finish_reason only the usage chunk and `[DONE]` are awaited: a
keep-alive comment, or a short silence, ends the turn there.

Nothing unbounded: an event is capped (MAX_EVENT_BYTES), a server that ignores max_tokens is stopped at our
own limit (the turn marked cut at max_new_tokens), and a stream of keep-alives alone ends after
IDLE_LIMIT_S. Lines may end in CR, LF or CRLF, and a BOM may lead, as the SSE specification allows.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import HUMAN_TAG
from bluelm_cli.core.worker_stream import WorkerStream
from bluelm_cli.remote.http import MAX_JSON_BYTES, READ_TIMEOUT_S, Exchange, HttpClient, RemoteError, error_detail

_FINISH = {
    "length": FinishReason.LENGTH, "abort": FinishReason.ERROR, "error": FinishReason.ERROR,
    "content_filter": FinishReason.CONTENT_FILTER, "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
}
# The largest single event (one `data:` line, or the lines of one event) held in memory.
MAX_EVENT_BYTES = 4 * 1024 * 1024
# Our own bound on an answer, for a server that ignores max_tokens: no more content chunks than max_tokens
# (a chunk holds one token or more), and no more characters than this many per token.
MAX_CHARS_PER_TOKEN = 256
# A server that sends only keep-alives (or empty events) this long has not answered: the turn ends with an error.
IDLE_LIMIT_S = READ_TIMEOUT_S
# After the finish_reason, only the usage chunk and `[DONE]` are still awaited, and not longer than this.
AFTER_FINISH_S = 2.0
_READ_SIZE = 64 * 1024
_MAX_ATTEMPTS = 4  # a request refused for a field or an endpoint is asked again another way, this often at most
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class MalformedStream(RemoteError):
    pass


class _EventTooLong(MalformedStream):
    pass


@dataclass
class _Progress:
    text: str = ""
    chunks: int = 0
    finish: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False  # [DONE] seen
    first_at: float = 0.0
    last_at: float = 0.0


class _SSELines:
    """Bytes in, lines out, as the SSE specification reads them: CRLF, LF or a lone CR end a line, and a BOM at
    the start is dropped. A line longer than `limit` raises (nothing unbounded is held)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = b""
        self._started = False
        self._skip_lf = False  # a CR ended the last piece: an LF first in the next belongs to it

    def feed(self, data: bytes) -> list[bytes]:
        if self._skip_lf and data.startswith(b"\n"):
            data = data[1:]
        self._skip_lf = False
        buffer = self._buffer + data
        if not self._started and buffer:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer
                return []
            buffer = buffer.removeprefix(b"\xef\xbb\xbf")
            self._started = True
        lines: list[bytes] = []
        start = 0
        for match in _LINE_BREAK.finditer(buffer, max(0, len(self._buffer) - 1) if self._started else 0):
            lines.append(buffer[start:match.start()])
            start = match.end()
        if start and buffer[start - 1:start] == b"\r" and start == len(buffer):
            self._skip_lf = True
        self._buffer = buffer[start:]
        if len(self._buffer) > self._limit:
            raise _EventTooLong(_too_long(self._limit))
        return lines


def _too_long(limit: int) -> str:
    size = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"
    return (f"the server sent an event longer than {size} (the answer so far is kept); "
            "check that --api points at an OpenAI-compatible server")


class RemoteStream(WorkerStream[AnswerResult]):
    """Text deltas of one served answer (the :class:`~bluelm_cli.core.backend.AnswerStream` protocol)."""

    def __init__(self, client: HttpClient, body: dict[str, Any], *, prompt_tokens: int, context_limit: int,
                 on_refused: Callable[[str, dict[str, Any], RemoteError], tuple[str, dict[str, Any]] | None] | None = None,
                 path: str | None = None) -> None:
        self._client = client
        self._body = body
        self._path = path or f"{client.url.api_path}/chat/completions"
        self._prompt_tokens = prompt_tokens
        self._context_limit = context_limit
        self._on_refused = on_refused  # a refused request, asked again another way (see RemoteBackend._adapt)
        max_tokens = body.get("max_tokens")
        self._token_limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
        self._stop = threading.Event()
        self._exchange: Exchange | None = None
        self._exchange_lock = threading.Lock()
        self._emitted = 0  # characters of the answer handed to the consumer
        self._holdback = (HUMAN_TAG, *client.secrets)
        self._start(lambda emit: self._answer(), "bluelm-remote")

    def stop(self) -> None:
        """Close the HTTP stream; the answer so far is kept (finish "interrupted")."""
        self._stop.set()
        with self._exchange_lock:
            if self._exchange is not None:
                self._exchange.shutdown()

    # ------------------------------------------------------------------------------- the worker side
    def _answer(self) -> AnswerResult:
        progress = _Progress()
        started = time.perf_counter()
        path, body = self._path, self._body
        for attempt in range(_MAX_ATTEMPTS):
            try:
                self._request(path, body, progress)
                break
            except RemoteError as error:
                retry = None
                if self._on_refused and not progress.text and attempt + 1 < _MAX_ATTEMPTS:
                    retry = self._on_refused(path, body, error)
                if retry is None:
                    return self._failed(progress, error, started)
                path, body = retry
            except (OSError, http.client.HTTPException) as error:
                if self._stop.is_set():
                    break
                if progress.finish is not None:
                    break  # the answer was complete; only the usage or [DONE] was missing
                if not progress.text and not progress.chunks:
                    raise self._client.connection_error(error, READ_TIMEOUT_S) from None
                return self._failed(progress, RemoteError(
                    f"the server closed the connection mid-answer ({type(error).__name__}); "
                    "the answer so far is kept, /retry asks again"), started)
        if self._stop.is_set() and not progress.done and progress.finish is None:
            reason = FinishReason.INTERRUPTED
        elif progress.finish is None and not progress.done:
            return self._failed(progress, RemoteError(
                "the server ended the answer without saying why (the stream stopped before its end); "
                "the answer so far is kept, /retry asks again"), started)
        else:
            reason = _FINISH.get(progress.finish or "", FinishReason.STOP)
        return self._result(progress, reason, started)

    def _failed(self, progress: _Progress, error: RemoteError, started: float) -> AnswerResult:
        if self._stop.is_set() and not isinstance(error, _EventTooLong):
            return self._result(progress, FinishReason.INTERRUPTED, started)
        if not progress.text:
            raise error
        return self._result(progress, FinishReason.ERROR, started, error=str(error))

    def _request(self, path: str, body: dict[str, Any], progress: _Progress) -> None:
        client = self._client
        # Until an event stream begins (the headers, an error body, a whole JSON answer) a total deadline (a busy
        # server may queue the request for long); then the stream's own limits.
        exchange = client.exchange("POST", path, body, streaming=True, read_timeout=READ_TIMEOUT_S,
                                   deadline_s=READ_TIMEOUT_S)
        with self._exchange_lock:
            self._exchange = exchange
        try:
            if self._stop.is_set():
                return
            try:
                response = exchange.open()
                if response.status >= 400:
                    error_body = response.read(64 * 1024)
                    if exchange.expired:
                        raise exchange.deadline_error()
                    raise client.status_error(response.status, error_body, f"POST {path}")
                if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                    self._whole_answer(response, progress)
                    return
            except (OSError, http.client.HTTPException):
                if exchange.expired:
                    raise exchange.deadline_error() from None
                raise
            exchange.settle()
            self._read_events(response, exchange, progress)
        finally:
            with self._exchange_lock:
                self._exchange = None
            exchange.close()

    def _read_events(self, response: http.client.HTTPResponse, exchange: Exchange, progress: _Progress) -> None:
        lines = _SSELines(MAX_EVENT_BYTES)
        data: list[str] = []
        size = 0
        chunks, moved_at = progress.chunks, time.monotonic()
        while not self._stop.is_set():
            if progress.chunks != chunks or progress.finish is not None:
                chunks, moved_at = progress.chunks, time.monotonic()
            elif time.monotonic() - moved_at > IDLE_LIMIT_S:
                raise RemoteError(f"the server at {self._client.url.api} sent no answer for {IDLE_LIMIT_S:g} s "
                                  "(only keep-alives); check the server or try again")
            try:
                raw = response.read1(_READ_SIZE)
            except TimeoutError:
                if progress.finish is not None:
                    return  # the answer ended at its finish_reason; the server said nothing more
                raise
            if not raw:
                if data:
                    self._event("\n".join(data), progress)
                return
            for line_bytes in lines.feed(raw):
                line = line_bytes.decode("utf-8", "replace")
                if not line:
                    if data:
                        self._event("\n".join(data), progress)
                        data, size = [], 0
                        if progress.done or self._stop.is_set() or (progress.finish is not None and progress.usage is not None):
                            return
                    if progress.finish is not None and exchange.sock is not None:
                        exchange.sock.settimeout(AFTER_FINISH_S)
                    continue
                if line.startswith(":"):
                    if progress.finish is not None:
                        return  # a keep-alive after the finish_reason: the turn has ended
                    continue  # an SSE comment (keep-alive)
                name, _, value = line.partition(":")
                if name == "data":
                    data.append(value.removeprefix(" "))
                    size += len(value)
                    if size > MAX_EVENT_BYTES:
                        raise _EventTooLong(_too_long(MAX_EVENT_BYTES))
                elif name not in ("event", "id", "retry"):
                    raise MalformedStream(f"the server sent a malformed event stream (a line '{self._clip(line)}'); "
                                          "check that --api points at an OpenAI-compatible server")

    def _event(self, data: str, progress: _Progress) -> None:
        if data.strip() == "[DONE]":
            progress.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise MalformedStream(f"the server sent a malformed event stream (not JSON: '{self._clip(data)}'); "
                                  "check that --api points at an OpenAI-compatible server") from None
        if not isinstance(chunk, dict):
            raise MalformedStream(f"the server sent a malformed event ('{self._clip(data)}')")
        if "error" in chunk:
            detail = error_detail(json.dumps(chunk).encode(), self._client.server_text)
            raise RemoteError(f"the server reported an error mid-answer: {detail}")
        if isinstance(chunk.get("usage"), dict):
            progress.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise MalformedStream(f"the server sent a malformed event ('{self._clip(data)}')")
        for choice in choices[:1]:
            delta = choice.get("delta") or {} if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                raise MalformedStream(f"the server sent a malformed event ('{self._clip(data)}')")
            # A chat chunk's delta, or a text completion's `text` (/continue asks /v1/completions).
            content = _text_of(delta.get("content")) if "delta" in choice or "text" not in choice else _text_of(choice["text"])
            if content:
                self._add_text(content, progress)
            if choice.get("finish_reason") and progress.finish is None:
                progress.finish = str(choice["finish_reason"])

    def _whole_answer(self, response: http.client.HTTPResponse, progress: _Progress) -> None:
        """A server that ignored `stream: true` and answered with one JSON completion."""
        data = b""
        while len(data) <= MAX_JSON_BYTES:
            piece = response.read1(_READ_SIZE)
            if not piece:
                break
            data += piece
        else:
            raise MalformedStream(_too_long(MAX_JSON_BYTES))
        try:
            answer = json.loads(data)
            choice = answer["choices"][0]
            content = _text_of(choice["message"].get("content"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise MalformedStream("the server's answer is neither an event stream nor a chat completion; "
                                  "check that --api points at an OpenAI-compatible server") from None
        if isinstance(answer.get("usage"), dict):
            progress.usage = answer["usage"]
        finish = choice.get("finish_reason") or "stop"
        self._add_text(content, progress)
        if progress.finish is None:
            progress.finish = str(finish)

    def _add_text(self, content: str, progress: _Progress) -> None:
        if self._token_limit is not None and progress.chunks >= self._token_limit:
            self._cap(progress)  # more chunks than tokens asked for: the server ignores max_tokens
            return
        now = time.perf_counter()
        if not progress.first_at:
            progress.first_at = now
        progress.last_at = now
        progress.chunks += 1
        progress.text += content
        if self._client.secrets:  # a server echoing the key: redacted before it is shown or journaled
            progress.text = progress.text[: self._emitted] + self._client.redact(progress.text[self._emitted:])
        if self._token_limit is not None and len(progress.text) > self._token_limit * MAX_CHARS_PER_TOKEN:
            progress.text = progress.text[: self._token_limit * MAX_CHARS_PER_TOKEN]
            self._cap(progress)
        cut = progress.text.find(HUMAN_TAG)
        if cut >= 0:
            # The model began the next user turn: the local engine stops there, so do we, and close the stream.
            progress.text = progress.text[:cut]
            progress.finish = "stop"
            self._stop.set()
        # Hold back an end that may be the start of the tag (or of a secret), until the next text decides.
        shown = len(progress.text) if cut >= 0 else _safe_end(progress.text, self._holdback)
        if shown > self._emitted:
            self._queue.put(("delta", progress.text[self._emitted:shown]))
            self._emitted = shown

    def _cap(self, progress: _Progress) -> None:
        """End the answer as cut at max_new_tokens, and close the stream."""
        progress.finish = "length"
        self._stop.set()

    def _clip(self, text: str, limit: int = 60) -> str:
        text = " ".join(self._client.server_text(text).split())
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def _result(self, progress: _Progress, reason: FinishReason, started: float, error: str | None = None) -> AnswerResult:
        if self._emitted < len(progress.text):
            self._queue.put(("delta", progress.text[self._emitted:]))  # a held-back end that was not the tag
            self._emitted = len(progress.text)
        usage = progress.usage or {}
        prompt_tokens = _int(usage.get("prompt_tokens")) or self._prompt_tokens
        # The server's count when it gave one for this whole answer; else one token per content chunk.
        new_tokens = _int(usage.get("completion_tokens")) or progress.chunks
        details = usage.get("prompt_tokens_details") or {}
        reused = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        span = progress.last_at - progress.first_at
        return AnswerResult(
            text=progress.text,
            answer_ids=[],  # a server does not say which ids it generated
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            reused_tokens=reused,
            new_tokens=new_tokens,
            ttft_s=progress.first_at - started if progress.first_at else 0.0,
            decode_tok_s=(new_tokens - 1) / span if new_tokens > 1 and span > 0 else 0.0,
            context_tokens=prompt_tokens + new_tokens + 1,
            context_limit=self._context_limit,
            error=error,
        )


def _safe_end(text: str, needles: tuple[str, ...] = (HUMAN_TAG,)) -> int:
    """How much of `text` can be shown: all but an end that could begin one of `needles` (the next turn's tag,
    a secret to redact)."""
    end = len(text)
    for needle in needles:
        for length in range(min(len(needle) - 1, len(text)), 0, -1):
            if needle.startswith(text[-length:]):
                end = min(end, len(text) - length)
                break
    return end


def _text_of(content: object) -> str:
    """A message's or delta's content: a string, or a list of parts whose text parts are joined (as OpenAI's
    API allows and openai-python reads); anything else is no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str))
    return ""


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


