"""`bluelm config`: the effective settings, where each came from, and the user paths."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from bluelm_cli.cli.common import DebugOpt, _local_checkpoint, _resolve, _stderr_console
from bluelm_cli.cli.options import setting_options
from bluelm_cli.cli.startup import api_key_source
from bluelm_cli.config.settings import describe, read_generation_config
from bluelm_cli.core.errors import ExitStatus
from bluelm_cli.ui.show import format_value


@setting_options("model")
def show_config(
    *,
    flags: dict[str, Any],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: DebugOpt = False,
) -> int:
    """Show the effective settings, where each came from, and the user paths."""
    settings, paths = _resolve(flags)
    folder = _local_checkpoint(settings["model"])
    if folder is not None:  # what a chat with this model would use: the checkpoint's own defaults too
        values, problems = read_generation_config(folder)
        for problem in problems:
            _stderr_console().print(f"Warning: {problem}", style="yellow", markup=False)
        settings.apply_checkpoint_defaults(values)
    rows = describe(settings)
    # The API key is no setting (a key in the config file would be shown here); only whether one is set.
    key_source = api_key_source(None)
    rows.append(("api_key", "(set, not shown)" if key_source else None, key_source or "default"))
    path_rows = {
        "config_file": str(paths.config_file),
        "sessions_dir": str(paths.sessions_dir),
        "history_file": str(paths.history_file),
    }
    if as_json:
        payload = {"settings": {name: {"value": value, "source": source} for name, value, source in rows}, "paths": path_rows}
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return ExitStatus.OK
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        shown = value if name == "api_key" and value else format_value(value)
        typer.echo(f"{name:<{width}}  {_pad(shown, 28)}  {source}")
    typer.echo("")
    exists = "" if paths.config_file.exists() else "  (not created yet)"
    typer.echo(f"config file   {paths.config_file}{exists}")
    typer.echo(f"sessions      {paths.sessions_dir}")
    typer.echo(f"history       {paths.history_file}")
    return ExitStatus.OK


def _pad(text: str, width: int) -> str:
    """Left-aligned in `width` terminal cells (CJK characters take two)."""
    from rich.cells import cell_len

    return text + " " * max(0, width - cell_len(text))
