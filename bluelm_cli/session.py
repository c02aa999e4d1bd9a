"""A conversation and its crash-safe persistence. No terminal code, no tensors.

Journal
-------
Every session started with :meth:`Session.new` has a journal, ``<sessions_dir>/<name>.jsonl``: one JSON
object per line, each appended with a single ``write`` of the whole line, then flushed and fsync'd before
the call returns, so Ctrl-C, SIGTERM, SIGHUP or a crash never loses a finished turn. Records::

    {"type": "start", "version": 1, "name": ..., "model_id": ..., "system": ..., "sampling": {...}, "created_at": ...}
    {"type": "turn", "user": ..., "answer": ..., "answer_ids": [...], "finish_reason": ..., "created_at": ...}
    {"type": "reset"}                       new conversation, settings kept
    {"type": "undo"}                        last turn removed (``undo`` and ``pop_last_for_retry``)
    {"type": "set", "key": ..., "value": ...}
    {"type": "drop", "count": N}            N more old turns no longer sent to the model
    {"type": "load", "system": ..., "sampling": {...}, "turns": [...], "context_start": N, "source_model_id": ...}
    {"type": "resume", "at": ...}           the session was reopened (no state change)

:meth:`Session.resume` replays it. A last line cut short by a crash is dropped (and cut off the file so
later appends start on a fresh line); every complete record is recovered. A damaged line elsewhere is
skipped and reported in :attr:`Session.warnings`.

Saved files
-----------
``/save x.json`` writes ``{"format": "bluelm-cli.session", "version": 1, "model_id", "system", "sampling",
"context_start", "turns", "saved_at", "name"}``; ``/save x.md`` writes a Markdown transcript for reading
(it cannot be loaded back). Saving is atomic: a temporary file in the same directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BlueLMError, UsageError
from .paths import ensure_dir
from .settings import GENERATION_KEYS, SAMPLING_KEYS, SamplingSettings, parse_sampling_setting, parse_setting

FORMAT = "bluelm-cli.session"
VERSION = 1
JOURNAL_SUFFIX = ".jsonl"
FINISH_REASONS = ("stop", "length", "interrupted", "context")
_NAME_RE = re.compile(r"[\w.-]+")
_MAX_NAME = 100


def utc_now() -> str:
    """ISO 8601 UTC timestamp, seconds precision: ``2026-11-25T14:05:01+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_session_name(name: str) -> str:
    """The name if it is usable as a session name (``--session NAME``), else UsageError."""
    if (
        not isinstance(name, str)
        or not _NAME_RE.fullmatch(name)
        or name.startswith(".")
        or len(name) > _MAX_NAME
    ):
        raise UsageError(
            f"invalid session name '{name}': use only letters, digits, '-', '_' and '.'"
            f" (not starting with '.', at most {_MAX_NAME} characters)"
        )
    return name


def journal_path(sessions_dir: Path, name: str) -> Path:
    return Path(sessions_dir) / f"{validate_session_name(name)}{JOURNAL_SUFFIX}"


class _Bad(Exception):
    """A record or file that does not have the expected shape."""


# --------------------------------------------------------------------------- Turn
@dataclass
class Turn:
    user: str
    answer: str
    answer_ids: list[int] = field(default_factory=list)  # as generated, without the closing </s>
    finish_reason: str = "stop"  # "stop" | "length" | "interrupted" | "context"
    created_at: str = field(default_factory=utc_now)  # ISO 8601 UTC

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "answer": self.answer,
            "answer_ids": list(self.answer_ids),
            "finish_reason": self.finish_reason,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> Turn:
        if not isinstance(data, Mapping):
            raise _Bad("a turn is not an object")
        user, answer = data.get("user"), data.get("answer")
        if not isinstance(user, str) or not isinstance(answer, str):
            raise _Bad("a turn lacks its user or answer text")
        ids = data.get("answer_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise _Bad("a turn's answer_ids is not a list of integers")
        reason = data.get("finish_reason", "stop")
        if reason not in FINISH_REASONS:
            raise _Bad(f"a turn has an unknown finish_reason {reason!r}")
        created = data.get("created_at", "")
        if not isinstance(created, str):
            raise _Bad("a turn's created_at is not a string")
        return cls(user=user, answer=answer, answer_ids=list(ids), finish_reason=reason, created_at=created)


def _sampling_dict(sampling: SamplingSettings | Mapping[str, Any] | None) -> dict[str, Any]:
    if sampling is None:
        return SamplingSettings().as_dict()
    if isinstance(sampling, SamplingSettings):
        return sampling.as_dict()
    return SamplingSettings.from_mapping(sampling).as_dict()


def _checked_sampling(data: object) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _Bad("sampling is not an object")
    unknown = [key for key in data if key not in GENERATION_KEYS]
    if unknown:
        raise _Bad(f"unknown sampling setting {unknown[0]!r}")
    try:
        return SamplingSettings.from_mapping(data).as_dict()
    except UsageError as exc:
        raise _Bad(str(exc)) from None


def _checked_system(data: object) -> str | None:
    if data is not None and not isinstance(data, str):
        raise _Bad("system is not a string")
    return data or None


def _checked_turns(data: object) -> list[Turn]:
    if not isinstance(data, list):
        raise _Bad("turns is not a list")
    return [Turn.from_dict(item) for item in data]


def _checked_context_start(data: object, turns: list[Turn]) -> int:
    if data is None:
        return 0
    if not isinstance(data, int) or isinstance(data, bool) or data < 0:
        raise _Bad("context_start is not a whole number")
    return min(data, len(turns))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------- Session
@dataclass
class Session:
    name: str
    model_id: str
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=lambda: SamplingSettings().as_dict())
    turns: list[Turn] = field(default_factory=list)
    context_start: int = 0  # first turn still sent to the model; older ones stay in the history
    journal: Path | None = field(default=None, repr=False, compare=False)  # None: changes are not journaled
    warnings: list[str] = field(default_factory=list, repr=False, compare=False)  # problems found while resuming
    _journal_failed: bool = field(default=False, init=False, repr=False, compare=False)

    # ----------------------------------------------------------------- queries
    def active_turns(self) -> list[Turn]:
        return self.turns[self.context_start :]

    def sampling_settings(self) -> SamplingSettings:
        return SamplingSettings.from_mapping(self.sampling)

    # ----------------------------------------------------------------- changes (all journaled)
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

    def pop_last_for_retry(self) -> str | None:
        """Remove the last turn and return its user message, to ask again (None if there is none)."""
        last = self.undo()
        return None if last is None else last.user

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

    def adopt(self, other: Session) -> None:
        """Replace this conversation (turns, system, sampling) with a loaded one; journaled.

        ``model_id`` and ``name`` stay those of this session (the running model)."""
        self._record(
            {
                "type": "load",
                "system": other.system,
                "sampling": dict(other.sampling),
                "turns": [t.to_dict() for t in other.turns],
                "context_start": other.context_start,
                "source_model_id": other.model_id,
            }
        )

    # ----------------------------------------------------------------- journal internals
    def _record(self, record: dict[str, Any]) -> None:
        """Apply a record in memory, then append it to the journal (if any)."""
        self._apply(record)
        self._append(record)

    def _apply(self, record: Mapping[str, Any]) -> None:
        """The one place that changes state; used live and by replay. Raises _Bad for a malformed record."""
        kind = record.get("type")
        if kind == "turn":
            self.turns.append(Turn.from_dict(record))
        elif kind == "reset":
            self.turns = []
            self.context_start = 0
        elif kind == "undo":
            if self.turns:
                self.turns.pop()
            self.context_start = min(self.context_start, len(self.turns))
        elif kind == "set":
            key = record.get("key")
            if key not in SAMPLING_KEYS:
                raise _Bad(f"unknown setting {key!r}")
            try:
                value = parse_setting(key, record.get("value"))
            except UsageError as exc:
                raise _Bad(str(exc)) from None
            if key == "system":
                self.system = value
            else:
                self.sampling = {**self.sampling, key: value}
        elif kind == "drop":
            count = record.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise _Bad("drop count is not a whole number")
            self.context_start = min(self.context_start + count, len(self.turns))
        elif kind == "load":
            turns = _checked_turns(record.get("turns"))
            system = _checked_system(record.get("system"))
            sampling = _checked_sampling(record.get("sampling", {}))
            self.context_start = _checked_context_start(record.get("context_start"), turns)
            self.turns, self.system, self.sampling = turns, system, sampling
        elif kind in ("resume", "start"):
            pass
        else:
            raise _Bad(f"unknown record type {kind!r}")

    def _append(self, record: Mapping[str, Any]) -> None:
        if self.journal is None or self._journal_failed:
            return
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._journal_failed = True
            raise BlueLMError(
                f"could not write the session journal {self.journal} ({_reason(exc)}); this session is no"
                " longer saved automatically, save it explicitly to keep it"
            ) from None

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
    ) -> Session:
        """Start a session and its journal. ``name`` defaults to a local timestamp (2026-11-25-140501).

        An existing ``name`` raises UsageError (resume it instead)."""
        sessions_dir = Path(sessions_dir)
        if name is not None:
            validate_session_name(name)
        ensure_dir(sessions_dir)
        session = cls(name="", model_id=model_id, system=system or None, sampling=_sampling_dict(sampling))
        base = name or datetime.now().strftime("%Y-%m-%d-%H%M%S")
        for attempt in range(1, 1000):
            candidate = base if attempt == 1 else f"{base}-{attempt}"
            path = sessions_dir / f"{candidate}{JOURNAL_SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except FileExistsError:
                if name is not None:
                    raise UsageError(
                        f"session '{name}' already exists in {sessions_dir}; resume it or choose another name"
                    ) from None
                continue
            except OSError as exc:
                raise BlueLMError(
                    f"cannot create session journal {path} ({_reason(exc)}); check that {sessions_dir} is writable"
                ) from None
            os.close(fd)
            break
        else:  # pragma: no cover - a thousand sessions in one second
            raise BlueLMError(f"too many sessions named {base}-* in {sessions_dir}; choose a name")
        session.name = candidate
        session.journal = path
        session._append(
            {
                "type": "start",
                "version": VERSION,
                "name": candidate,
                "model_id": model_id,
                "system": session.system,
                "sampling": session.sampling,
                "created_at": utc_now(),
            }
        )
        _fsync_dir(sessions_dir)
        return session

    @classmethod
    def resume(cls, sessions_dir: Path, name: str | None = None) -> Session:
        """Reopen a session from its journal (``name=None``: the most recently used one)."""
        sessions_dir = Path(sessions_dir)
        if name is None:
            infos = list_sessions(sessions_dir)
            if not infos:
                raise BlueLMError(f"there are no saved sessions in {sessions_dir} yet; start a new chat instead")
            path = infos[0].path
        else:
            path = journal_path(sessions_dir, name)
            if not path.is_file():
                known = [info.name for info in list_sessions(sessions_dir)]
                hint = f"known sessions: {', '.join(known[:10])}{', …' if len(known) > 10 else ''}" if known else (
                    "there are no saved sessions yet"
                )
                raise BlueLMError(f"no session named '{name}' in {sessions_dir}; {hint}")
        session = _replay(path, repair=True)
        session._append({"type": "resume", "at": utc_now()})
        return session

    # ----------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "model_id": self.model_id,
            "system": self.system,
            "sampling": dict(self.sampling),
            "context_start": self.context_start,
            "turns": [t.to_dict() for t in self.turns],
            "saved_at": utc_now(),
        }

    def to_markdown(self) -> str:
        lines = [f"# BlueLM chat: {self.name}" if self.name else "# BlueLM chat", ""]
        lines.append(f"- Model: `{self.model_id}`")
        lines.append(f"- Saved: {utc_now()}")
        if self.system:
            lines += ["", "**System:**", "", self.system]
        notes = {
            "interrupted": "*(interrupted)*",
            "length": "*(cut off at max_new_tokens)*",
            "context": "*(cut off: context window full)*",
        }
        for number, turn in enumerate(self.turns, start=1):
            lines += ["", "---", "", f"## Turn {number}", "", "**You:**", "", turn.user, "", "**BlueLM:**", ""]
            answer = turn.answer
            note = notes.get(turn.finish_reason)
            if note:
                answer = f"{answer} {note}" if answer.strip() else note
            lines.append(answer)
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> Path:
        """Write the session: Markdown transcript if the suffix is .md/.markdown, JSON otherwise.

        Atomic: an existing file is replaced only by a complete new one. Returns the path written."""
        path = Path(path).expanduser()
        markdown = path.suffix.lower() in (".md", ".markdown")
        text = self.to_markdown() if markdown else json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        _atomic_write(path, text.encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: Path) -> Session:
        """Read a session saved as JSON (or a journal, .jsonl). Never touches any other session.

        Missing, unreadable, corrupt or foreign files raise BlueLMError naming the path."""
        path = Path(path).expanduser()
        if path.suffix.lower() in (".md", ".markdown"):
            raise BlueLMError(
                f"{path} is a Markdown transcript, which is for reading only; load a session saved as .json"
            )
        if path.suffix.lower() == JOURNAL_SUFFIX:
            session = _replay(path, repair=False)
            session.journal = None
            return session
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlueLMError(f"no such file: {path}; check the path") from None
        except IsADirectoryError:
            raise BlueLMError(f"{path} is a directory; give the path of a saved session (.json)") from None
        except OSError as exc:
            raise BlueLMError(f"cannot read {path} ({_reason(exc)}); check its permissions") from None
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BlueLMError(f"{path} is not a bluelm session (not valid JSON); load a file saved with /save") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise BlueLMError(f"{path} is not a bluelm session file; load a file saved with /save")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BlueLMError(f"{path} is a damaged bluelm session (no version); it cannot be loaded")
        if version > VERSION:
            raise BlueLMError(f"{path} was saved by a newer bluelm-cli (format version {version}); upgrade to load it")
        try:
            model_id = obj.get("model_id")
            if not isinstance(model_id, str):
                raise _Bad("model_id is missing")
            name = obj.get("name") or path.stem
            if not isinstance(name, str):
                raise _Bad("name is not a string")
            turns = _checked_turns(obj.get("turns", []))
            return cls(
                name=name,
                model_id=model_id,
                system=_checked_system(obj.get("system")),
                sampling=_checked_sampling(obj.get("sampling", {})),
                turns=turns,
                context_start=_checked_context_start(obj.get("context_start"), turns),
            )
        except _Bad as exc:
            raise BlueLMError(f"{path} is a damaged bluelm session ({exc}); it cannot be loaded") from None


def _atomic_write(path: Path, data: bytes) -> None:
    directory = path.parent
    if path.is_dir():
        raise BlueLMError(f"cannot save to {path}: it is a directory; give a file name such as chat.json")
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise BlueLMError(f"cannot save to {path}: {directory} {what}; create it or choose another path")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise BlueLMError(f"cannot save to {path}: {directory} is not writable ({_reason(exc)})") from None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise BlueLMError(f"cannot save to {path} ({_reason(exc)}); the existing file, if any, is unchanged") from None
    _fsync_dir(directory)


def _read_records(path: Path, *, repair: bool) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """Complete JSON records of a journal, with line numbers, and warnings. With ``repair``, a last line
    cut short by a crash is truncated off the file so that later appends start on a fresh line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BlueLMError(f"no such session journal: {path}") from None
    except OSError as exc:
        raise BlueLMError(f"cannot read session journal {path} ({_reason(exc)}); check its permissions") from None
    records: list[tuple[int, dict[str, Any]]] = []
    warnings: list[str] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a line cut short
    if tail.strip():
        good_length = len(data) - len(tail)
        try:
            obj = json.loads(tail.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            obj = None
        if obj is not None:
            lines.append(tail)  # complete record, only its newline is missing
            if repair:
                _repair(path, None)
        elif repair:
            _repair(path, good_length)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            warnings.append(f"{path}: line {number} is damaged and was skipped")
            continue
        if not isinstance(obj, dict):
            warnings.append(f"{path}: line {number} is not a record and was skipped")
            continue
        records.append((number, obj))
    return records, warnings


def _repair(path: Path, good_length: int | None) -> None:
    """Cut a partial last line off (good_length) or add the missing newline (None)."""
    try:
        if good_length is None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            os.truncate(path, good_length)
    except OSError as exc:
        raise BlueLMError(f"cannot repair session journal {path} ({_reason(exc)}); check its permissions") from None


def _replay(path: Path, *, repair: bool) -> Session:
    records, warnings = _read_records(path, repair=False)
    if not records or records[0][1].get("type") != "start":
        raise BlueLMError(f"{path} is not a bluelm session journal (no start record); delete it or move it away")
    start = records[0][1]
    version = start.get("version")
    if isinstance(version, int) and version > VERSION:
        raise BlueLMError(f"{path} was written by a newer bluelm-cli (journal version {version}); upgrade to resume it")
    model_id = start.get("model_id")
    try:
        if not isinstance(model_id, str):
            raise _Bad("model_id is missing")
        session = Session(
            name=path.name[: -len(JOURNAL_SUFFIX)] if path.name.endswith(JOURNAL_SUFFIX) else path.stem,
            model_id=model_id,
            system=_checked_system(start.get("system")),
            sampling=_checked_sampling(start.get("sampling", {})),
        )
    except _Bad as exc:
        raise BlueLMError(f"{path} has a damaged start record ({exc}); delete it or move it away") from None
    for number, record in records[1:]:
        try:
            session._apply(record)
        except _Bad as exc:
            warnings.append(f"{path}: line {number} was skipped ({exc})")
    if repair:
        _read_records(path, repair=True)  # only now that the journal is known to be ours
    session.journal = path
    session.warnings = warnings
    return session


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class SessionInfo:
    name: str
    turns: int
    last_used: datetime  # UTC, from the journal's modification time
    path: Path
    model_id: str


def list_sessions(sessions_dir: Path) -> list[SessionInfo]:
    """Sessions with a readable journal in ``sessions_dir``, most recently used first."""
    sessions_dir = Path(sessions_dir)
    if not sessions_dir.is_dir():
        return []
    infos = []
    for path in sessions_dir.glob(f"*{JOURNAL_SUFFIX}"):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            session = _replay(path, repair=False)
            mtime = path.stat().st_mtime
        except (BlueLMError, OSError):
            continue
        infos.append(
            SessionInfo(
                name=session.name,
                turns=len(session.turns),
                last_used=datetime.fromtimestamp(mtime, tz=timezone.utc),
                path=path,
                model_id=session.model_id,
            )
        )
    infos.sort(key=lambda info: (info.last_used, info.name), reverse=True)
    return infos
