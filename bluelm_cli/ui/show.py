"""What `/show info` and `/show parameters` print: the model in detail, every setting with its source.

Pure: rows of text from a :class:`~bluelm_cli.core.backend.BackendInfo`, the resolved settings and the
chat's session; the command prints them.
"""

from __future__ import annotations

import json
from typing import Any

from bluelm_cli.core.backend import BackendInfo
from bluelm_cli.config.settings import ResolvedSettings
from bluelm_cli.core.settings import GENERATION_KEYS, SPECS, shown_value

__all__ = ["format_value", "info_rows", "parameter_rows"]


def format_value(value: Any) -> str:
    """A setting's value as `bluelm config` prints it: strings quoted, booleans lower case."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def info_rows(info: BackendInfo) -> list[tuple[str, str]]:
    rows = [
        ("model", info.model_id),
        ("architecture", info.architecture or "(unknown)"),
        ("parameters", _parameters(info.parameters)),
        ("context", f"{info.context_limit:,} tokens"),
        ("dtype", info.dtype),
        ("device", info.device),
        ("quantization", info.quantization or "none"),
    ]
    if info.origin:
        rows.append(("from", info.origin))
    return rows


def parameter_rows(
    settings: ResolvedSettings | None, session_values: dict[str, Any], session_name: str
) -> list[tuple[str, str, str]]:
    """(name, value, source) for every setting. Values the running session holds (its sampling and system
    prompt) are shown as it has them; one that differs from the resolved value was set in the session."""
    rows: list[tuple[str, str, str]] = []
    for name in SPECS:
        if name in session_values:
            value = session_values[name]
            if settings is not None and settings[name] == value:
                source = settings.source_of(name)
            else:
                source = f"session {session_name} (/set, /load or --resume)"
        elif settings is not None:
            value, source = settings[name], settings.source_of(name)
        else:
            continue
        rows.append((name, format_value(shown_value(name, value)), source))
    return rows


def session_values(system: str | None, sampling: dict[str, Any]) -> dict[str, Any]:
    return {"system": system, **{key: sampling[key] for key in GENERATION_KEYS}}


def _parameters(count: int | None) -> str:
    if count is None:
        return "(unknown)"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit} ({count:,})"
    return f"{count:,}"
