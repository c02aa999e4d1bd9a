"""A session: a conversation whose every change is journaled to disk before the call returns.

:class:`Session` is a :class:`~bluelm_cli.chat.conversation.Conversation` bound to its journal
(:mod:`bluelm_cli.chat.journal`): each change is a record, applied in memory by the conversation's one state
machine and then appended and fsync'd, so Ctrl-C, SIGTERM, SIGHUP or a crash never loses a finished
turn. :meth:`Session.new` starts one, :meth:`Session.resume` replays one; saved copies and transcripts
are :mod:`bluelm_cli.chat.transcript`'s job.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bluelm_cli.chat import transcript
from bluelm_cli.chat.conversation import Conversation, Turn, sampling_dict, utc_now
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.chat.journal import (
    JOURNAL_SUFFIX,
    VERSION,
    JournalLock,
    SessionInfo,
    SessionExistsError,
    append_record,
    create_started,
    find_journal,
    fsync_dir,
    list_sessions,
    reason,
    replay,
    validate_session_name,
)
from bluelm_cli.config.paths import ensure_dir, expand_user
from bluelm_cli.core.settings import SamplingSettings, parse_sampling_setting

__all__ = ["Session", "SessionInfo", "Turn", "list_sessions", "utc_now", "validate_session_name"]

# The name Session.new gives a session started without one (2026-11-25-140501, or -2 when that is taken).
_TIME_NAME = re.compile(r"\d{4}-\d{2}-\d{2}-\d{6}(?:-\d+)?")
# A name numbered in a series (work-2): a short counter, so that "project-2024" or a time is not taken for one.
_NUMBERED_NAME = re.compile(r"(.+)-(\d{1,3})")


def _names_after(name: str) -> list[str] | None:
    """The names to try, in order, for the session that follows `name` (/clear, /load): work → work-2,
    work-3, …; work-2 → work-3, … None when `name` was a start time (the next one is named by its own)
    or a numbered name would not be a valid session name (too long)."""
    if _TIME_NAME.fullmatch(name):
        return None
    numbered = _NUMBERED_NAME.fullmatch(name)
    base, number = (numbered.group(1), int(numbered.group(2))) if numbered else (name, 1)
    candidates = [f"{base}-{n}" for n in range(number + 1, number + 1000)]
    try:
        validate_session_name(candidates[-1])  # the longest: if it is valid, all are
    except BlueLMError:
        return None
    return candidates


@dataclass
class Session(Conversation):
    journal: Path | None = field(default=None, repr=False, compare=False)  # None: changes are not journaled
    warnings: list[str] = field(default_factory=list, repr=False, compare=False)  # problems found while resuming
    # Records applied in memory that the journal could not take yet (a full disk, a read-only folder):
    # they are written, in order, with the next change that succeeds, and the chat won't quit silently.
    _unwritten: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False, compare=False)
    _journal_problem: str | None = field(default=None, init=False, repr=False, compare=False)
    _lock: JournalLock | None = field(default=None, init=False, repr=False, compare=False)

    # ----------------------------------------------------------------- changes (all journaled)
    def record_message(self, message: str) -> None:
        """Note a message as sent and not answered yet; on disk (fsync'd) when this returns."""
        self._record({"type": "message", "user": message, "created_at": utc_now()})

    def add_turn(self, turn: Turn) -> None:
        """Append a finished turn; it is on disk (fsync'd) when this returns."""
        self._record({"type": "turn", **turn.to_dict()})

    def reset(self) -> None:
        """Start a new conversation; settings are kept."""
        self._record({"type": "reset"})

    def undo(self) -> Turn | None:
        """Drop the last exchange and return it (None if there is none)."""
        if not self.turns:
            return None
        last = self.turns[-1]
        self._record({"type": "undo"})
        return last

    def set_setting(self, key: str, value: object) -> Any:
        """Change ``system`` or a sampling key; ``value`` may be a raw string. Returns the parsed value.

        Raises UsageError for other keys or bad values."""
        parsed = parse_sampling_setting(key, value)
        self._record({"type": "set", "key": key, "value": parsed})
        return parsed

    def drop_oldest(self, count: int) -> None:
        """Stop sending the ``count`` oldest active turns to the model (they stay in the history)."""
        if count <= 0:
            return
        self._record({"type": "drop", "count": int(count)})

    def adopt(self, other: Conversation) -> None:
        """Replace this conversation (turns, system, sampling) with a loaded one; journaled.

        ``model_id`` and ``name`` stay those of this session (the running model)."""
        self._record(
            {
                "type": "load",
                "system": other.system,
                "sampling": {**self.sampling, **other.sampling},
                "turns": [t.to_dict() for t in other.turns],
                "context_start": other.context_start,
                "source_model_id": other.model_id,
            }
        )
        if other.pending is not None:  # the file's unanswered message stays reachable, and /retry sends it
            self.record_message(other.pending)

    def _record(self, record: dict[str, Any]) -> None:
        """Apply a record in memory, then append it to the journal (if any).

        A journal that can't be written raises BlueLMError once (the change is kept in memory and
        written later); while it stays unwritable, further changes queue up silently."""
        self.apply(record)
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        if self.journal is None:
            return
        if record["type"] == "turn" and self._unwritten and self._unwritten[-1]["type"] == "message":
            self._unwritten.pop()  # not on disk yet, and the turn carries the message: write the turn alone
        self._unwritten.append(record)
        already_failing = self._journal_problem is not None
        if not self.flush_journal() and not already_failing:
            raise BlueLMError(
                f"could not write the session journal {self.journal} ({self._journal_problem}); the conversation"
                " is kept in memory and the journal is tried again with every change"
            )

    def flush_journal(self) -> bool:
        """Write what the journal still lacks; True when it is complete."""
        while self._unwritten and self.journal is not None:
            try:
                append_record(self.journal, self._unwritten[0])
            except OSError as exc:
                self._journal_problem = reason(exc)
                return False
            self._unwritten.pop(0)
        self._journal_problem = None
        return True

    @property
    def unwritten(self) -> int:
        """Changes (turns, settings, …) kept in memory that are not in the journal yet."""
        return len(self._unwritten)

    @property
    def journal_problem(self) -> str | None:
        return self._journal_problem

    def close(self) -> None:
        """Let another chat open this session (the lock also goes when the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ----------------------------------------------------------------- new / resume
    @classmethod
    def new(
        cls,
        sessions_dir: Path,
        *,
        name: str | None = None,
        model_id: str,
        system: str | None = None,
        sampling: SamplingSettings | Mapping[str, Any] | None = None,
        after: str | None = None,
    ) -> Session:
        """Start a session and its journal. ``name`` defaults to a local timestamp (2026-11-25-140501).

        An existing ``name`` raises UsageError (resume it instead). Without a ``name``, ``after`` names the
        session this one follows (/clear): it is numbered after it, work → work-2 (the first free one),
        unless that was named by a time too."""
        sessions_dir = Path(sessions_dir)
        if name is not None:
            name = validate_session_name(name)
        ensure_dir(sessions_dir)
        session = cls(name="", model_id=model_id, system=system or None, sampling=sampling_dict(sampling))
        base = name or datetime.now().strftime("%Y-%m-%d-%H%M%S")
        series = _names_after(after) if name is None and after is not None else None
        candidates = series or [base, *(f"{base}-{attempt}" for attempt in range(2, 1000))]
        for candidate in candidates:
            path = sessions_dir / f"{candidate}{JOURNAL_SUFFIX}"
            start = {
                "type": "start",
                "version": VERSION,
                "name": candidate,
                "model_id": model_id,
                "system": session.system,
                "sampling": session.sampling,
                "created_at": utc_now(),
            }
            try:
                lock = create_started(path, start, candidate)
            except SessionExistsError:
                if name is not None:
                    raise
                continue
            except OSError as exc:
                raise BlueLMError(
                    f"cannot create session journal {path} ({reason(exc)}); check that {sessions_dir} is writable"
                ) from None
            break
        else:  # pragma: no cover - a thousand sessions in one second
            raise BlueLMError(f"too many sessions named {candidates[-1].rsplit('-', 1)[0]}-* in {sessions_dir}; choose a name")
        session.name = candidate
        session.journal = path
        session._lock = lock
        fsync_dir(sessions_dir)
        return session

    @classmethod
    def resume(cls, sessions_dir: Path, name: str | None = None) -> Session:
        """Reopen a session from its journal (``name=None``: the most recently used one)."""
        path = find_journal(sessions_dir, name)
        lock = JournalLock.acquire(path, path.name[: -len(JOURNAL_SUFFIX)])
        try:
            conversation, warnings = replay(path, repair=os.access(path, os.W_OK))
        except BaseException:
            lock.release()
            raise
        session = cls.from_conversation(conversation, journal=path)
        session.name = path.name[: -len(JOURNAL_SUFFIX)]  # the name it is resumed by, not the start record's
        session._lock = lock
        session.warnings = warnings
        try:
            session._append({"type": "resume", "at": utc_now()})
        except BlueLMError:
            session.warnings.append(
                f"the session journal {path} can't be written ({session.journal_problem}): new turns are kept"
                " in memory only; /save PATH keeps a copy elsewhere"
            )
        return session

    @classmethod
    def from_conversation(cls, conversation: Conversation, *, journal: Path | None = None) -> Session:
        return cls(
            name=conversation.name,
            model_id=conversation.model_id,
            system=conversation.system,
            sampling=dict(conversation.sampling),
            turns=list(conversation.turns),
            context_start=conversation.context_start,
            pending=conversation.pending,
            journal=journal,
        )

    # ----------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        return transcript.to_json_dict(self)

    def to_markdown(self) -> str:
        return transcript.to_markdown(self)

    def save(self, path: Path) -> Path:
        """Write a copy: a Markdown transcript for .md/.markdown, JSON otherwise (atomic).

        Never onto a session journal: that would replace the live history with a file it can't replay."""
        path = expand_user(path)
        target = Path(os.path.realpath(path))  # through symbolic links: a link to a journal is a journal
        if _same_file(target, self.journal) or _is_journal(target):
            raise BlueLMError(
                f"{path} is a session journal, which bluelm keeps itself; save the copy under another name (.json or .md)"
            )
        return transcript.save(self, path)

    @classmethod
    def load(cls, path: Path) -> Session:
        """A conversation saved with /save (or a journal), not journaled itself."""
        return cls.from_conversation(transcript.load(expand_user(path)))


def _same_file(path: Path, other: Path | None) -> bool:
    try:
        return other is not None and os.path.samefile(path, other)
    except OSError:
        return False


def _is_journal(path: Path) -> bool:
    """An existing regular file that starts like a session journal (a FIFO is never opened: it would block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return False
    return first.startswith(b'{"type":"start"')
