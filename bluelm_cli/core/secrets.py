"""Secrets never shown: the one helper that redacts known secrets (API keys, URL passwords) from text, and the
one that hides the password of a URL (`http://user:***@host/v1`, as curl and git print such URLs).

Every text from a server (error bodies, events, answers) passes through :func:`redact` with the secrets the
client sent, before it is printed or journaled: a server that echoes the Authorization header shows `***`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "***"
# Shorter "secrets" would blank ordinary words of every answer; no real key or password is this short.
MIN_SECRET_CHARS = 4
_USERINFO = re.compile(r"(?i)^(\s*[a-z][a-z0-9+.-]*://)([^/?#@\s]*)@")


def known_secrets(candidates: Iterable[str | None]) -> tuple[str, ...]:
    """The candidates worth redacting (long enough), longest first so a longer secret wins over its part."""
    found = {value for value in candidates if value and len(value) >= MIN_SECRET_CHARS}
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_url(url: str) -> str:
    """The URL with the password of its user info hidden: `http://user:pass@host/v1` → `http://user:***@host/v1`."""
    match = _USERINFO.match(url)
    if match is None:
        return url
    user, colon, _ = match.group(2).partition(":")
    # `http://TOKEN@host`: a lone user name is often the token itself, so it is hidden too.
    userinfo = f"{user}:{REDACTED}" if colon else REDACTED
    return f"{match.group(1)}{userinfo}@{url[match.end():]}"
