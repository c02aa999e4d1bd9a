"""The version-guarded adapters over our dependencies (ui/rich_live, cli/click_compat).

CI runs the whole suite twice, at current releases and at the floor of each declared range
(.ci/floor-constraints.txt), so these tests run at both ends of rich's and typer's ranges.
"""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text
from typer.testing import CliRunner

from bluelm_cli.cli.click_compat import ClickAbort, ClickUsageError
from bluelm_cli.ui import rich_live


def _terminal_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=40, height=10, color_system=None), out


def test_the_installed_rich_is_in_the_supported_range():
    assert rich_live.SUPPORTED


def test_a_live_region_is_known_drawn_after_a_refresh_and_forgotten_on_request(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")  # rich draws no live region on a dumb terminal
    console, out = _terminal_console()
    live = Live(Text("one\ntwo\nthree"), console=console, auto_refresh=False, transient=False)
    with live:
        live.refresh()
        assert rich_live.drew_region(live)
        rich_live.forget_region(live)
        assert not rich_live.drew_region(live)
        before = len(out.getvalue())
        live.update(Text("four"), refresh=True)
        # Forgotten: the next draw does not move the cursor up over the three old lines.
        assert "\x1b[1A" not in out.getvalue()[before:]


def test_without_the_attribute_the_adapter_does_nothing(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    console, _ = _terminal_console()
    live = Live(Text("x"), console=console, auto_refresh=False)
    monkeypatch.setattr(rich_live, "SUPPORTED", False)
    with live:
        live.refresh()
        assert not rich_live.drew_region(live)
        rich_live.forget_region(live)  # no error


def test_typers_usage_error_and_abort_are_the_ones_it_raises():
    app = typer.Typer()

    @app.command()
    def main(count: int) -> None:
        raise typer.Abort()

    with pytest.raises(ClickUsageError):
        app(["not-a-number"], standalone_mode=False)
    with pytest.raises(ClickAbort):
        app(["3"], standalone_mode=False)
    assert CliRunner().invoke(app, ["3"]).exit_code == 1
