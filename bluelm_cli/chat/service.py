"""The chat service: one call owns a whole turn, for every face (the REPL, `bluelm ask`, script mode).

:meth:`Chat.send` (and :meth:`Chat.retry`, :meth:`Chat.continue_`) returns a :class:`TurnStream`, and the turn
is then the stream's own business:

1. the user's message is journaled (fsync'd) before anything can fail: a refusal, a server that fails before
   its first token or a crash leaves it in the session as *pending*, and /retry sends it again;
2. the conversation is fitted into the context (a pure function of :mod:`bluelm_cli.core.prompt`) and the
   backend's stream starts;
3. iterating the stream gives the answer's text deltas; when it ends (complete, cut at a limit, stopped with
   ``stop()``, or failed mid-way) the stream commits the turn to the journal itself, once.

A face only renders: it iterates, may ``stop()``, and reads :meth:`TurnStream.finish` (the committed turn).
No face writes to the journal. Nothing here touches a terminal or a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from bluelm_cli.core.backend import AnswerResult, AnswerStream, Backend, ModelLoading
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.chat.conversation import Conversation
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import (
    HistoryTurn, PromptEncoder, PromptPlan, check_system_prompt_fits, fit_continuation, fit_prompt, history_tokens,
)
from bluelm_cli.session import Session, Turn
from bluelm_cli.core.settings import SamplingSettings, check_max_new_tokens, parse_sampling_setting

__all__ = ["Chat", "CommittedTurn", "TurnStream"]


class TurnStream:
    """One turn being answered: iterate for the answer's text deltas, `stop()` to interrupt it.

    The turn commits itself (journaled) when the answer ends, however it ends; :meth:`finish` drains what is
    left (after `stop()`) and returns the committed turn. A backend that fails mid-answer does not raise out
    of the iteration: the turn ends with finish "error", its text so far kept and the error in the result."""

    def __init__(
        self, chat: Chat, message: str, plan: PromptPlan, stream: AnswerStream, *, replaces_last: bool,
        continues: Turn | None = None, journal_error: str | None = None,
    ) -> None:
        self.message = message
        self.plan = plan
        self.replaces_last = replaces_last  # /retry, /continue: committing replaces the last turn
        self.continues = continues  # /continue: the turn whose answer this stream goes on with
        self.committed: CommittedTurn | None = None
        self._chat = chat
        self._stream = stream
        self._deltas: list[str] = []
        self._journal_error = journal_error  # recording the message failed; reported with the turn

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        if self.committed is not None:
            raise StopIteration
        try:
            delta = next(self._stream)
        except StopIteration:
            self._commit(self._stream.result if self._stream.result is not None else self._stream.finish())
            raise
        except (KeyboardInterrupt, SystemExit):
            raise  # the face stops the answer and drains it; the turn commits then
        except Exception as error:  # noqa: BLE001 - the backend failed mid-answer: keep what came, end in error
            self._commit(self._failed(error))
            raise StopIteration from None
        self._deltas.append(delta)
        return delta

    def stop(self) -> None:
        self._stream.stop()

    @property
    def result(self) -> AnswerResult | None:
        return self.committed.result if self.committed is not None else self._stream.result

    def finish(self) -> CommittedTurn:
        """Drain what is left (after stop()) and return the committed turn."""
        for _ in self:
            pass
        assert self.committed is not None
        return self.committed

    def _failed(self, error: Exception) -> AnswerResult:
        text = "".join(self._deltas)
        detail = str(error) if isinstance(error, BlueLMError) else f"unexpected {type(error).__name__}: {error}"
        return AnswerResult(
            text=text, answer_ids=[], finish_reason=FinishReason.ERROR, prompt_tokens=len(self.plan.ids),
            reused_tokens=0, new_tokens=len(self._deltas), ttft_s=0.0, decode_tok_s=0.0,
            context_tokens=len(self.plan.ids), context_limit=self._chat.context_limit, error=detail,
        )

    def _commit(self, result: AnswerResult) -> None:
        self.committed = self._chat._commit(self, result)
        if self._journal_error and not self.committed.journal_error:
            self.committed = replace(self.committed, journal_error=self._journal_error)


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
        # The system prompts replaced while the model loaded (oldest first): the newest that fits comes back if
        # the one set last turns out too long once the tokenizer is there.
        self._systems_before_load: list[str | None] = []
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
        """Start answering `message` after the conversation.

        The message is journaled first (as pending), so if it can't fit or the backend refuses it at once
        (the error is raised), it stays in the session and /retry sends it again. A model still loading
        raises ModelLoading before anything is recorded: the face waits and sends the same message again."""
        self.backend.encoder  # noqa: B018 - ModelLoading here, before the message is recorded
        # A system prompt that leaves no room for any message: refused before the message is recorded, so no
        # turn is left pending that no retry could send.
        check_system_prompt_fits(self.backend.encoder, self.session.system, context_limit=self.backend.context_limit,
                                 max_new_tokens=self.sampling.max_new_tokens)
        journal_error = None
        try:
            self.session.record_message(message)
        except BlueLMError as exc:  # noted in memory; only the journal failed, reported with the turn
            journal_error = str(exc)
        return self._start(message, self.session.active_turns(), replaces_last=False, truncate=truncate,
                           journal_error=journal_error)

    def retry(self) -> TurnStream:
        """A new answer to the last message: the one left unanswered (pending), else the last turn's,
        whose turn committing replaces."""
        if self.session.pending is not None:
            return self._start(self.session.pending, self.session.active_turns(), replaces_last=False,
                               truncate=False)
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
        return TurnStream(self, last.user, plan, stream, replaces_last=True, continues=last)

    def _turns_before(self, last: Turn) -> list[Turn]:
        """The turns the model sees before `last` (the one being answered again or continued)."""
        turns = self.session.active_turns()
        return turns[:-1] if turns and turns[-1] is last else turns

    def _start(self, message: str, turns: Sequence[Turn], *, replaces_last: bool, truncate: bool,
               journal_error: str | None = None) -> TurnStream:
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
        return TurnStream(self, message, plan, self.backend.stream(plan, settings), replaces_last=replaces_last,
                          journal_error=journal_error)

    def _commit(self, stream: TurnStream, result: AnswerResult) -> CommittedTurn:
        """Record the ended (or stopped) answer as a turn; called by the stream itself, once. A journal
        failure keeps the turn in memory."""
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

    def start_over(self) -> Session:
        """A new conversation in a new session with the same model, system prompt and settings (/clear, /load).

        The old session keeps its turns, so `bluelm sessions show`, `sessions search` and `--resume` still
        find them; nothing typed becomes unreachable. A session with nothing in it is simply reused, and
        one that is not journaled (`bluelm ask`) is reset. Returns the session the conversation is now in."""
        old = self.session
        if old.journal is None or (not old.turns and old.pending is None):
            if old.turns or old.pending is not None:
                old.reset()
            return old
        if not old.flush_journal():
            raise BlueLMError(
                f"the session journal {old.journal} can't be written ({old.journal_problem}); /save PATH keeps"
                " this conversation before a new one starts"
            )
        new = Session.new(
            old.journal.parent, model_id=old.model_id, system=old.system, sampling=old.sampling, after=old.name
        )
        old.close()
        self.session = new
        return new

    def set_setting(self, key: str, value: object) -> object:
        """Change a setting; refused (nothing changes) when the system prompt, the shortest message and the
        answer budget would not fit the context. While the model loads that is checked once it has loaded
        (:meth:`check_system_after_load`)."""
        parsed = parse_sampling_setting(key, value)
        if key in ("system", "max_new_tokens"):
            try:
                limit, encoder = self.backend.context_limit, self.backend.encoder
            except ModelLoading:
                if key == "system":
                    self._systems_before_load.append(self.session.system)
            else:
                if key == "max_new_tokens":
                    check_max_new_tokens(parsed, limit)  # type: ignore[arg-type]
                system = parsed if key == "system" else self.session.system
                budget = parsed if key == "max_new_tokens" else self.sampling.max_new_tokens
                check_system_prompt_fits(
                    encoder, system, context_limit=limit, max_new_tokens=budget,  # type: ignore[arg-type]
                    remedy=(f"the system prompt is unchanged; give a shorter one" if key == "system"
                            else f"max_new_tokens is unchanged; shorten the system prompt first (/set system none clears it)"),
                )
        return self.session.set_setting(key, parsed)

    def check_system_after_load(self) -> str | None:
        """Once the model has loaded: a system prompt set while it loaded (or given with --system) that leaves
        no room for a message is undone, back to the one before if that fits, else to none. Returns the
        error to show, or None when it fits."""
        system = self.session.system
        try:
            check_system_prompt_fits(self.backend.encoder, system, context_limit=self.backend.context_limit,
                                     max_new_tokens=self.sampling.max_new_tokens)
        except BlueLMError as too_long:
            before = None
            for candidate in reversed(self._systems_before_load):
                try:
                    check_system_prompt_fits(self.backend.encoder, candidate, context_limit=self.backend.context_limit,
                                             max_new_tokens=self.sampling.max_new_tokens)
                except BlueLMError:
                    continue
                before = candidate
                break
            self.session.set_setting("system", before)
            what = "the one before is back" if before else "the chat goes on without one"
            reason = str(too_long).rpartition(";")[0]
            return f"{reason}; {what} (/set system TEXT sets a shorter one)"
        finally:
            self._systems_before_load.clear()
        return None

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
        self.check_adoptable(other)
        self.session.adopt(other)

    def check_adoptable(self, other: Conversation, *, what: str = "") -> None:
        """Raise BlueLMError if `other` holds token ids this model lacks (nothing to check while it loads)."""
        try:
            encoder = self.backend.encoder
        except ModelLoading:
            return
        for number, turn in enumerate(other.turns, start=1):
            bad = self._foreign_id(turn)
            if bad is not None:
                raise BlueLMError(
                    f"{f'cannot load {what}: ' if what else ''}turn {number} holds token id {bad}, which this model"
                    f" does not have (its vocabulary has {encoder.vocab_size}); the file is damaged or from another model"
                )

    def _foreign_id(self, turn: Turn) -> int | None:
        limit = self.backend.encoder.vocab_size
        return next((i for i in turn.answer_ids if not 0 <= i < limit), None)


def _history(turns: Sequence[Turn]) -> list[HistoryTurn]:
    """What the prompt needs of the recorded turns: user text and the answer's generated ids."""
    return [HistoryTurn(turn.user, turn.answer_ids, turn.answer) for turn in turns]


def _extended(encoder: PromptEncoder, turn: Turn, result: AnswerResult) -> tuple[str, list[int]]:
    """The answer of `turn` followed by a continuation: ids joined, and the text of the joined ids (a
    SentencePiece piece that begins with a space loses it when decoded alone, as the continuation was)."""
    if result.text and not result.answer_ids:  # a served model says no ids: its text is the continuation
        return turn.answer + result.text, []
    old_ids = list(turn.answer_ids) if turn.answer_ids or not turn.answer else encoder.encode_plain(turn.answer)
    ids = old_ids + list(result.answer_ids)
    before, after = encoder.decode(old_ids), encoder.decode(ids)
    text = turn.answer + after[len(before):] if after.startswith(before) else turn.answer + result.text
    return text, ids
