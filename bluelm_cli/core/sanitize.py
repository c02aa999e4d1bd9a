"""The one sanitiser for text that reaches a terminal from a file, a server, the model or the user.

C0 controls other than tab and newline, DEL and C1 controls are shown as U+FFFD: a model, a shared
session file or a server can emit them (ESC sequences included), and written raw they would move the
cursor, clear or recolour the screen, retitle the window or write the clipboard (OSC 52).
"""

from __future__ import annotations

import re

_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_for_terminal(text: str) -> str:
    """Text with terminal control characters shown as U+FFFD."""
    return _TERMINAL_CONTROLS.sub("\ufffd", text)
