"""The one place bluelm relies on how rich's `Live` erases its region, behind a version guard.

`Live` redraws its region by moving the cursor up over the shape it drew last. After a resize (the
terminal reflowed those lines) or a Ctrl-Z / `fg` (the shell printed below them), that shape is no longer
what the screen holds, and rich has no public way to be told so. `Live` keeps the shape on its
`LiveRender` (`_live_render._shape`) in every rich from 13.8 to 15.x (pyproject.toml declares >= 13.8);
CI runs the tests at both ends. Outside that range, or if the attribute is gone, these functions
degrade to doing nothing: rich then erases by the old shape (a few stale lines after a resize), which
is cosmetic, never a crash.
"""

from __future__ import annotations

from typing import Any

import rich
from rich.live import Live

__all__ = ["drew_region", "forget_region", "SUPPORTED"]


def _rich_version() -> tuple[int, ...]:
    from importlib.metadata import version

    try:
        return tuple(int(part) for part in version("rich").split(".")[:2])
    except (ValueError, Exception):  # noqa: BLE001 - an odd version string: treat as unknown
        return (0,)


SUPPORTED = (13, 8) <= _rich_version() < (16, 0)
_ = rich  # imported so a broken rich fails here, at import, rather than mid-answer


def _live_render(live: Live) -> Any | None:
    if not SUPPORTED:
        return None
    render = getattr(live, "_live_render", None)
    return render if render is not None and hasattr(render, "_shape") else None


def drew_region(live: Live) -> bool:
    """Whether `live` believes its region is on the screen (it will erase that shape on the next draw)."""
    render = _live_render(live)
    return render is not None and render._shape is not None


def forget_region(live: Live) -> None:
    """Tell `live` the screen no longer holds its region, so the next draw starts where the cursor is."""
    render = _live_render(live)
    if render is not None:
        render._shape = None
