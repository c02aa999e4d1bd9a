"""What the chat service needs of a model: prompt ids in, a stream of text deltas out.

The local engine (:mod:`bluelm_cli.local.engine`) is one implementation and tests script a fake one; the chat
service and the faces depend only on these protocols, never on torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import PromptEncoder, PromptPlan
from bluelm_cli.core.settings import SamplingSettings

__all__ = ["AnswerResult", "AnswerStream", "Backend", "BackendInfo", "ModelLoading"]


@dataclass(frozen=True)
class AnswerResult:
    """How one answer ended and what it cost: the one result type of every backend (the local engine, a
    served model, the test fake), the chat service, the journal's finish reason and the faces' stats."""

    text: str
    answer_ids: list[int]  # as generated, without the closing </s>; empty from a server (it does not say)
    finish_reason: FinishReason
    prompt_tokens: int  # the prompt's length (a server's own count where it reports usage)
    reused_tokens: int  # prompt tokens served from the KV cache kept across turns
    new_tokens: int
    ttft_s: float  # from starting the answer to its first token
    decode_tok_s: float  # (new_tokens - 1) over the time from the first token to the last; 0.0 when unknown
    context_tokens: int  # positions in use once the answer is closed with </s>
    context_limit: int
    error: str | None = None  # why the answer ended early, with finish "error"
    forwards: int = 0  # model calls this answer took (prefill and decode steps); 0 when unknown (a server)
    shifted_tokens: int = 0  # of reused_tokens, those moved to new positions by a context shift

    @property
    def forwards_per_token(self) -> float:
        """Model calls per generated token (1.0 plain decoding; below 1 when speculative drafts are accepted)."""
        return self.forwards / self.new_tokens if self.new_tokens and self.forwards else 0.0

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens that had to be computed (not reused from the cache)."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tok_s(self) -> float | None:
        """Prompt tokens computed per second until the first token (the prefill, and the first token's own
        step); None when there is no such figure (nothing computed, no first token, no time measured)."""
        if self.prefill_tokens < 1 or self.new_tokens < 1 or self.ttft_s <= 0:
            return None
        return self.prefill_tokens / self.ttft_s

    @property
    def decode_speed(self) -> float | None:
        """Decode tokens/s, or None where it means nothing: fewer than 2 tokens (a rate needs an interval
        between tokens; an early Ctrl-C leaves one) or no measured time."""
        if self.new_tokens < 2 or self.decode_tok_s <= 0:
            return None
        return self.decode_tok_s


class AnswerStream(Protocol):
    """Text deltas of one answer; `stop()` from any thread ends it within a step; `result` once ended."""

    result: AnswerResult | None

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    def stop(self) -> None: ...

    def finish(self) -> AnswerResult: ...


@dataclass(frozen=True)
class BackendInfo:
    """What the faces show about the model: the banner, /show."""

    model_id: str
    device: str
    dtype: str
    context_limit: int
    quantization: str | None = None
    # For /show info; None where a backend can't tell.
    architecture: str | None = None  # e.g. "BlueLMForCausalLM, 32 layers, hidden size 4096, 32 attention heads"
    parameters: int | None = None
    origin: str | None = None  # where the weights were read from (a folder, a server)


class Backend(Protocol):
    """A model that answers prompt ids: the local engine, or a fake one in tests."""

    encoder: PromptEncoder
    context_limit: int

    def stream(self, plan: PromptPlan, settings: SamplingSettings) -> AnswerStream: ...

    def info(self) -> BackendInfo: ...


class ModelLoading(BlueLMError):
    """The backend's model is still loading (in the background): what needs it must wait or say so."""

    def __init__(self, message: str = "the model is still loading") -> None:
        super().__init__(message)
