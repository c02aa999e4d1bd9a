"""The crash-safe session journal on disk: create, append (fsync'd), read back with repair, list.

A journal is ``<sessions_dir>/<name>.jsonl``: one JSON record per line (see
:mod:`bluelm_cli.chat.conversation`), each appended with a single ``write`` of the whole line, then fsync'd
before the call returns, so Ctrl-C, SIGTERM, SIGHUP or a crash never loses a finished turn. The first
record is ``{"type": "start", "version": 1, "name", "model_id", "system", "sampling", "created_at"}``.

Reading back, a last line cut short by a crash is dropped (and cut off the file so that later appends
start on a fresh line); every complete record is recovered; a damaged line elsewhere is skipped and
reported.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import tempfile
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bluelm_cli.chat.conversation import BadRecord, Conversation, checked_sampling, checked_system
from bluelm_cli.core.errors import BlueLMError, UsageError

VERSION = 1
JOURNAL_SUFFIX = ".jsonl"
_RECORD_TYPES = ("turn", "reset", "undo", "set", "drop", "load", "resume")
_NAME_RE = re.compile(r"[\w.-]+")
_MAX_NAME = 100
# A file name is at most 255 bytes on ext4, XFS, btrfs, APFS; the journal's name is the session's plus ".jsonl".
_MAX_NAME_BYTES = 255 - len(JOURNAL_SUFFIX)


def resume_command(name: str) -> str:
    """The command that continues session `name`, ready to paste (a name starting with - needs the = form)."""
    quoted = shlex.quote(name)
    return f"bluelm chat --resume={quoted}" if name.startswith("-") else f"bluelm chat --resume {quoted}"


def _exists_message(name: str, directory: Path) -> str:
    return f"session '{name}' already exists in {directory}; continue it with `{resume_command(name)}`, or choose another name"


class SessionExistsError(UsageError):
    """`Session.new` found a session of that name (perhaps started by another bluelm a moment ago)."""


def validate_session_name(name: str) -> str:
    """The name in NFC if it is usable as a session name (``--session NAME``), else UsageError.

    NFC: the same name typed on macOS (which sends NFD) and on Linux (NFC) is one session, one file."""
    if isinstance(name, str):
        name = unicodedata.normalize("NFC", name)
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
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise UsageError(
            f"session name '{name[:20]}…' is {len(name.encode('utf-8'))} bytes in UTF-8; a session name can be at most"
            f" {_MAX_NAME_BYTES} bytes (about {_MAX_NAME_BYTES // 3} Chinese characters), as it names a file; choose a shorter name"
        )
    return name


def journal_path(sessions_dir: Path, name: str) -> Path:
    return Path(sessions_dir) / f"{validate_session_name(name)}{JOURNAL_SUFFIX}"


def reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def fsync_dir(directory: Path) -> None:
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


def create_started(path: Path, start: Mapping[str, Any], name: str) -> JournalLock:
    """Create the journal `path` holding its start record and already locked, in one step that another
    process sees whole or not at all: the file is written and locked under a temporary name, then linked
    to `path`. SessionExistsError if there is one already (even one made a moment ago by another bluelm)."""
    directory = path.parent
    fd, temporary_name = tempfile.mkstemp(dir=directory, prefix=".new-session.")  # short: the name may be 249 bytes
    temporary = Path(temporary_name)
    try:
        os.close(fd)
        append_record(temporary, start)
        lock = JournalLock.acquire(temporary, name)
        try:
            os.link(temporary, path)
        except FileExistsError:
            lock.release()
            raise SessionExistsError(_exists_message(name, directory)) from None
        except OSError:  # a file system without hard links: exclusive create, then the start record
            lock.release()
            try:
                create_exclusive(path)
            except FileExistsError:
                raise SessionExistsError(_exists_message(name, directory)) from None
            lock = JournalLock.acquire(path, name)
            append_record(path, start)
        return lock
    finally:
        temporary.unlink(missing_ok=True)


def create_exclusive(path: Path) -> None:
    """Create an empty private journal file; FileExistsError if there is one already."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    os.close(fd)


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line and fsync it. Raises OSError, leaving the file as it was: a line
    half-written to a full disk is cut off again, so the next append starts on a fresh line."""
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


# What this process is ("chat", "ask"), for the message a second bluelm gets when it is refused a session
# this one holds; set once by the command that runs (announce_holder).
_holder_command: str | None = None


def announce_holder(command: str | None) -> None:
    """Say which bluelm command ("chat", "ask") this process runs, so that one refused a session it holds
    can name it (None: unnamed)."""
    global _holder_command
    _holder_command = command


def _holder_note(path: Path, key: tuple[int, int]) -> Path:
    """Where the holder of a journal's lock says who it is: beside the journal, named by its inode (the
    lock is taken on a new journal before it gets its name, and a name may be as long as a file name can be)."""
    return path.parent / f".holder-{key[0]}-{key[1]}"


def _write_holder_note(note: Path) -> None:
    """Best effort: without the note a refused bluelm still gets a message, only a less specific one."""
    temporary = note.with_name(f"{note.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps({"pid": os.getpid(), "command": _holder_command}), encoding="utf-8")
        os.replace(temporary, note)
    except OSError:
        temporary.unlink(missing_ok=True)


def _remove_holder_note(note: Path) -> None:
    if _read_holder_note(note)[0] == os.getpid():  # not one a later holder wrote
        note.unlink(missing_ok=True)


def _read_holder_note(note: Path) -> tuple[int | None, str | None]:
    try:
        data = json.loads(note.read_text(encoding="utf-8"))
        pid, command = data["pid"], data["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(command, (str, type(None))):
        return None, None
    return pid, command


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process, alive
        return True
    return True


def live_holder(path: Path, key: tuple[int, int]) -> tuple[int, str] | None:
    """(process id, "chat" or "ask") of the bluelm holding the journal's lock, from the note it left; None
    when there is no note, it names neither, or its process has ended (a crash leaves its note behind)."""
    note = _holder_note(path, key)
    pid, command = _read_holder_note(note)
    if pid is not None and not _alive(pid):
        note.unlink(missing_ok=True)  # left by a bluelm that was killed: nobody else will tidy it
        return None
    if pid is None or command not in ("chat", "ask"):
        return None
    return pid, command


def in_use_message(name: str, holder: tuple[int, str] | None, *, removing: bool = False) -> str:
    """Why session `name` can't be opened (or removed, `removing`) now, naming what holds it (a chat or an
    ask, see live_holder) and what to do."""
    then = "remove it" if removing else "try again"
    if holder is not None and holder[1] == "chat":
        todo = "end that chat first, then remove it" if removing else "continue it there, or end that chat and try again"
        return f"session '{name}' is open in a bluelm chat (process {holder[0]}); {todo}"
    if holder is not None and holder[1] == "ask":
        return (f"session '{name}' is in use by a bluelm ask still answering in it (process {holder[0]}); {then} when"
                " that answer is done")
    return (f"session '{name}' is in use by another bluelm (a chat, or an ask still answering); end that chat or"
            f" wait for the answer, then {then}")


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class JournalLock:
    """An OS lock on a journal, held while a chat (or an ask) has the session open, so a second bluelm can't
    interleave its turns with the first one's. The OS frees it when the process ends: a crashed chat
    never leaves a stale lock. Within one process the lock is shared (counted), not refused. The holder
    leaves a note beside the journal saying what it is, so that a refused bluelm can say so."""

    _held: dict[tuple[int, int], list[Any]] = {}  # (device, inode) -> [fd, holders, holder note]
    _cleanup_registered = False

    def __init__(self, key: tuple[int, int] | None) -> None:
        self._key = key

    @classmethod
    def acquire(cls, path: Path, name: str) -> JournalLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; the journal still works
            return cls(None)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BlueLMError(f"cannot open session journal {path} ({reason(exc)}); check its permissions") from None
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        held = cls._held.get(key)
        if held is not None:
            os.close(fd)
            held[1] += 1
            return cls(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = live_holder(path, key)
            # No holder named: it may have ended a moment ago (its note goes just after its lock): look once more.
            if holder is not None or not _try_lock(fd):
                os.close(fd)
                raise BlueLMError(in_use_message(name, holder)) from None
        except OSError:
            pass  # a file system without locks (some network mounts): go on unlocked
        note = _holder_note(path, key)
        _write_holder_note(note)
        if not cls._cleanup_registered:
            cls._cleanup_registered = True
            atexit.register(cls._remove_notes)  # a process that ends holding locks (`bluelm ask`) leaves no notes
        cls._held[key] = [fd, 1, note]
        return cls(key)

    @classmethod
    def _remove_notes(cls) -> None:
        """At exit: drop the locks, then their notes (in that order: see release)."""
        for key, (fd, _, note) in list(cls._held.items()):
            del cls._held[key]
            os.close(fd)
            _remove_holder_note(note)

    def release(self) -> None:
        key, self._key = self._key, None
        held = self._held.get(key) if key is not None else None
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                del self._held[key]  # type: ignore[arg-type]
                os.close(held[0])  # closing the descriptor drops the lock
                # Then the note (unless a next holder has written its own): a bluelm refused while the note was
                # still there is told who held it; one refused after it went finds the lock free on its second look.
                _remove_holder_note(held[2])


def read_records(path: Path, *, repair: bool) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """Complete JSON records of a journal, with line numbers, and warnings. With ``repair``, a last line
    cut short by a crash is truncated off the file so that later appends start on a fresh line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BlueLMError(f"no such session journal: {path}") from None
    except OSError as exc:
        raise BlueLMError(f"cannot read session journal {path} ({reason(exc)}); check its permissions") from None
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
        raise BlueLMError(f"cannot repair session journal {path} ({reason(exc)}); check its permissions") from None


def replay(path: Path, *, repair: bool) -> tuple[Conversation, list[str]]:
    """The conversation a journal records, and warnings about what had to be skipped."""
    records, warnings = read_records(path, repair=False)
    if not records or records[0][1].get("type") != "start":
        if not warnings or not any(record.get("type") in _RECORD_TYPES for _, record in records):
            raise BlueLMError(f"{path} is not a bluelm session journal (no start record); delete it or move it away")
        # The start record itself was damaged (its line is among the warnings); the turns after it are
        # intact: recover them under the settings' defaults rather than lose the whole session.
        warnings.append(f"{path}: the session's first record was damaged; its model and settings were reset to the defaults")
        records = [(0, {"type": "start", "model_id": "unknown"}), *records]
    start = records[0][1]
    version = start.get("version")
    if isinstance(version, int) and version > VERSION:
        raise BlueLMError(f"{path} was written by a newer bluelm-cli (journal version {version}); upgrade to resume it")
    model_id = start.get("model_id")
    try:
        if not isinstance(model_id, str):
            raise BadRecord("model_id is missing")
        conversation = Conversation(
            name=path.name[: -len(JOURNAL_SUFFIX)] if path.name.endswith(JOURNAL_SUFFIX) else path.stem,
            model_id=model_id,
            system=checked_system(start.get("system")),
            sampling=checked_sampling(start.get("sampling", {})),
        )
    except BadRecord as exc:
        raise BlueLMError(f"{path} has a damaged start record ({exc}); delete it or move it away") from None
    for number, record in records[1:]:
        try:
            conversation.apply(record)
        except BadRecord as exc:
            warnings.append(f"{path}: line {number} was skipped ({exc})")
    if repair:
        read_records(path, repair=True)  # only now that the journal is known to be ours
    return conversation, warnings


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class SessionInfo:
    name: str
    turns: int
    last_used: datetime  # UTC, from the journal's modification time
    path: Path
    model_id: str
    damaged: bool = False  # some records could not be read (what could be read is listed)
    unreadable: str | None = None  # why nothing could be read (then turns is 0)


class NoSavedSessionsError(BlueLMError):
    """`--continue` with nothing to continue (each face says what to do instead)."""

    def __init__(self, sessions_dir: Path, remedy: str = "start a new chat instead") -> None:
        self.sessions_dir = sessions_dir
        super().__init__(f"there are no saved sessions in {sessions_dir} yet; {remedy}")


def find_journal(sessions_dir: Path, name: str | None) -> Path:
    """The journal of session `name`, or of the most recently used readable one (None); BlueLMError if none."""
    sessions_dir = Path(sessions_dir)
    if name is None:
        infos = [info for info in list_sessions(sessions_dir) if info.unreadable is None]
        if not infos:
            raise NoSavedSessionsError(sessions_dir)
        return infos[0].path
    path = journal_path(sessions_dir, name)
    if not path.is_file():
        known = [info.name for info in list_sessions(sessions_dir)]
        hint = f"known sessions: {', '.join(known[:10])}{', …' if len(known) > 10 else ''}" if known else (
            "there are no saved sessions yet"
        )
        raise BlueLMError(f"no session named '{name}' in {sessions_dir}; {hint}")
    return path


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
            mtime = path.stat().st_mtime
        except OSError:
            continue
        last_used = datetime.fromtimestamp(mtime, tz=timezone.utc)
        try:
            conversation, warnings = replay(path, repair=False)
        except BlueLMError as exc:
            infos.append(SessionInfo(path.name[: -len(JOURNAL_SUFFIX)], 0, last_used, path, "unknown", True, str(exc)))
            continue
        infos.append(
            SessionInfo(
                name=path.name[: -len(JOURNAL_SUFFIX)],  # what --resume takes, whatever the start record says
                turns=len(conversation.turns),
                last_used=last_used,
                path=path,
                model_id=conversation.model_id,
                damaged=bool(warnings),
            )
        )
    infos.sort(key=lambda info: (info.last_used, info.name), reverse=True)
    return infos
