"""Copy text to the user's clipboard with the OSC 52 terminal escape sequence.

OSC 52 asks the *terminal emulator* to set its clipboard, so it works over SSH and inside tmux or
screen, where no local clipboard tool could reach the user's desktop. Terminals that don't support it
ignore the sequence silently. Inside tmux the sequence is sent both plain (tmux sets its own buffer and
the outer terminal's clipboard with ``set -g set-clipboard on``) and wrapped for passthrough (``set -g
allow-passthrough on``); inside screen it is wrapped for passthrough.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import TextIO

__all__ = ["MAX_OSC52_BYTES", "copy_to_clipboard", "osc52_sequence"]

# Several terminals (xterm's default, older tmux) drop longer OSC 52 payloads; beyond this we refuse
# rather than have the copy silently fail.
MAX_OSC52_BYTES = 100_000

_ESC = "\x1b"
_BEL = "\x07"
_ST = _ESC + "\\"


def osc52_sequence(text: str, env: Mapping[str, str] = os.environ) -> str:
    """The escape sequence that puts ``text`` on the clipboard, wrapped for tmux or screen if needed."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    sequence = f"{_ESC}]52;c;{payload}{_BEL}"
    if env.get("TMUX"):
        # tmux takes the plain sequence itself with `set-clipboard on`; the DCS-wrapped copy reaches the
        # outer terminal where `allow-passthrough on` is set instead. Setting the clipboard twice is harmless.
        return f"{sequence}{_ESC}Ptmux;{sequence.replace(_ESC, _ESC + _ESC)}{_ST}"
    if env.get("TERM", "").startswith("screen"):
        return f"{_ESC}P{sequence}{_ST}"
    return sequence


def copy_to_clipboard(text: str, stream: TextIO, env: Mapping[str, str] = os.environ) -> int:
    """Write the OSC 52 sequence for ``text`` to ``stream`` (the terminal); return the encoded size.

    Raises ValueError when the text is too large for terminals to accept.
    """
    size = len(base64.b64encode(text.encode("utf-8")))
    if size > MAX_OSC52_BYTES:
        raise ValueError(
            f"the text is too large for the terminal clipboard ({size} bytes encoded, at most {MAX_OSC52_BYTES});"
            " use /save instead"
        )
    stream.write(osc52_sequence(text, env))
    stream.flush()
    return size
