"""One streamed answer from `/v1/chat/completions`: SSE events in, text deltas out, timed at the client.

The request runs in a worker thread; `stop()` (any thread, or a signal handler) shuts the socket down,
which closes the HTTP stream, and the answer so far is kept as "interrupted". A failure before any text
is raised to the caller (nothing is recorded); a failure after some text — the server dying, a
malformed event, an error event — ends the answer with finish "error", the text so far kept, and the
reason in `result.error`.

Streams end with `data: [DONE]` (vLLM, SGLang, llama.cpp, ollama, TGI) or without it (`transformers
serve`): the end of the body after a chunk with a finish_reason is a normal end; the end of the body
before one is the server dying.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import HUMAN_TAG
from bluelm_cli.core.worker_stream import WorkerStream
from bluelm_cli.remote.http import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, HttpClient, RemoteError, error_detail

_FINISH = {"length": FinishReason.LENGTH, "abort": FinishReason.ERROR, "error": FinishReason.ERROR}


class MalformedStream(RemoteError):
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


class RemoteStream(WorkerStream[AnswerResult]):
    """Text deltas of one served answer (the :class:`~bluelm_cli.core.backend.AnswerStream` protocol)."""

    def __init__(self, client: HttpClient, body: dict[str, Any], *, prompt_tokens: int, context_limit: int,
                 on_rejected_fields: Callable[[dict[str, Any], RemoteError], dict[str, Any] | None] | None = None) -> None:
        self._client = client
        self._body = body
        self._prompt_tokens = prompt_tokens
        self._context_limit = context_limit
        self._retry_body = on_rejected_fields
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._socket_lock = threading.Lock()
        self._emitted = 0  # characters of the answer handed to the consumer
        self._start(lambda emit: self._answer(), "bluelm-remote")

    def stop(self) -> None:
        """Close the HTTP stream; the answer so far is kept (finish "interrupted")."""
        self._stop.set()
        with self._socket_lock:
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ------------------------------------------------------------------------------- the worker side
    def _answer(self) -> AnswerResult:
        progress = _Progress()
        started = time.perf_counter()
        body = self._body
        while True:
            try:
                self._request(body, progress)
                break
            except RemoteError as error:
                retry = self._retry_body(body, error) if self._retry_body and not progress.text else None
                if retry is None:
                    return self._failed(progress, error, started)
                body = retry
            except (OSError, http.client.HTTPException) as error:
                if self._stop.is_set():
                    break
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
        if self._stop.is_set():
            return self._result(progress, FinishReason.INTERRUPTED, started)
        if not progress.text:
            raise error
        return self._result(progress, FinishReason.ERROR, started, error=str(error))

    def _request(self, body: dict[str, Any], progress: _Progress) -> None:
        client = self._client
        conn = client.connection(CONNECT_TIMEOUT_S)
        try:
            try:
                conn.connect()
            except OSError as error:
                raise client.connection_error(error, CONNECT_TIMEOUT_S) from None
            assert conn.sock is not None
            conn.sock.settimeout(READ_TIMEOUT_S)
            with self._socket_lock:
                self._socket = conn.sock
            if self._stop.is_set():
                return
            path = f"{client.url.api_path}/chat/completions"
            conn.request("POST", path, body=json.dumps(body).encode(), headers=client.headers(streaming=True))
            response = conn.getresponse()
            if response.status >= 400:
                raise client.status_error(response.status, response.read(), f"POST {path}")
            if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                self._whole_answer(response, progress)
                return
            self._read_events(response, progress)
        finally:
            with self._socket_lock:
                self._socket = None
            conn.close()

    def _read_events(self, response: http.client.HTTPResponse, progress: _Progress) -> None:
        data: list[str] = []
        while not self._stop.is_set():
            raw = response.readline()
            if not raw:
                if data:
                    self._event("\n".join(data), progress)
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                if data:
                    self._event("\n".join(data), progress)
                    data = []
                    if progress.done or self._stop.is_set():
                        return
                continue
            if line.startswith(":"):
                continue  # an SSE comment (keep-alive)
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))
            elif name not in ("event", "id", "retry"):
                raise MalformedStream(f"the server sent a malformed event stream (a line '{_clip(line)}'); "
                                      "check that --api points at an OpenAI-compatible server")

    def _event(self, data: str, progress: _Progress) -> None:
        if data.strip() == "[DONE]":
            progress.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise MalformedStream(f"the server sent a malformed event stream (not JSON: '{_clip(data)}'); "
                                  "check that --api points at an OpenAI-compatible server") from None
        if not isinstance(chunk, dict):
            raise MalformedStream(f"the server sent a malformed event ('{_clip(data)}')")
        if "error" in chunk:
            detail = error_detail(json.dumps(chunk).encode())
            raise RemoteError(f"the server reported an error mid-answer: {detail}")
        if isinstance(chunk.get("usage"), dict):
            progress.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise MalformedStream(f"the server sent a malformed event ('{_clip(data)}')")
        for choice in choices[:1]:
            delta = choice.get("delta") or {} if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                raise MalformedStream(f"the server sent a malformed event ('{_clip(data)}')")
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._add_text(content, progress)
            if choice.get("finish_reason"):
                progress.finish = str(choice["finish_reason"])

    def _whole_answer(self, response: http.client.HTTPResponse, progress: _Progress) -> None:
        """A server that ignored `stream: true` and answered with one JSON completion."""
        try:
            answer = json.loads(response.read())
            choice = answer["choices"][0]
            content = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise MalformedStream("the server's answer is neither an event stream nor a chat completion; "
                                  "check that --api points at an OpenAI-compatible server") from None
        if isinstance(answer.get("usage"), dict):
            progress.usage = answer["usage"]
        self._add_text(str(content), progress)
        progress.finish = choice.get("finish_reason") or "stop"

    def _add_text(self, content: str, progress: _Progress) -> None:
        now = time.perf_counter()
        if not progress.first_at:
            progress.first_at = now
        progress.last_at = now
        progress.chunks += 1
        progress.text += content
        cut = progress.text.find(HUMAN_TAG)
        if cut >= 0:
            # The model began the next user turn: the local engine stops there, so do we, and close the stream.
            progress.text = progress.text[:cut]
            progress.finish = "stop"
            self._stop.set()
        # Hold back an end that may be the start of the tag, until the next text decides.
        shown = len(progress.text) if cut >= 0 else _safe_end(progress.text)
        if shown > self._emitted:
            self._queue.put(("delta", progress.text[self._emitted:shown]))
            self._emitted = shown

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


def _safe_end(text: str) -> int:
    """How much of `text` can be shown: all but an end that could begin `[|Human|]:`."""
    for length in range(min(len(HUMAN_TAG) - 1, len(text)), 0, -1):
        if HUMAN_TAG.startswith(text[-length:]):
            return len(text) - length
    return len(text)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
