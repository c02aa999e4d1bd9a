"""A conversation in BlueLM's chat format, as text (for reading and golden tests) and as token ids.

`<s>[|Human|]:{user 1}[|AI|]:{answer 1}</s>[|Human|]:{user 2}[|AI|]:` — the publisher's format. BlueLM
has no system role: a system prompt is plain text placed before the first `[|Human|]:`. Answers enter
the ids exactly as they were generated (never re-tokenized from text), each closed by `</s>`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bluelm_cli.tokenizer import AI_TAG, HUMAN_TAG

BOS_TEXT = "<s>"
EOS_TEXT = "</s>"


@dataclass(frozen=True)
class HistoryTurn:
    """One finished exchange as the prompt needs it: the user's text and the answer's generated ids."""

    user: str
    answer_ids: Sequence[int]
    # Only used when `answer_ids` is empty (a conversation saved without ids): then the text is encoded.
    answer: str = ""


@dataclass(frozen=True)
class PromptIds:
    ids: list[int]
    # Where each history turn's tokens begin in `ids`; `message_start` is where the new message begins.
    turn_starts: list[int]
    message_start: int


def prompt_text(system: str | None, history: Sequence[tuple[str, str]], message: str) -> str:
    """The prompt as text, for display and golden tests: the string the publisher's demos build."""
    parts = [BOS_TEXT, system or ""]
    for user, answer in history:
        parts.append(f"{HUMAN_TAG}{user}{AI_TAG}{answer}{EOS_TEXT}")
    parts.append(f"{HUMAN_TAG}{message}{AI_TAG}")
    return "".join(parts)


def user_segment(user: str, system: str | None = None) -> str:
    """The text of one user turn up to where the model answers; the first kept turn carries the system prompt."""
    return f"{system or ''}{HUMAN_TAG}{user}{AI_TAG}"


def build_prompt_ids(
    encode: Callable[[str], list[int]],
    *,
    bos_id: int,
    eos_id: int,
    system: str | None,
    history: Sequence[HistoryTurn],
    message: str,
) -> PromptIds:
    """Ids of `<s>{system}[|Human|]:u1[|AI|]:` + answer ids + `</s>` … + `[|Human|]:{message}[|AI|]:`.

    Each user segment is encoded on its own, as the publisher's tokenizer does between special tokens.
    """
    ids = [bos_id]
    turn_starts: list[int] = []
    for index, turn in enumerate(history):
        turn_starts.append(len(ids))
        ids += encode(user_segment(turn.user, system if index == 0 else None))
        ids += list(turn.answer_ids) if turn.answer_ids or not turn.answer else encode(turn.answer)
        ids.append(eos_id)
    message_start = len(ids)
    ids += encode(user_segment(message, system if not history else None))
    return PromptIds(ids=ids, turn_starts=turn_starts, message_start=message_start)
