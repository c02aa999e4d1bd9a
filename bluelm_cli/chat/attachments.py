"""Text files in a message (`/file PATH`, `bluelm ask -f PATH`): read, fenced with their name, measured.

A file becomes a Markdown code block headed by its name, placed before the message it goes with::

    notes.py:
    ```py
    …the file's text…
    ```

Binary files (a NUL byte, or not UTF-8) are refused, and so is a file that cannot fit the context
window even alone, with its size in tokens and bytes. Pure apart from reading the file; no terminal.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.prompt import PromptEncoder, build_prompt_ids

__all__ = ["Attachment", "check_fits", "fenced", "read_attachment", "with_attachments"]

# Far more than any BlueLM context holds (32K tokens is about 100 KB of text): bigger files are refused unread.
MAX_FILE_BYTES = 4 * 1024 * 1024
_BACKTICK_RUN = re.compile(r"`{3,}")


@dataclass(frozen=True)
class Attachment:
    name: str  # as the user gave it (shown to the model and in notes)
    text: str  # the fenced block that goes into the message
    size_bytes: int


def same_file(first: str, second: str) -> bool:
    """Whether two paths as typed name the same file (`x.py`, `./x.py`, `~/x.py`, a link to it)."""
    try:
        return os.path.samefile(Path(first).expanduser(), Path(second).expanduser())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: ~user of an unknown user
        return False


def read_attachment(path_text: str) -> Attachment:
    """Read a text file and fence it with its name. BlueLMError for a missing, binary or huge file."""
    path = Path(path_text).expanduser()
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise BlueLMError(f"{path_text} is a directory; give a text file")
        kind = _SPECIAL_KINDS.get(stat.S_IFMT(info.st_mode))
        if kind is not None:  # reading a terminal or a socket waits for ever; a device is not a text file
            raise BlueLMError(f"{path_text} is {kind}, not a text file; give a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise BlueLMError(f"{path_text} is {_size(info.st_size)}, far more than fits the context window; give a smaller file or an excerpt")
        data = _read_fifo(path, path_text) if stat.S_ISFIFO(info.st_mode) else _read_bounded(path)
        if len(data) > MAX_FILE_BYTES:
            raise BlueLMError(f"{path_text} gives more than {_size(MAX_FILE_BYTES)}, far more than fits the context window; give a smaller file or an excerpt")
    except FileNotFoundError:
        raise BlueLMError(f"no such file: {path_text}") from None
    except OSError as exc:
        raise BlueLMError(f"cannot read {path_text} ({exc.strerror or exc}); check its permissions") from None
    if b"\x00" in data:
        raise BlueLMError(f"{path_text} is a binary file ({_size(len(data))}); only text files can go into a message")
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BlueLMError(
            f"{path_text} is not UTF-8 text (byte {exc.start}); only text files can go into a message"
            " (convert it first, e.g. with iconv -t UTF-8)"
        ) from None
    return Attachment(name=path_text, text=fenced(path_text, content), size_bytes=len(data))


_SPECIAL_KINDS = {
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as file:  # bounded: a file in /proc has no size to check first
        return file.read(MAX_FILE_BYTES + 1)


def _read_fifo(path: Path, path_text: str) -> bytes:
    """A pipe (`-f <(git diff)`, a FIFO a command writes to) up to the limit. Opening a FIFO nothing writes
    to would wait for ever, so it is opened without waiting and refused when no writer is there."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        try:
            first = os.read(fd, MAX_FILE_BYTES + 1)
        except BlockingIOError:  # a writer is there and has not written yet: wait for it, as `cat` does
            first = None
        if first == b"":
            raise BlueLMError(f"{path_text} is a named pipe (FIFO) that nothing writes to; give a regular file")
        os.set_blocking(fd, True)
        chunks = [first] if first else []
        size = len(first or b"")
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fenced(name: str, content: str) -> str:
    """``name:`` and the content in a code fence longer than any backtick run inside it."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(content)), default=2)
    fence = "`" * max(3, longest + 1)
    language = Path(name).suffix.lstrip(".").lower()
    body = content.replace("\r\n", "\n").rstrip("\n")
    return f"{name}:\n{fence}{language}\n{body}\n{fence}"


def with_attachments(attachments: Sequence[Attachment], message: str) -> str:
    """The message as sent: the files' blocks first, each followed by a blank line, then the text."""
    return "\n\n".join([*(attachment.text for attachment in attachments), message]) if attachments else message


def token_count(encoder: PromptEncoder, attachment: Attachment) -> int:
    return len(encoder.encode_plain(attachment.text))


def check_fits(
    encoder: PromptEncoder, system: str | None, attachments: Sequence[Attachment], *, context_limit: int, max_new_tokens: int
) -> None:
    """BlueLMError, naming the sizes, if the files together cannot fit the context even with no history."""
    budget = context_limit - max_new_tokens
    needed = len(build_prompt_ids(encoder, system, [], with_attachments(attachments, "")).ids)
    if needed <= budget:
        return
    last = attachments[-1]
    others = needed - token_count(encoder, last)
    room = max(0, budget - others)
    together = f" (with the {len(attachments) - 1} other attached file{'s' if len(attachments) > 2 else ''})" if len(attachments) > 1 else ""
    raise BlueLMError(
        f"{last.name} is {token_count(encoder, last):,} tokens ({_size(last.size_bytes)}) but at most {room:,} fit"
        f" in the {context_limit:,}-token context window{together} with room for a {max_new_tokens:,}-token answer;"
        " give an excerpt, or lower max_new_tokens"
    )


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes" if size != 1 else "1 byte"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    if size < 1024**3:
        return f"{size / 1024**2:.1f} MB"
    return f"{size / 1024**3:.1f} GB"
