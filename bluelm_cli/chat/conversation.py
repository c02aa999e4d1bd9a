"""A conversation's state and the one state machine that changes it. No files, no terminal, no tensors.

Every change is a *record* (a dict, as the journal stores it) applied by :meth:`Conversation.apply`,
live and on replay alike, so a resumed session is exactly the session that was left::

    {"type": "message", "user": ..., "created_at": ...}   a message sent, not answered yet (pending)
    {"type": "turn", "user": ..., "answer": ..., "answer_ids": [...], "finish_reason": ..., "created_at": ...}
    {"type": "reset"}                       new conversation, settings kept
    {"type": "undo"}                        last turn removed
    {"type": "set", "key": ..., "value": ...}
    {"type": "drop", "count": N}            N more old turns no longer sent to the model
    {"type": "load", "system": ..., "sampling": {...}, "turns": [...], "context_start": N, "source_model_id": ...}
    {"type": "start", ...} / {"type": "resume", "at": ...}   no state change
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bluelm_cli.core.errors import UsageError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.settings import GENERATION_KEYS, SAMPLING_KEYS, SamplingSettings, parse_setting


def utc_now() -> str:
    """ISO 8601 UTC timestamp, seconds precision: ``2026-11-25T14:05:01+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class BadRecord(Exception):
    """A record or file that does not have the expected shape."""


@dataclass
class Turn:
    user: str
    answer: str
    answer_ids: list[int] = field(default_factory=list)  # as generated, without the closing </s>
    finish_reason: FinishReason = FinishReason.STOP
    created_at: str = field(default_factory=utc_now)  # ISO 8601 UTC

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "answer": self.answer,
            "answer_ids": list(self.answer_ids),
            "finish_reason": FinishReason(self.finish_reason).value,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> Turn:
        if not isinstance(data, Mapping):
            raise BadRecord("a turn is not an object")
        user, answer = data.get("user"), data.get("answer")
        if not isinstance(user, str) or not isinstance(answer, str):
            raise BadRecord("a turn lacks its user or answer text")
        ids = data.get("answer_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRecord("a turn's answer_ids is not a list of integers")
        reason = FinishReason.parse(data.get("finish_reason", "stop"))
        if reason is None:
            raise BadRecord(f"a turn has an unknown finish_reason {data.get('finish_reason')!r}")
        created = data.get("created_at", "")
        if not isinstance(created, str):
            raise BadRecord("a turn's created_at is not a string")
        return cls(user=user, answer=answer, answer_ids=list(ids), finish_reason=reason, created_at=created)


def sampling_dict(sampling: SamplingSettings | Mapping[str, Any] | None) -> dict[str, Any]:
    if sampling is None:
        return SamplingSettings().as_dict()
    if isinstance(sampling, SamplingSettings):
        return sampling.as_dict()
    return SamplingSettings.from_mapping(sampling).as_dict()


def checked_sampling(data: object) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise BadRecord("sampling is not an object")
    unknown = [key for key in data if key not in GENERATION_KEYS]
    if unknown:
        raise BadRecord(f"unknown sampling setting {unknown[0]!r}")
    try:
        return SamplingSettings.from_mapping(data).as_dict()
    except UsageError as exc:
        raise BadRecord(str(exc)) from None


def checked_system(data: object) -> str | None:
    if data is not None and not isinstance(data, str):
        raise BadRecord("system is not a string")
    return data or None


def checked_turns(data: object) -> list[Turn]:
    if not isinstance(data, list):
        raise BadRecord("turns is not a list")
    return [Turn.from_dict(item) for item in data]


def checked_context_start(data: object, turns: list[Turn]) -> int:
    if data is None:
        return 0
    if not isinstance(data, int) or isinstance(data, bool) or data < 0:
        raise BadRecord("context_start is not a whole number")
    return min(data, len(turns))


@dataclass
class Conversation:
    name: str
    model_id: str
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=lambda: SamplingSettings().as_dict())
    turns: list[Turn] = field(default_factory=list)
    context_start: int = 0  # first turn still sent to the model; older ones stay in the history
    # The last message sent that no turn answers yet: journaled before the model is asked, so a failure
    # before the answer (a server's 500, a crash, a refusal) never loses it; /retry sends it again.
    pending: str | None = None

    def active_turns(self) -> list[Turn]:
        return self.turns[self.context_start :]

    def sampling_settings(self) -> SamplingSettings:
        return SamplingSettings.from_mapping(self.sampling)

    def apply(self, record: Mapping[str, Any]) -> None:
        """The one place that changes state; used live and by replay. Raises BadRecord for a malformed record."""
        kind = record.get("type")
        if kind == "message":
            user = record.get("user")
            if not isinstance(user, str):
                raise BadRecord("a message lacks its text")
            self.pending = user
        elif kind == "turn":
            self.turns.append(Turn.from_dict(record))
            self.pending = None
        elif kind == "reset":
            self.turns = []
            self.context_start = 0
            self.pending = None
        elif kind == "undo":
            if self.turns:
                self.turns.pop()
            self.context_start = min(self.context_start, len(self.turns))
        elif kind == "set":
            key = record.get("key")
            if key not in SAMPLING_KEYS:
                raise BadRecord(f"unknown setting {key!r}")
            try:
                value = parse_setting(key, record.get("value"))
            except UsageError as exc:
                raise BadRecord(str(exc)) from None
            if key == "system":
                self.system = value
            else:
                self.sampling = {**self.sampling, key: value}
        elif kind == "drop":
            count = record.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise BadRecord("drop count is not a whole number")
            self.context_start = min(self.context_start + count, len(self.turns))
        elif kind == "load":
            turns = checked_turns(record.get("turns"))
            system = checked_system(record.get("system"))
            sampling = checked_sampling(record.get("sampling", {}))
            self.context_start = checked_context_start(record.get("context_start"), turns)
            self.turns, self.system, self.sampling = turns, system, sampling
            self.pending = None
        elif kind in ("resume", "start"):
            pass
        else:
            raise BadRecord(f"unknown record type {kind!r}")
