"""The chat service: owns a turn from message to journal, for every face (the REPL, `bluelm ask`).

A turn is send → stream → commit. :meth:`Chat.send` fits the conversation into the context (a pure
function of the prompt module), starts the backend's stream and returns it *without* recording
anything: a refusal (the message can't fit) leaves the conversation as it was. The face shows the
deltas; when the stream has ended or been stopped, :meth:`Chat.commit` records the turn (journaled,
fsync'd) with whatever was answered. Retry and continue are the same shape. Nothing here touches a
terminal or a tensor: a backend is anything that turns prompt ids into a stream of text deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bluelm_cli.backend import AnswerResult, AnswerStream, Backend, ModelLoading
from bluelm_cli.errors import BlueLMError
from bluelm_cli.conversation import Conversation
from bluelm_cli.finish import FinishReason
from bluelm_cli.prompt import HistoryTurn, PromptEncoder, PromptPlan, fit_continuation, fit_prompt, history_tokens
from bluelm_cli.session import Session, Turn
from bluelm_cli.settings import SamplingSettings, check_max_new_tokens, parse_sampling_setting

__all__ = ["Chat", "CommittedTurn", "TurnStream"]


class TurnStream:
    """One answer being produced: iterate for deltas, `stop()` to interrupt, then `Chat.commit` it."""

    def __init__(
        self, message: str, plan: PromptPlan, stream: AnswerStream, *, replaces_last: bool, continues: Turn | None = None
    ) -> None:
        self.message = message
        self.plan = plan
        self.replaces_last = replaces_last  # /retry, /continue: committing replaces the last turn
        self.continues = continues  # /continue: the turn whose answer this stream goes on with
        self._stream = stream

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        return next(self._stream)

    def stop(self) -> None:
        self._stream.stop()

    @property
    def result(self) -> AnswerResult | None:
        return self._stream.result

    def finish(self) -> AnswerResult:
        """Drain what is left (after stop()) and return the result."""
        return self._stream.finish()


@dataclass(frozen=True)
class CommittedTurn:
    """A recorded turn and what the faces report about it."""

    result: AnswerResult
    dropped_turns: int  # oldest turns that no longer fit the context and were left out
    truncated_from: int | None  # the message was cut from this many tokens (ask --truncate)
    journal_error: str | None  # the turn is kept in memory, but could not be written to the journal


class Chat:
    """A conversation (a journaled :class:`Session`) answered by a :class:`Backend`."""

    def __init__(self, backend: Backend, session: Session) -> None:
        self.backend = backend
        self.session = session
        self._ids_checked = False
        session.warnings.extend(self.check_answer_ids())

    def check_answer_ids(self) -> list[str]:
        """A resumed or loaded session's answers are sent back as their ids; ids this model lacks (another
        model's journal, a damaged one) would crash the model, so those answers are re-encoded from their
        text, with a warning each. Runs once the backend's model is there (it may still be loading)."""
        if self._ids_checked:
            return []
        try:
            self.backend.encoder
        except ModelLoading:
            return []
        self._ids_checked = True
        warnings = []
        for number, turn in enumerate(self.session.turns, start=1):
            bad = self._foreign_id(turn)
            if bad is not None:
                turn.answer_ids = []
                warnings.append(
                    f"turn {number} holds token id {bad}, which this model does not have; its answer is sent as text"
                )
        return warnings

    # ------------------------------------------------------------------------------------ queries
    @property
    def system(self) -> str | None:
        return self.session.system

    @property
    def sampling(self) -> SamplingSettings:
        return self.session.sampling_settings()

    @property
    def context_limit(self) -> int:
        return self.backend.context_limit

    def context_used(self) -> int:
        """Context positions the conversation occupies before the next message ("context used")."""
        turns = self.session.active_turns()
        if not turns and self.session.system:  # the system text opens the next prompt: it is in use already
            return 1 + len(self.backend.encoder.encode_plain(self.session.system))
        return history_tokens(self.backend.encoder, self.session.system, _history(turns))

    def last_turn(self) -> Turn | None:
        return self.session.turns[-1] if self.session.turns else None

    # ------------------------------------------------------------------------------------ a turn
    def send(self, message: str, *, truncate: bool = False) -> TurnStream:
        """Start answering `message` after the conversation. Raises (recording nothing) if it can't fit."""
        return self._start(message, self.session.active_turns(), replaces_last=False, truncate=truncate)

    def retry(self) -> TurnStream:
        """Start a new answer to the last message; committing it replaces the last turn."""
        last = self.last_turn()
        if last is None:
            raise BlueLMError("nothing to retry yet; send a message first")
        return self._start(last.user, self._turns_before(last), replaces_last=True, truncate=False)

    def continue_(self) -> TurnStream:
        """Go on with the last answer where it was cut off (max_new_tokens, Ctrl-C, the context's end).

        The prompt is the conversation with that answer's ids left open (no closing </s>); committing
        the stream replaces the last turn with one whose answer is the old one followed by the new text."""
        last = self.last_turn()
        if last is None:
            raise BlueLMError("nothing to continue yet; send a message first")
        if FinishReason(last.finish_reason) is FinishReason.STOP:
            raise BlueLMError("the last answer ended on its own, so there is nothing to continue; /retry asks for a new one")
        self.session.warnings.extend(self.check_answer_ids())
        settings = self.sampling
        check_max_new_tokens(settings.max_new_tokens, self.backend.context_limit)
        plan = fit_continuation(
            self.backend.encoder,
            self.session.system,
            _history(self._turns_before(last)),
            HistoryTurn(last.user, last.answer_ids, last.answer),
            context_limit=self.backend.context_limit,
            max_new_tokens=settings.max_new_tokens,
        )
        stream = self.backend.stream(plan, settings)
        return TurnStream(last.user, plan, stream, replaces_last=True, continues=last)

    def _turns_before(self, last: Turn) -> list[Turn]:
        """The turns the model sees before `last` (the one being answered again or continued)."""
        turns = self.session.active_turns()
        return turns[:-1] if turns and turns[-1] is last else turns

    def _start(self, message: str, turns: Sequence[Turn], *, replaces_last: bool, truncate: bool) -> TurnStream:
        self.session.warnings.extend(self.check_answer_ids())  # the face ran it already when it saw the load end
        settings = self.sampling
        check_max_new_tokens(settings.max_new_tokens, self.backend.context_limit)
        plan = fit_prompt(
            self.backend.encoder,
            self.session.system,
            _history(turns),
            message,
            context_limit=self.backend.context_limit,
            max_new_tokens=settings.max_new_tokens,
            truncate=truncate,
        )
        return TurnStream(message, plan, self.backend.stream(plan, settings), replaces_last=replaces_last)

    def commit(self, stream: TurnStream) -> CommittedTurn:
        """Record the ended (or stopped) answer as a turn. A journal failure keeps the turn in memory."""
        result = stream.result if stream.result is not None else stream.finish()
        if stream.continues is not None:
            answer, answer_ids = _extended(self.backend.encoder, stream.continues, result)
            turn = Turn(user=stream.message, answer=answer, answer_ids=answer_ids,
                        finish_reason=result.finish_reason, created_at=stream.continues.created_at)
        else:
            turn = Turn(
                user=stream.message,
                answer=result.text,
                answer_ids=list(result.answer_ids),
                finish_reason=result.finish_reason,
            )
        journal_error = None
        try:
            if stream.replaces_last:
                self.session.undo()
            self.session.add_turn(turn)
        except BlueLMError as exc:  # applied in memory; only the journal failed
            journal_error = str(exc)
        dropped = stream.plan.dropped_turns
        try:
            self.session.drop_oldest(dropped)
        except BlueLMError as exc:
            journal_error = journal_error or str(exc)
        return CommittedTurn(result, dropped, stream.plan.truncated_from, journal_error)

    # ------------------------------------------------------------------------------------ changes
    def undo(self) -> Turn:
        turn = self.session.undo()
        if turn is None:
            raise BlueLMError("nothing to undo; the conversation is empty")
        return turn

    def reset(self) -> None:
        self.session.reset()

    def set_setting(self, key: str, value: object) -> object:
        if key == "max_new_tokens":
            try:
                limit = self.backend.context_limit
            except ModelLoading:  # checked when a message is sent
                limit = None
            if limit is not None:
                check_max_new_tokens(parse_sampling_setting(key, value), limit)
        return self.session.set_setting(key, value)

    def adopt(self, other: Conversation) -> None:
        """Continue a loaded conversation (its turns, system prompt and settings) in this session.

        Refused (nothing changes) if it holds token ids this model does not have; while the model is still
        loading, those answers are sent as text instead (with a warning once it has loaded)."""
        try:
            self.backend.encoder
        except ModelLoading:
            self.session.adopt(other)
            self._ids_checked = False
            return
        for number, turn in enumerate(other.turns, start=1):
            bad = self._foreign_id(turn)
            if bad is not None:
                raise BlueLMError(
                    f"turn {number} holds token id {bad}, which this model does not have (its vocabulary has"
                    f" {self.backend.encoder.vocab_size}); the file is damaged or from another model"
                )
        self.session.adopt(other)

    def _foreign_id(self, turn: Turn) -> int | None:
        limit = self.backend.encoder.vocab_size
        return next((i for i in turn.answer_ids if not 0 <= i < limit), None)


def _history(turns: Sequence[Turn]) -> list[HistoryTurn]:
    """What the prompt needs of the recorded turns: user text and the answer's generated ids."""
    return [HistoryTurn(turn.user, turn.answer_ids, turn.answer) for turn in turns]


def _extended(encoder: PromptEncoder, turn: Turn, result: AnswerResult) -> tuple[str, list[int]]:
    """The answer of `turn` followed by a continuation: ids joined, and the text of the joined ids (a
    SentencePiece piece that begins with a space loses it when decoded alone, as the continuation was)."""
    old_ids = list(turn.answer_ids) if turn.answer_ids or not turn.answer else encoder.encode_plain(turn.answer)
    ids = old_ids + list(result.answer_ids)
    before, after = encoder.decode(old_ids), encoder.decode(ids)
    text = turn.answer + after[len(before):] if after.startswith(before) else turn.answer + result.text
    return text, ids
