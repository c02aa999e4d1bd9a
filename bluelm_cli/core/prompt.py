"""A conversation in BlueLM's chat format, as text and as token ids, and fitting it into the context.

`<s>[|Human|]:{user 1}[|AI|]:{answer 1}</s>[|Human|]:{user 2}[|AI|]:` — the publisher's format. BlueLM
has no system role: a system prompt is plain text placed before the first `[|Human|]:`. Answers enter
the ids exactly as they were generated (never re-tokenized from text), each closed by `</s>`.

Pure: no transformers, no torch. The tokenizer comes in as a :class:`PromptEncoder`, so the format and
the context policy are golden-tested on their own and shared by the engine, the chat and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bluelm_cli.core.errors import BlueLMError

HUMAN_TAG = "[|Human|]:"
AI_TAG = "[|AI|]:"
BOS_TEXT = "<s>"
EOS_TEXT = "</s>"


class PromptEncoder(Protocol):
    """What prompt building needs of a tokenizer."""

    bos_id: int
    eos_id: int
    vocab_size: int  # ids the model can read: 0 <= id < vocab_size

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with no BOS, special-token text treated as plain characters."""
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (special tokens skipped)."""
        ...


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


@dataclass(frozen=True)
class PromptPlan:
    """The ids to run for one answer, how the conversation was fitted into the context, and the
    conversation as text (what a served model, which tokenizes for itself, is sent)."""

    ids: list[int]
    dropped_turns: int = 0  # oldest history turns left out so that prompt + max_new_tokens fit
    # The message was cut to its last tokens to fit (`bluelm ask --truncate`): its length before and after.
    truncated_from: int | None = None
    truncated_to: int | None = None
    system: str | None = None
    history: tuple[HistoryTurn, ...] = ()  # the turns kept in the prompt
    message: str = ""  # as sent (after --truncate, the kept end of it)
    # /continue: the answer the model goes on from; `ids` end with its ids, left open (no </s>).
    partial_answer: str = ""


class ContextOverflowError(BlueLMError):
    """The new message alone does not fit the context window."""

    def __init__(self, message_tokens: int, fits: int) -> None:
        self.message_tokens = message_tokens
        self.fits = fits
        super().__init__(
            f"the message is {message_tokens:,} tokens but at most {fits:,} fit in the context window "
            "(with room for the answer); shorten it or lower max_new_tokens"
        )


class SystemPromptTooLongError(ContextOverflowError):
    """The system prompt leaves no room for even the shortest message and the answer budget."""

    def __init__(self, system_tokens: int, context_limit: int, max_new_tokens: int, room: int,
                 remedy: str = "shorten it or lower max_new_tokens (/set system none clears it)") -> None:
        self.message_tokens, self.fits = 0, 0
        self.system_tokens, self.room = system_tokens, room
        BlueLMError.__init__(
            self,
            f"the system prompt is {system_tokens:,} tokens but at most {room:,} fit in the {context_limit:,}-token"
            f" context window (with the shortest message and a {max_new_tokens:,}-token answer); {remedy}",
        )


def check_system_prompt_fits(
    encoder: PromptEncoder, system: str | None, *, context_limit: int, max_new_tokens: int, remedy: str | None = None
) -> None:
    """SystemPromptTooLongError unless `system`, a one-token message and `max_new_tokens` fit the context."""
    if not system:
        return
    budget = context_limit - max_new_tokens
    needed = len(build_prompt_ids(encoder, system, [], "").ids) + 1  # the shortest message is one token
    if needed <= budget:
        return
    system_tokens = len(encoder.encode_plain(system))
    room = max(0, budget - (needed - system_tokens))
    if remedy is None:
        raise SystemPromptTooLongError(system_tokens, context_limit, max_new_tokens, room)
    raise SystemPromptTooLongError(system_tokens, context_limit, max_new_tokens, room, remedy)


# When the window is full, the oldest turns holding at least this share of the history's tokens go in one block
# (llama.cpp's context shift discards half of what is past its kept prefix). Dropping only as much as the next
# answer needs would change the prompt's start on every later turn, and each turn would re-prefill the whole
# window; after a block drop the following turns extend the kept prompt and reuse its cache again.
DROP_BLOCK_FRACTION = 0.5


def _block_drop(turn_starts: Sequence[int], history_end: int, fewest: int, fraction: float) -> int:
    """The number of oldest turns to drop: at least `fewest`, and enough that they hold `fraction` of the
    history's tokens (`turn_starts` and `history_end` bound each turn's tokens in the full prompt)."""
    if not turn_starts or fraction <= 0:
        return fewest
    first = turn_starts[0]
    wanted = (history_end - first) * fraction
    for dropped in range(max(fewest, 1), len(turn_starts) + 1):
        end = turn_starts[dropped] if dropped < len(turn_starts) else history_end
        if end - first >= wanted:
            return dropped
    return len(turn_starts)


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
    encoder: PromptEncoder, system: str | None, history: Sequence[HistoryTurn], message: str
) -> PromptIds:
    """Ids of `<s>{system}[|Human|]:u1[|AI|]:` + answer ids + `</s>` … + `[|Human|]:{message}[|AI|]:`.

    Each user segment is encoded on its own, as the publisher's tokenizer does between special tokens.
    """
    encode = encoder.encode_plain
    ids = [encoder.bos_id]
    turn_starts: list[int] = []
    for index, turn in enumerate(history):
        turn_starts.append(len(ids))
        ids += encode(user_segment(turn.user, system if index == 0 else None))
        ids += list(turn.answer_ids) if turn.answer_ids or not turn.answer else encode(turn.answer)
        ids.append(encoder.eos_id)
    message_start = len(ids)
    ids += encode(user_segment(message, system if not history else None))
    return PromptIds(ids=ids, turn_starts=turn_starts, message_start=message_start)


def history_tokens(encoder: PromptEncoder, system: str | None, history: Sequence[HistoryTurn]) -> int:
    """Context positions a conversation occupies before the next message (the UI's "context used")."""
    return build_prompt_ids(encoder, system, history, "").message_start


def fit_prompt(
    encoder: PromptEncoder,
    system: str | None,
    history: Sequence[HistoryTurn],
    message: str,
    *,
    context_limit: int,
    max_new_tokens: int,
    truncate: bool = False,
    drop_fraction: float = DROP_BLOCK_FRACTION,
) -> PromptPlan:
    """The prompt ids, dropping the oldest whole turns until prompt + max_new_tokens fit the context.

    When turns must go, they go in a block holding at least `drop_fraction` of the history's tokens (see
    DROP_BLOCK_FRACTION; 0 drops only as many as needed), so that the next turns reuse the cache again.

    A message that can't fit even alone raises ContextOverflowError, or with `truncate` keeps only its
    last tokens (cut as ids: re-encoding decoded text could shift a token at the cut).
    """
    budget = context_limit - max_new_tokens
    check_system_prompt_fits(encoder, system, context_limit=context_limit, max_new_tokens=max_new_tokens)
    alone = build_prompt_ids(encoder, system, [], message)
    if len(alone.ids) > budget:
        message_ids = encoder.encode_plain(message)
        overhead = len(alone.ids) - len(message_ids)
        fits = max(0, budget - overhead)
        if not truncate or fits == 0:
            raise ContextOverflowError(len(message_ids), fits)
        head = [encoder.bos_id, *encoder.encode_plain(f"{system or ''}{HUMAN_TAG}")]
        tail = encoder.encode_plain(AI_TAG)
        keep = max(0, budget - len(head) - len(tail))
        if keep == 0:
            raise ContextOverflowError(len(message_ids), 0)
        kept_text = encoder.decode(message_ids[-keep:])
        return PromptPlan(head + message_ids[-keep:] + tail, len(history), len(message_ids), keep,
                          system, (), kept_text)
    full = build_prompt_ids(encoder, system, history, message)
    if len(full.ids) <= budget:
        return PromptPlan(full.ids, 0, system=system, history=tuple(history), message=message)
    system_tokens = len(encoder.encode_plain(system)) if system else 0
    # Turn lengths are known from the full encoding; only the first kept turn changes (it gains the system text).
    for dropped in range(1, len(history) + 1):
        kept_end = full.turn_starts[dropped] if dropped < len(history) else full.message_start
        if 1 + len(full.ids) - kept_end + system_tokens + 2 > budget:
            continue
        candidate = build_prompt_ids(encoder, system, history[dropped:], message)
        if len(candidate.ids) <= budget:
            block = _block_drop(full.turn_starts, full.message_start, dropped, drop_fraction)
            if block > dropped:
                # More turns out make a shorter prompt; checked all the same (the system text moves to the new first turn).
                wider = build_prompt_ids(encoder, system, history[block:], message)
                if len(wider.ids) <= budget:
                    dropped, candidate = block, wider
            return PromptPlan(candidate.ids, dropped, system=system, history=tuple(history[dropped:]), message=message)
    return PromptPlan(alone.ids, len(history), system=system, message=message)


def build_continuation_ids(
    encoder: PromptEncoder, system: str | None, history: Sequence[HistoryTurn], open_turn: HistoryTurn
) -> PromptIds:
    """The prompt of `open_turn` followed by its answer left open (no closing `</s>`), so that the model
    goes on from the answer's last token: `… [|Human|]:{user}[|AI|]:{answer ids}`."""
    base = build_prompt_ids(encoder, system, history, open_turn.user)
    answer = list(open_turn.answer_ids) if open_turn.answer_ids or not open_turn.answer else encoder.encode_plain(open_turn.answer)
    return PromptIds(ids=base.ids + answer, turn_starts=base.turn_starts, message_start=base.message_start)


def fit_continuation(
    encoder: PromptEncoder,
    system: str | None,
    history: Sequence[HistoryTurn],
    open_turn: HistoryTurn,
    *,
    context_limit: int,
    max_new_tokens: int,
    drop_fraction: float = DROP_BLOCK_FRACTION,
) -> PromptPlan:
    """Like :func:`fit_prompt` for going on with `open_turn`'s answer: the oldest whole turns are dropped (in a
    block, as there) until the prompt and `max_new_tokens` more fit; raises BlueLMError if the open exchange
    alone can't."""
    budget = context_limit - max_new_tokens
    full = build_continuation_ids(encoder, system, history, open_turn)
    system_tokens = len(encoder.encode_plain(system)) if system else 0
    for dropped in range(len(history) + 1):
        if dropped:
            kept_start = full.turn_starts[dropped] if dropped < len(history) else full.message_start
            if 1 + len(full.ids) - kept_start + system_tokens > budget:
                continue  # cannot fit even before the system text is re-encoded with the first kept turn
        ids = full.ids if not dropped else build_continuation_ids(encoder, system, history[dropped:], open_turn).ids
        if len(ids) <= budget and dropped:
            block = _block_drop(full.turn_starts, full.message_start, dropped, drop_fraction)
            wider = build_continuation_ids(encoder, system, history[block:], open_turn).ids if block > dropped else ids
            if len(wider) <= budget:
                dropped, ids = block, wider
        if len(ids) <= budget:
            return PromptPlan(ids, dropped, system=system, history=tuple(history[dropped:]),
                              message=open_turn.user, partial_answer=open_turn.answer)
    alone = len(build_continuation_ids(encoder, system, [], open_turn).ids)
    raise BlueLMError(
        f"the exchange to continue is already {alone:,} tokens and at most {budget:,} fit in the context window"
        f" with room for {max_new_tokens:,} more; lower max_new_tokens (/set max_new_tokens N) or /retry"
    )
