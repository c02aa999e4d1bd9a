"""The click exceptions bluelm catches, found through typer's public names.

typer (0.28 to 0.29 at least) parses with its own copy of click, so `click.UsageError` is not what it
raises, and the copy lives in the private `typer._click`. Its usage error is the base of the public
`typer.BadParameter`, and its abort is the public `typer.Abort`, so both are reachable without a private
import; an older typer that ran on click itself exposes the same two names.
"""

from __future__ import annotations

import typer

__all__ = ["ClickAbort", "ClickUsageError"]


def _usage_error_class() -> type[Exception]:
    for base in typer.BadParameter.__mro__:
        if base.__name__ == "UsageError":
            return base
    raise ImportError(f"typer {typer.__version__} has no UsageError above BadParameter; bluelm needs typer 0.28 to 0.x")


ClickUsageError: type[Exception] = _usage_error_class()
ClickAbort: type[BaseException] = typer.Abort
