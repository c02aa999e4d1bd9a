"""The `bluelm` command line: options → settings, commands → engine, errors → one line and an exit status.

This module is the group: it reads the command line (the spellings click can't take), turns every error
into one `Error: …` line and an exit status, and registers the commands, each in its own module (ask,
chat_command, config_command, sessions, bench_command, export_command; what several share is in common).
Heavy modules (torch, transformers, the engine) are imported inside the commands that need them, so
`bluelm --help`, `--version` and option errors start instantly.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from bluelm_cli import __version__
from bluelm_cli.cli.ask import ask
from bluelm_cli.cli.bench_command import bench
from bluelm_cli.cli.chat_command import chat
from bluelm_cli.cli.click_compat import ClickAbort as _ClickAbort
from bluelm_cli.cli.click_compat import ClickUsageError as _ClickUsageError
from bluelm_cli.cli.common import _print_error, _silence_closed_stdout
from bluelm_cli.cli.config_command import show_config
from bluelm_cli.cli.export_command import export
from bluelm_cli.cli.options import HelpCommand
from bluelm_cli.cli.sessions import sessions_app
from bluelm_cli.core.errors import BlueLMError, ExitStatus, UsageError


class _BlueLMGroup(TyperGroup):
    """Runs commands without click's standalone error printing: every error is one `Error: …` line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        argv = _one_name_for_new_tokens(_bare_resume_means_last(argv, self._option_names(argv)))
        debug = "--debug" in argv
        extra.pop("standalone_mode", None)
        try:
            _refuse_undecodable(argv)
            status = super().main(args=argv, prog_name=prog_name or "bluelm", standalone_mode=False, **extra)
        except _ClickUsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":
                # No arguments: the help is the message (plain click) or already printed (rich); not an error line.
                if error.format_message().strip():
                    sys.stdout.write(error.format_message().rstrip("\n") + "\n")
            else:
                command = error.ctx.command_path if error.ctx else "bluelm"
                _print_error(f"{_usage_message(error, argv)} (see '{command} --help')")
            status = ExitStatus.USAGE
        except _ClickAbort:
            status = ExitStatus.INTERRUPTED
        except BlueLMError as error:
            if debug:
                traceback.print_exc()
            _print_error(str(error))
            status = error.exit_status
        except KeyboardInterrupt:
            status = ExitStatus.INTERRUPTED
        except BrokenPipeError:
            _silence_closed_stdout()
            status = ExitStatus.OK
        except Exception as error:  # noqa: BLE001 - the last resort keeps the one-line promise
            if debug:
                traceback.print_exc()
            _print_error(f"{type(error).__name__}: {error} (run again with --debug for the traceback)")
            status = ExitStatus.ERROR
        sys.exit(int(status or 0))

    def _option_names(self, argv: list[str]) -> set[str]:
        """The option names (--model, -n, …) of the command that argv runs (none when it names no command)."""
        for arg in argv:
            command = self.commands.get(arg)
            if command is not None:
                return {name for param in command.params for name in (*param.opts, *param.secondary_opts)
                        if name.startswith("-")}
        return set()

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # typer itself would exit 1; a reader that went away (`| head`) is no error
            _silence_closed_stdout()
            return ExitStatus.OK


def _refuse_undecodable(argv: list[str]) -> None:
    """An argument that is not UTF-8 (Python keeps its bytes as lone surrogates) would fail much later,
    in the tokenizer or the journal, with a message naming neither; refuse it first, naming it."""
    for argument in argv:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError as error:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise UsageError(
                f"the argument '{shown}' is not valid UTF-8 (byte {error.start}); convert it first, e.g. with iconv -t UTF-8"
            ) from None


def _usage_message(error: Exception, argv: Sequence[str] = ()) -> str:
    """click's message, with an unknown option's suggestions kept only when they are close (click offers
    `--truncate` for `--frobnicate`)."""
    name = getattr(error, "option_name", None)
    possibilities = getattr(error, "possibilities", None)
    context = getattr(error, "ctx", None)
    command = getattr(context, "command", None)
    moved = _MOVED_OPTIONS.get((getattr(command, "name", None), name))
    if moved:
        return f"No such option: {name}; {moved}"
    dashed = _dashed_argument(context, name, argv)
    if dashed:
        return f"No such option: {name}; {dashed}"
    if name and possibilities is not None:
        import difflib

        close = difflib.get_close_matches(name, list(possibilities), n=1, cutoff=0.75)
        return f"No such option: {name}" + (f"; did you mean {close[0]}?" if close else "")
    return error.format_message()  # type: ignore[attr-defined]


def _dashed_argument(context: Any, name: str | None, argv: Sequence[str]) -> str | None:
    """For `bluelm sessions show|rm|search`, whose argument may start with '-' (`ask --session=-x` makes such a
    session): click reads `-dash` as options and says only "No such option: -d"; say how to pass it."""
    parent = getattr(context, "parent", None)
    verb = getattr(getattr(context, "command", None), "name", None)
    if not name or getattr(getattr(parent, "command", None), "name", None) != "sessions" or verb not in ("show", "rm", "search"):
        return None
    known = {option for param in context.command.params for option in (*param.opts, *param.secondary_opts)}
    typed = next((arg for arg in argv if arg.startswith(name) and arg not in known and arg != "--"), None)
    if typed is None or typed.startswith("--"):
        return None  # a mistyped long option (--jsn): click's suggestion says more
    what = "text" if verb == "search" else "name"
    return f"a {what} starting with '-' goes after '--': bluelm sessions {verb} -- {typed}"


# Short options that mean one thing everywhere now: (command, option) → what to use instead.
_MOVED_OPTIONS = {
    ("export", "-f"): "the format is --format hf|gguf, or the name of OUT (model.gguf is GGUF); -f is --file in bluelm ask",
}


def _one_name_for_new_tokens(argv: list[str]) -> list[str]:
    """`--new-tokens` is another name for `--max-new-tokens` in every command (bench had the one, chat and ask
    the other); translated here so that --help lists the option once."""
    out: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        if arg == "--new-tokens" or arg.startswith("--new-tokens="):
            arg = "--max-new-tokens" + arg[len("--new-tokens"):]
        out.append(arg)
    return out


def _bare_resume_means_last(argv: list[str], option_names: set[str]) -> list[str]:
    """`bluelm chat --resume` alone continues the most recent session (click options can't have optional values):
    so does `--resume` followed by one of the command's options (`--resume -v`) or `--`. Anything else that
    follows is the name, even one starting with '-' (`--resume -x`), as session names may."""
    for index, arg in enumerate(argv):
        if arg == "--":
            return argv
        if arg == "--resume" and (index + 1 == len(argv) or _is_option(argv[index + 1], option_names)):
            return argv[: index + 1] + ["last"] + argv[index + 1 :]
    return argv


def _is_option(arg: str, option_names: set[str]) -> bool:
    """An option of the command as click reads it: `--model`, `--model=m`, `-n`, or `-n3` / `-vc` (a short
    option with its value or others after it)."""
    if arg == "--":
        return True
    if arg.startswith("--"):
        return arg.split("=", 1)[0] in option_names
    return arg.startswith("-") and len(arg) > 1 and arg[:2] in option_names


app = typer.Typer(
    cls=_BlueLMGroup,
    name="bluelm",
    help="Chat with vivo's BlueLM-7B models from a terminal.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"bluelm-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True)
    ] = False,
) -> None:
    """Chat with vivo's BlueLM-7B models from a terminal."""



# The commands, in the order --help lists them; each lives in its own module.
app.command(cls=HelpCommand, short_help="Answer one question and exit; plain text when piped.")(ask)
app.command(cls=HelpCommand, short_help="Chat in the terminal: multi-turn, streaming, /help for commands.")(chat)
app.command("config", cls=HelpCommand, short_help="Show the effective settings, their sources, and the paths.")(show_config)
app.add_typer(sessions_app, name="sessions", short_help="List, show, remove or search saved chat sessions.")
app.command(cls=HelpCommand, short_help="Measure load, time to first token per turn, and decode speed.")(bench)
app.command("export", cls=HelpCommand, short_help="Write the model as plain Llama for vLLM, SGLang, TGI (hf) or llama.cpp, ollama (gguf).")(export)


def _fill_closed_standard_descriptors() -> None:
    """Put /dev/null on descriptors 0-2 where they were closed (as git does): else the next file opened
    (a session journal) gets the number, and whatever writes to "stderr" (a C library, a warning) writes
    into it."""
    spare = os.open(os.devnull, os.O_RDWR)
    while spare <= 2:
        spare = os.open(os.devnull, os.O_RDWR)
    os.close(spare)


def main() -> None:
    _fill_closed_standard_descriptors()
    if sys.stdin is None:  # started with stdin closed (`<&-`): it reads as empty
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - for the life of the process
    if sys.stderr is None:  # started with stderr closed (`2>&-`): the chat goes on; its notes go nowhere
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the life of the process
    from bluelm_cli.ui.tolerant_stderr import TolerantStderr

    sys.stderr = TolerantStderr(sys.stderr)  # type: ignore[assignment] - a full disk under stderr ends nothing
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to answer
        if sys.stderr is not None:
            sys.stderr.write("Error: standard output is closed; give bluelm a terminal, a file or a pipe to write to\n")
        sys.exit(ExitStatus.ERROR)
    app()
