"""Multi-line messages without bracketed paste: ollama's `\"\"\"` blocks, and a burst of pasted lines.

Where the terminal does not bracket a paste (tmux paste-buffer without -p, some SSH clients), a pasted
block arrives as keystrokes, its newlines as Enter. Two things make it one message:

- a message that begins with `\"\"\"` goes on, line after line, until a line ends with `\"\"\"` (as in
  `ollama run`); the quotes are not sent;
- an Enter that is followed by more input already waiting (in prompt_toolkit's key queue, or readable
  on the terminal within :data:`BURST_GAP_S`) is a pasted newline, not a send: nobody types the next
  key that fast after Enter.

Lines typed while no prompt was up (the model loading, an answer streaming) also arrive as a burst, but
the terminal was then in its line mode, which turned each Enter into a line feed (ControlJ), where a raw
paste keeps the carriage return (ControlM): each such line is a send of its own, in order.

Such a paste is gathered from prompt_toolkit's key queue and inserted in one piece per read from the
terminal (:func:`take_burst`): inserted key by key, each insertion copies the whole buffer and saves it
for undo, so 10,000 pasted lines took quadratic time and memory (22.6 GB before the kernel killed it).
"""

from __future__ import annotations

import select
import time

from prompt_toolkit.application import Application
from prompt_toolkit.input import Input
from prompt_toolkit.input.typeahead import get_typeahead
from prompt_toolkit.key_binding import KeyPress, KeyPressEvent
from prompt_toolkit.keys import Keys

__all__ = [
    "BURST_GAP_S", "QUOTES", "block_is_open", "input_is_pending", "is_plain_key", "keys_waiting", "take_burst",
    "take_typed_ahead", "unwrap_block",
]

QUOTES = '"""'
# Keystrokes of a paste follow each other within microseconds (a few ms if a network splits them);
# typing the next key after Enter takes a person 100 ms or more.
BURST_GAP_S = 0.01
_MOST_READS = 10_000  # take_typed_ahead reads at most this many times (1 KiB each) from the terminal


def block_is_open(text: str) -> bool:
    """Whether `text` starts a `\"\"\"` block that no line has closed yet."""
    stripped = text.strip()
    if not stripped.startswith(QUOTES):
        return False
    return len(stripped) < 2 * len(QUOTES) or not stripped.endswith(QUOTES)


def unwrap_block(text: str) -> str:
    """The message inside a closed `\"\"\"` block (the text itself if it is not one)."""
    stripped = text.strip()
    if len(stripped) >= 2 * len(QUOTES) and stripped.startswith(QUOTES) and stripped.endswith(QUOTES):
        return stripped[len(QUOTES) : -len(QUOTES)].strip("\n")
    return text


def input_is_pending(event: KeyPressEvent, gap_s: float = BURST_GAP_S) -> bool:
    """Whether more keys follow this one as part of the same burst (a paste, not typing).

    A key already read decides: text (a character, Tab, Enter, a line feed) goes on a paste; anything else
    (Ctrl-D, an arrow, Ctrl-C) is in no paste, so the Enter before it was typed, as in `tmux send-keys
    hello Enter C-d`, which arrives in one read. With none read yet, input on the terminal within `gap_s`."""
    app = event.app
    deadline = time.monotonic() + gap_s
    while True:
        waiting = _keys_in_queue(app)
        if waiting:
            return _goes_on_a_paste(waiting[0])
        if not _take_readable(app, max(0.0, deadline - time.monotonic())):
            return False


def keys_waiting(app: Application[object], gap_s: float = 0.0) -> bool:
    """Whether keys wait in prompt_toolkit's queue, or on the terminal within `gap_s` (a cursor position
    report, the terminal's answer to the renderer, is no key: Ctrl-L asks for one)."""
    deadline = time.monotonic() + gap_s
    while not _keys_in_queue(app):
        if not _take_readable(app, max(0.0, deadline - time.monotonic())):
            return False
    return True


def _take_readable(app: Application[object], timeout: float) -> bool:
    """Read what arrives on the terminal within `timeout` into the key queue, behind the keys there (the
    key processor handles them next, in order). False when nothing came.

    Readable input is not yet a key: after Ctrl-L (the renderer erases the screen and asks the terminal
    where the cursor is) the terminal's answer, a cursor position report, arrives within a millisecond or
    two; taken for more of a burst, it turned `C-l /show system Enter` sent at once into a newline."""
    if not _readable(app.input, timeout):
        return False
    keys = app.input.read_keys()
    if not keys:  # half an escape sequence (its rest comes, or the flush timeout ends it), or the end of input
        return False
    app.key_processor.feed_multiple(keys)
    return True


def _keys_in_queue(app: Application[object]) -> list[KeyPress]:
    """The keys read from the terminal and not yet processed (without cursor position reports and flushes)."""
    return [key for key in app.key_processor.input_queue if key.key != Keys.CPRResponse and key.data != "_Flush"]


def _goes_on_a_paste(key_press: KeyPress) -> bool:
    return is_plain_key(key_press) or key_press.key in (Keys.ControlI, Keys.ControlM, Keys.ControlJ)


def _readable(pt_input: Input, timeout: float) -> bool:
    try:
        fileno = pt_input.fileno()
    except (NotImplementedError, OSError, ValueError):
        return False
    try:
        ready, _, _ = select.select([fileno], [], [], timeout)
    except (OSError, ValueError):
        return False
    return bool(ready)




def is_plain_key(key_press: KeyPress) -> bool:
    """A printable character as typed (not Enter, not a control key or an escape sequence)."""
    key = key_press.key
    return not isinstance(key, Keys) and len(key) == 1 and key.isprintable()


def take_burst(event: KeyPressEvent) -> str:
    """The text of the keys waiting behind this one in the same burst, taken off the key queue: characters,
    tabs, and Enters that have more text behind them (pasted newlines). It stops at any other key, and
    before an Enter with nothing or no text behind it, which the Enter binding decides on (a pasted
    newline, or the send)."""
    queue = event.app.key_processor.input_queue
    parts: list[str] = []
    while queue:
        key_press = queue[0]
        if is_plain_key(key_press):
            parts.append(key_press.key)
        elif key_press.key == Keys.ControlI:
            parts.append("\t")
        elif key_press.key == Keys.ControlM and len(queue) > 1 and _goes_on_a_paste(queue[1]):
            parts.append("\n")  # a pasted newline (a line typed ahead ends in ControlJ, a send; see input_is_pending)
        else:
            break
        queue.popleft()
    return "".join(parts)


def take_typed_ahead(pt_input: Input) -> str:
    """The text typed but not taken by a prompt, taken off: prompt_toolkit's typeahead (keys read behind a
    line that was sent) and the lines waiting on the terminal (typed while no prompt was up). For a chat
    that ends before a prompt takes them: what it leaves unread on the terminal, the shell runs as commands.

    Only text comes back (line ends as newlines); keys such as arrows or Ctrl-D are dropped. Never blocks:
    on a terminal in its line mode, a last line without Enter stays there."""
    keys = list(get_typeahead(pt_input))
    for _ in range(_MOST_READS):
        if not _readable(pt_input, 0):
            break
        keys += pt_input.read_keys()
        if pt_input.closed:
            break
    keys += pt_input.flush_keys()
    parts: list[str] = []
    for key_press in keys:
        if is_plain_key(key_press):
            parts.append(key_press.key)
        elif key_press.key == Keys.ControlI:
            parts.append("\t")
        elif key_press.key in (Keys.ControlJ, Keys.ControlM):
            parts.append("\n")
        elif key_press.key == Keys.BracketedPaste:
            parts.append(key_press.data.replace("\r\n", "\n").replace("\r", "\n"))
    return "".join(parts)
