"""What the chat service needs of a model: prompt ids in, a stream of text deltas out.

The local engine (:mod:`bluelm_cli.engine`) is one implementation and tests script a fake one; the chat
service and the faces depend only on these protocols, never on torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from bluelm_cli.errors import BlueLMError
from bluelm_cli.finish import FinishReason
from bluelm_cli.prompt import PromptEncoder, PromptPlan
from bluelm_cli.settings import SamplingSettings

__all__ = ["AnswerResult", "AnswerStream", "Backend", "BackendInfo", "ModelLoading"]


class AnswerResult(Protocol):
    """What a backend reports once an answer has ended (the engine's GenerationResult has these)."""

    text: str
    answer_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tok_s: float
    context_tokens: int
    context_limit: int


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
