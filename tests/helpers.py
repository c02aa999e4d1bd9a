"""Driving the engine the way the chat service does, for tests that talk to the engine directly."""

from __future__ import annotations

from collections.abc import Sequence

from bluelm_cli.local.engine import ChatEngine, GenerationStream
from bluelm_cli.core.prompt import HistoryTurn, PromptPlan, fit_prompt
from bluelm_cli.core.settings import SamplingSettings


def plan(engine: ChatEngine, system: str | None, history: Sequence[HistoryTurn], message: str,
         max_new_tokens: int) -> PromptPlan:
    """The conversation fitted into the engine's context, as the chat service fits it."""
    return fit_prompt(engine.encoder, system, history, message, context_limit=engine.context_limit,
                      max_new_tokens=max_new_tokens)


def start(engine: ChatEngine, system: str | None, history: Sequence[HistoryTurn], message: str,
          settings: SamplingSettings, **kwargs: int) -> GenerationStream:
    """Start answering `message` after `history` (what `Chat.send` does, without a session)."""
    return engine.stream(plan(engine, system, history, message, settings.max_new_tokens), settings, **kwargs)
