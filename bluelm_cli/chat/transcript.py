"""Saved conversations: JSON that `/load` reads back, and Markdown transcripts for reading.

``/save x.json`` writes ``{"format": "bluelm-cli.session", "version": 1, "model_id", "system", "sampling",
"context_start", "turns", "saved_at", "name"}``; ``/save x.md`` writes a Markdown transcript (it cannot be
loaded back). Saving is atomic: a temporary file in the same directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from bluelm_cli.chat.conversation import (
    BadRecord,
    Conversation,
    checked_context_start,
    checked_sampling,
    checked_system,
    checked_turns,
    utc_now,
)
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.chat.journal import JOURNAL_SUFFIX, fsync_dir, reason, replay
from bluelm_cli.core.sanitize import safe_for_terminal

FORMAT = "bluelm-cli.session"
VERSION = 1
MARKDOWN_SUFFIXES = (".md", ".markdown")
MAX_LOAD_BYTES = 1 << 30


def to_json_dict(conversation: Conversation) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": conversation.name,
        "model_id": conversation.model_id,
        "system": conversation.system,
        "sampling": dict(conversation.sampling),
        "context_start": conversation.context_start,
        "turns": [t.to_dict() for t in conversation.turns],
        **({"pending": conversation.pending} if conversation.pending is not None else {}),
        "saved_at": utc_now(),
    }


def to_markdown(conversation: Conversation) -> str:
    lines = [f"# BlueLM chat: {conversation.name}" if conversation.name else "# BlueLM chat", ""]
    lines.append(f"- Model: `{conversation.model_id}`")
    lines.append(f"- Saved: {utc_now()}")
    # A transcript is for reading, with `cat` as often as not: no control character may reach the terminal.
    if conversation.system:
        lines += ["", "**System:**", "", safe_for_terminal(conversation.system)]
    for number, turn in enumerate(conversation.turns, start=1):
        lines += ["", "---", "", f"## Turn {number}", "", "**You:**", "", safe_for_terminal(turn.user), "", "**BlueLM:**", ""]
        answer = safe_for_terminal(turn.answer)
        note = FinishReason(turn.finish_reason).transcript_note
        if note:
            answer = f"{answer} {note}" if answer.strip() else note
        lines.append(answer)
    if conversation.pending is not None:
        lines += ["", "---", "", "## Not answered", "", "**You:**", "", safe_for_terminal(conversation.pending)]
    return "\n".join(lines) + "\n"


def save(conversation: Conversation, path: Path) -> Path:
    """Write the conversation: Markdown transcript if the suffix is .md/.markdown, JSON otherwise.

    Atomic: an existing file is replaced only by a complete new one. Returns the path written."""
    path = Path(path).expanduser()
    _refuse_a_file_bluelm_did_not_write(path)
    markdown = path.suffix.lower() in MARKDOWN_SUFFIXES
    text = to_markdown(conversation) if markdown else json.dumps(to_json_dict(conversation), ensure_ascii=False, indent=2) + "\n"
    atomic_write(path, text.encode("utf-8"))
    return path


# How every file /save writes begins (JSON: json.dumps puts "format" first; Markdown: the title line).
_JSON_SAVE = re.compile(rb'\A\s*\{\s*"format"\s*:\s*"' + re.escape(FORMAT.encode()) + rb'"')
_MARKDOWN_SAVE = b"# BlueLM chat"


def _refuse_a_file_bluelm_did_not_write(path: Path) -> None:
    """An existing file is replaced only if it is empty or an earlier /save: `/save notes.md` over the user's
    own notes (or `/save /etc/passwd` as root) must not destroy them. Anything that is not a regular file is
    left to atomic_write, which says what it is; a file that can't be read is left to it too."""
    try:
        target = Path(os.path.realpath(path))
        if not stat.S_ISREG(target.stat().st_mode):
            return
        with open(target, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return
    if not head or _JSON_SAVE.match(head) or head.startswith(_MARKDOWN_SAVE):
        return
    raise BlueLMError(f"cannot save to {path}: it exists and bluelm did not write it; choose another name, or remove it first")


def load(path: Path) -> Conversation:
    """Read a conversation saved as JSON (or a journal, .jsonl). Never touches any other session.

    Missing, unreadable, corrupt or foreign files raise BlueLMError naming the path."""
    path = Path(path).expanduser()
    if path.suffix.lower() in MARKDOWN_SUFFIXES:
        raise BlueLMError(f"{path} is a Markdown transcript, which is for reading only; load a session saved as .json")
    _refuse_what_is_not_a_session_file(path)
    if path.suffix.lower() == JOURNAL_SUFFIX:
        conversation, _ = replay(path, repair=False)
        return conversation
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BlueLMError(f"no such file: {path}; check the path") from None
    except OSError as exc:
        raise BlueLMError(f"cannot read {path} ({reason(exc)}); check its permissions") from None
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
            raise BadRecord("model_id is missing")
        name = obj.get("name") or path.stem
        if not isinstance(name, str):
            raise BadRecord("name is not a string")
        turns = checked_turns(obj.get("turns", []))
        raw_sampling = obj.get("sampling", {})
        pending = obj.get("pending")
        if pending is not None and not isinstance(pending, str):
            raise BadRecord("the unanswered message is not a string")
        return Conversation(
            name=name,
            model_id=model_id,
            system=checked_system(obj.get("system")),
            # Only the settings the file names: loading it must not reset the others to defaults.
            sampling={key: value for key, value in checked_sampling(raw_sampling).items() if key in raw_sampling},
            turns=turns,
            context_start=checked_context_start(obj.get("context_start"), turns),
            pending=pending,
        )
    except BadRecord as exc:
        raise BlueLMError(f"{path} is a damaged bluelm session ({exc}); it cannot be loaded") from None


def _refuse_what_is_not_a_session_file(path: Path) -> None:
    """Before anything is read (a journal too): a FIFO would wait forever and a device never end."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BlueLMError(f"no such file: {path}; check the path") from None
    except OSError as exc:
        raise BlueLMError(f"cannot read {path} ({reason(exc)}); check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise BlueLMError(f"{path} is a directory; give the path of a saved session (.json)")
    if not stat.S_ISREG(info.st_mode):
        raise BlueLMError(f"{path} is not a regular file; give the path of a saved session (.json)")
    if info.st_size > MAX_LOAD_BYTES:
        raise BlueLMError(f"{path} is {info.st_size // 2**20} MB, more than a saved session can be; check the path")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once (a complete new file or the old one, never half of one).

    A symbolic link is written through (its target is replaced, the link stays); a device, FIFO, socket
    or folder at the path is refused rather than replaced by a regular file."""
    try:
        path = Path(os.path.realpath(path)) if path.is_symlink() else path
    except OSError:
        pass  # a name too long, say: the checks below report it
    mode = None
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        info = None  # the folder checks below say what is wrong
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise BlueLMError(f"cannot save to {_short(path)}: the path is too long; choose a shorter one") from None
        raise BlueLMError(f"cannot save to {path} ({reason(exc)}); choose another path") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise BlueLMError(f"cannot save to {path}: it is a directory; give a file name such as chat.json")
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
            raise BlueLMError(f"cannot save to {path}: it is {kind}, not a regular file; give a file name such as chat.json")
        mode = stat.S_IMODE(info.st_mode)
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise BlueLMError(f"cannot save to {path}: {directory} {what}; create it or choose another path")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name[:200]}.", suffix=".tmp")
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise BlueLMError(f"cannot save to {path}: the file name is too long; choose a shorter one") from None
        raise BlueLMError(f"cannot save to {path}: {directory} is not writable ({reason(exc)})") from None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if mode is not None:
                    os.fchmod(handle.fileno(), mode)  # the replaced file keeps its permissions
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise BlueLMError(f"cannot save to {_short(path)}: the file name is too long; choose a shorter one") from None
        raise BlueLMError(f"cannot save to {path} ({reason(exc)}); the existing file, if any, is unchanged") from None
    fsync_dir(directory)


def _short(path: Path, keep: int = 80) -> str:
    text = str(path)
    return text if len(text) <= keep else f"{text[:40]}…{text[-39:]}"
