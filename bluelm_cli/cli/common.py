"""What more than one command uses: the options that are not settings, resolving the settings, the
one-line error, the stderr console, and how a resumed session's model and sampling are chosen."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.config.settings import ResolvedSettings, resolve_settings

if TYPE_CHECKING:
    from rich.console import Console

    from bluelm_cli.session import Session


# -------------------------------------------------------------------------------------- shared options
# Options that are not settings; the settings' options come from the settings table (cli_options).
Load8Opt = Annotated[bool, typer.Option("--load-in-8bit", help="8-bit weights via bitsandbytes (CUDA).")]
Load4Opt = Annotated[bool, typer.Option(
    "--load-in-4bit", help="4-bit weights via bitsandbytes (CUDA); a 4-bit release (Chat-4bits, -AWQ, -GPTQ) keeps its own, on any device.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Timing and token statistics on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", show_default=False,
                      help="API key for --api (visible in ps: prefer env BLUELM_API_KEY or --api-key-file).")]
ApiKeyFileOpt = Annotated[Optional[str], typer.Option("--api-key-file", metavar="PATH", show_default=False,
                          help="Read the API key for --api from the first line of this file.")]


def _resolve(flags: dict[str, Any]) -> tuple[ResolvedSettings, UserPaths]:
    paths = user_paths()
    return resolve_settings(flags, os.environ, paths.config_file), paths


def _stderr_console() -> Console:
    from rich.console import Console

    # Status lines word-wrap on a terminal; into a file or a pipe each stays one line.
    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def _print_error(message: str) -> None:
    from bluelm_cli.core.sanitize import safe_for_terminal

    line = f"Error: {safe_for_terminal(message)}"
    if sys.stderr.isatty():  # wrapped at word boundaries to the terminal's width; one line into a file or pipe
        import shutil
        import textwrap

        width = shutil.get_terminal_size().columns
        line = textwrap.fill(line, width=max(width - 1, 20), break_long_words=False, break_on_hyphens=False)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _silence_closed_stdout() -> None:
    # The reader went away (`| head`): further writes, including the interpreter's final flush, must not raise.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass



def _explicit_sampling(settings: ResolvedSettings) -> dict[str, Any]:
    """Sampling values the user gave on this command line; they override a resumed session's."""
    from bluelm_cli.core.settings import SAMPLING_KEYS

    return {key: settings[key] for key in SAMPLING_KEYS if settings.source_of(key) == "flag"}


def _recorded_model_id(model_id: str) -> str:
    """The model as a session records it: a local folder as an absolute path, so that `--resume` finds it
    from any directory; a hub id or a served model's name as it is."""
    folder = Path(model_id).expanduser()
    return str(folder.resolve()) if folder.is_dir() else model_id


def _use_session_model(settings: ResolvedSettings, resumed: Session | None, errors: Console) -> None:
    """A resumed session continues with the model it was recorded with, unless --model is given (or --api:
    a served model is whatever the server runs). Says so when that is not the configured model."""
    if resumed is None or settings["api"] or settings.source_of("model") == "flag":
        return
    recorded, configured = resumed.model_id, settings["model"]
    if not recorded or recorded == configured:
        return
    if not (Path(recorded).expanduser().is_dir() or _is_hub_id(recorded)):
        errors.print(
            f"Warning: session {resumed.name} was recorded with {recorded}, which is not on this machine;"
            f" continuing it with {configured} (--model chooses another)", style="yellow", markup=False,
        )
        return
    settings.use_model(recorded, f"session {resumed.name}")
    errors.print(
        f"Continuing session {resumed.name} with its model {recorded} (the configured model is {configured};"
        " --model chooses another)", style="dim", markup=False, highlight=False,
    )


def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and " " not in model



def _local_checkpoint(model: str) -> Path | None:
    """The model's folder when it is on this machine (a folder, or a hub id already in the cache)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent
    return None

