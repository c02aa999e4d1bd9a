"""The one sanitiser for text that reaches a terminal from a file, a server, the model or the user.

C0 controls other than tab and newline, DEL and C1 controls are shown as U+FFFD: a model, a shared
session file or a server can emit them (ESC sequences included), and written raw they would move the
cursor, clear or recolour the screen, retitle the window or write the clipboard (OSC 52).

The bidirectional embedding, override and isolate controls (U+202A–202E, U+2066–2069) are shown as
U+FFFD too: they reorder what follows them on the line ("Trojan Source", CVE-2021-42574), so a session
name, a file name or a model id could display as something it is not.
"""

from __future__ import annotations

import re

__all__ = ["safe_for_terminal"]

_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def safe_for_terminal(text: str) -> str:
    """Text with terminal control characters and bidi overrides shown as U+FFFD."""
    return _TERMINAL_CONTROLS.sub("\ufffd", text)
