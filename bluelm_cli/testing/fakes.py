"""A scripted fake backend, like llm's mock model: queue answers, record what was asked.

It speaks the real :class:`~bluelm_cli.core.backend.Backend` protocol, with a character-level encoder
(one id per character; the chat tags are single ids, as in BlueLM's vocabulary), and reports fixed
timings, so the REPL and the chat service can be tested with exact transcripts and no model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from bluelm_cli.core.backend import AnswerResult, BackendInfo
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import AI_TAG, HUMAN_TAG, PromptPlan
from bluelm_cli.core.settings import SamplingSettings

BOS, EOS, HUMAN, AI = 1, 2, 4, 5
_TAGS = {HUMAN_TAG: HUMAN, AI_TAG: AI}
_CHAR_BASE = 100


class CharEncoder:
    """One id per character (100 + code point); `[|Human|]:` and `[|AI|]:` are one id each."""

    bos_id = BOS
    eos_id = EOS
    vocab_size = _CHAR_BASE + 0x110000

    def encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        index = 0
        while index < len(text):
            for tag, tag_id in _TAGS.items():
                if text.startswith(tag, index):
                    ids.append(tag_id)
                    index += len(tag)
                    break
            else:
                ids.append(_CHAR_BASE + ord(text[index]))
                index += 1
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        reverse = {v: k for k, v in _TAGS.items()}
        return "".join(reverse.get(i, chr(i - _CHAR_BASE) if i >= _CHAR_BASE else "") for i in ids)


@dataclass
class Scripted:
    """One queued answer: its text, streamed in `chunk`-character deltas; `stop_after` deltas
    it behaves as if interrupted (stop() called by the user at that point)."""

    text: str
    chunk: int = 4
    stop_after: int | None = None


class FakeStream:
    def __init__(self, script: Scripted, plan: PromptPlan, settings: SamplingSettings, backend: FakeBackend) -> None:
        self._script = script
        self._plan = plan
        self._settings = settings
        self._backend = backend
        self._stop = threading.Event()
        self._sent = 0
        self._deltas = 0
        self.result: AnswerResult | None = None

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> str:
        text, limit = self._script.text, self._settings.max_new_tokens
        end = min(len(text), limit)
        if self._script.stop_after is not None and self._deltas >= self._script.stop_after:
            self._stop.set()
        if self.result is None and (self._stop.is_set() or self._sent >= end):
            if self._stop.is_set() and self._sent < end:
                reason = FinishReason.INTERRUPTED
            elif end < len(text):
                reason = FinishReason.LENGTH
            else:
                reason = FinishReason.STOP
            self._finish(text[: self._sent], reason)
        if self.result is not None:
            raise StopIteration
        delta = text[self._sent : min(end, self._sent + self._script.chunk)]
        self._sent += len(delta)
        self._deltas += 1
        return delta

    def _finish(self, text: str, reason: FinishReason) -> None:
        ids = self._backend.encoder.encode_plain(text)
        prompt = len(self._plan.ids)
        self.result = AnswerResult(
            text=text,
            answer_ids=ids,
            finish_reason=reason,
            prompt_tokens=prompt,
            reused_tokens=0,
            new_tokens=len(ids),
            context_tokens=prompt + len(ids) + 1,
            context_limit=self._backend.context_limit,
            ttft_s=0.05,
            decode_tok_s=100.0,
        )

    def stop(self) -> None:
        self._stop.set()

    def finish(self) -> AnswerResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


@dataclass
class FakeBackend:
    """Answers from a queue (strings or :class:`Scripted`); records every plan and setting it got."""

    answers: list[str | Scripted] = field(default_factory=list)
    context_limit: int = 2048
    encoder: CharEncoder = field(default_factory=CharEncoder)
    plans: list[PromptPlan] = field(default_factory=list)
    settings: list[SamplingSettings] = field(default_factory=list)

    def queue(self, *answers: str | Scripted) -> FakeBackend:
        self.answers.extend(answers)
        return self

    def info(self) -> BackendInfo:
        return BackendInfo(model_id="fake/BlueLM", device="cpu", dtype="float32", context_limit=self.context_limit)

    def stream(self, plan: PromptPlan, settings: SamplingSettings) -> FakeStream:
        if not self.answers:
            raise AssertionError("the fake backend was asked for more answers than were queued")
        self.plans.append(plan)
        self.settings.append(settings)
        answer = self.answers.pop(0)
        script = answer if isinstance(answer, Scripted) else Scripted(answer)
        return FakeStream(script, plan, settings, self)

    def prompt_text(self, index: int = -1) -> str:
        """The prompt of the `index`-th answer, as text (ids decoded; <s> and </s> spelled out)."""
        ids = self.plans[index].ids
        return "".join("<s>" if i == BOS else "</s>" if i == EOS else self.encoder.decode([i]) for i in ids)
