"""The `bluelm` command line: options → settings, commands → engine, errors → one line and an exit status.

Heavy modules (torch, transformers, the engine) are imported inside the commands that need them, so
`bluelm --help`, `--version` and option errors start instantly.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from bluelm_cli import __version__
from bluelm_cli.core.errors import BlueLMError, ExitStatus, UsageError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.cli.click_compat import ClickAbort as _ClickAbort
from bluelm_cli.cli.click_compat import ClickUsageError as _ClickUsageError
from bluelm_cli.cli.options import MODEL_SETTINGS, HelpCommand, setting_options
from bluelm_cli.cli.sessions import sessions_app
from bluelm_cli.config.settings import ResolvedSettings, describe, read_generation_config, resolve_settings
from bluelm_cli.ui.show import format_value
from bluelm_cli.cli.startup import (
    api_key_source,
    load_engine_in_background,
    load_local,
    local_engine,
    open_backend,
    quantization_choice,
)
from bluelm_cli.ui.stats import result_json, stats_line

if TYPE_CHECKING:
    from rich.console import Console

    from bluelm_cli.core.backend import AnswerResult
    from bluelm_cli.ui.presenter import PresentedTurn

    from bluelm_cli.core.backend import Backend
    from bluelm_cli.chat.service import Chat, TurnStream
    from bluelm_cli.session import Session


class _BlueLMGroup(TyperGroup):
    """Runs commands without click's standalone error printing: every error is one `Error: …` line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        argv = _one_name_for_new_tokens(_bare_resume_means_last(list(sys.argv[1:] if args is None else args)))
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
                _print_error(f"{_usage_message(error)} (see '{command} --help')")
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


def _usage_message(error: Exception) -> str:
    """click's message, with an unknown option's suggestions kept only when they are close (click offers
    `--truncate` for `--frobnicate`)."""
    name = getattr(error, "option_name", None)
    possibilities = getattr(error, "possibilities", None)
    command = getattr(getattr(error, "ctx", None), "command", None)
    moved = _MOVED_OPTIONS.get((getattr(command, "name", None), name))
    if moved:
        return f"No such option: {name}; {moved}"
    if name and possibilities is not None:
        import difflib

        close = difflib.get_close_matches(name, list(possibilities), n=1, cutoff=0.75)
        return f"No such option: {name}" + (f"; did you mean {close[0]}?" if close else "")
    return error.format_message()  # type: ignore[attr-defined]


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


def _bare_resume_means_last(argv: list[str]) -> list[str]:
    """`bluelm chat --resume` alone continues the most recent session (click options can't have optional values)."""
    for index, arg in enumerate(argv):
        if arg == "--resume" and (index + 1 == len(argv) or argv[index + 1].startswith("-")):
            return argv[: index + 1] + ["last"] + argv[index + 1 :]
    return argv


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


# ---------------------------------------------------------------------------------------------- ask
def _read_prompt(argument: str | None, *, required: bool = True) -> str:
    """stdin (when piped) first, then a blank line, then the argument."""
    parts: list[str] = []
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"standard input is not valid UTF-8 (byte {error.start}); convert it first, e.g. with iconv -t UTF-8") from None
        if text.strip():
            parts.append(text.strip("\n"))
    if argument and argument.strip():
        parts.append(argument)
    if not parts and required:
        raise UsageError("nothing to ask: give a prompt as an argument or on standard input, e.g. bluelm ask '你好'")
    return "\n\n".join(parts)


@app.command(cls=HelpCommand, short_help="Answer one question and exit; plain text when piped.")
@setting_options(*MODEL_SETTINGS)
def ask(
    prompt: Annotated[Optional[str], typer.Argument(help="The question. Piped standard input comes first, then a blank line, then this.", metavar="PROMPT", show_default=False)] = None,
    *,
    flags: dict[str, Any],
    load_in_8bit: Load8Opt = False,
    load_in_4bit: Load4Opt = False,
    raw: Annotated[bool, typer.Option("--raw", help="Plain text even on a terminal.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, finish reason, tokens, timings.")] = False,
    truncate: Annotated[bool, typer.Option("--truncate", help="Trim a prompt that is too long from the front instead of refusing it.")] = False,
    api_key: ApiKeyOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    continue_last: Annotated[bool, typer.Option("--continue", "-c", help="Continue the most recent chat session (journaled like a chat turn).")] = False,
    session_name: Annotated[Optional[str], typer.Option("--session", metavar="NAME", help="Continue the session NAME, or start it if there is none.", show_default=False)] = None,
    files: Annotated[Optional[list[Path]], typer.Option("--file", "-f", help="Put a text file into the question, fenced with its name (repeatable).", metavar="PATH", show_default=False)] = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Answer one question and exit (with -c or --session, as the next turn of a saved chat). Plain text
    when piped, rendered Markdown on a terminal."""
    from bluelm_cli.chat.attachments import check_fits, read_attachment, token_count, with_attachments
    from bluelm_cli.core.sanitize import safe_for_terminal
    from bluelm_cli.ui.ending_signals import ending_signals_interrupt

    settings, paths = _resolve(flags)
    quantization = quantization_choice(load_in_8bit, load_in_4bit)
    attachments = [read_attachment(str(path)) for path in files or []]
    question = _read_prompt(prompt, required=not attachments)
    resumed = _resume_for_ask(paths, continue_last, session_name)
    errors = _stderr_console()
    _use_session_model(settings, resumed, errors)
    backend, model_id = open_backend(settings, quantization, api_key, errors, api_key_file, announce=verbose,
                                     budget_may_shrink=True)
    chat = _ask_chat(backend, settings, model_id, paths, resumed, session_name)
    _fit_answer_budget(chat, settings, question, errors, verbose=verbose)
    if attachments:
        check_fits(chat.backend.encoder, chat.system, attachments, context_limit=chat.context_limit,
                   max_new_tokens=chat.sampling.max_new_tokens)
        for attachment in attachments:
            errors.print(f"Attached {safe_for_terminal(attachment.name)} ({token_count(chat.backend.encoder, attachment):,} tokens)",
                         style="dim", markup=False, highlight=False)
        question = with_attachments(attachments, question).rstrip("\n")
    stream = _start_ask(chat, question, truncate)
    if stream.plan.truncated_from is not None:
        errors.print(
            f"[yellow]Note:[/] the prompt was {stream.plan.truncated_from} tokens; "
            f"kept its last {stream.plan.truncated_to} (--truncate)"
        )
    with ending_signals_interrupt() as ending:
        presented = _show_ask(stream, raw=raw or as_json, quiet=as_json)
    # The turn committed itself (`ask -c`: journaled even when it could not be written out).
    committed, failed, result = presented.committed, presented.write_failure, presented.result
    if committed.journal_error:
        _print_error(committed.journal_error)
    if isinstance(failed, BrokenPipeError):
        raise failed  # the reader went away (`| head`): quietly
    if failed is not None:
        raise BlueLMError(f"the answer could not be written to standard output ({type(failed).__name__}: {failed})")
    if as_json:
        sys.stdout.write(json.dumps(result_json(result), ensure_ascii=False) + "\n")
    if verbose:
        errors.print(stats_line(result), style="dim", markup=False)
    sys.stdout.flush()
    if result.finish_reason is FinishReason.INTERRUPTED:
        errors.print("[dim]Interrupted.[/]")
        return ending.exit_status(otherwise=ExitStatus.INTERRUPTED)
    if result.finish_reason is FinishReason.ERROR:  # a served model failed mid-answer; the partial answer was printed
        _print_error(result.error or "the server failed mid-answer")
        return ExitStatus.ERROR
    return ExitStatus.OK


def _resume_for_ask(paths: UserPaths, continue_last: bool, name: str | None) -> Session | None:
    """The session `ask -c` / `--session NAME` continues (found before the model loads); None for a new one."""
    from bluelm_cli.session import Session, validate_session_name

    if name is not None:
        validate_session_name(name)
        from bluelm_cli.chat.journal import journal_path

        return Session.resume(paths.sessions_dir, name) if journal_path(paths.sessions_dir, name).is_file() else None
    if continue_last:
        return Session.resume(paths.sessions_dir, None)
    return None


def _ask_chat(
    engine: Backend, settings: ResolvedSettings, model_id: str, paths: UserPaths, resumed: Session | None,
    session_name: str | None,
) -> Chat:
    """A resumed session (sampling flags given now override its values), a new named one, or one unjournaled turn."""
    from bluelm_cli.chat.service import Chat
    from bluelm_cli.config.paths import ensure_dir
    from bluelm_cli.session import Session

    if resumed is not None:
        for key, value in _explicit_sampling(settings).items():
            resumed.set_setting(key, value)
        return Chat(engine, resumed)
    if session_name is not None:
        from bluelm_cli.chat.journal import SessionExistsError

        ensure_dir(paths.sessions_dir)
        try:
            session = Session.new(paths.sessions_dir, name=session_name, model_id=_recorded_model_id(model_id), system=settings["system"],
                                  sampling=settings.sampling())
        except SessionExistsError:  # another bluelm started it while this one loaded: continue it (or be refused)
            return _ask_chat(engine, settings, model_id, paths, Session.resume(paths.sessions_dir, session_name), None)
        return Chat(engine, session)
    return _one_shot_chat(engine, settings, model_id)


def _one_shot_chat(engine: Backend, settings: ResolvedSettings, model_id: str) -> Chat:
    """A conversation of one turn that is not journaled (`bluelm ask`)."""
    from bluelm_cli.chat.service import Chat
    from bluelm_cli.session import Session

    session = Session(name="ask", model_id=model_id, system=settings["system"], sampling=settings.sampling().as_dict())
    return Chat(engine, session)


def _start_ask(chat: Chat, question: str, truncate: bool) -> TurnStream:
    from bluelm_cli.core.prompt import ContextOverflowError, SystemPromptTooLongError

    try:
        return chat.send(question, truncate=truncate)
    except SystemPromptTooLongError:
        raise
    except ContextOverflowError as overflow:
        if truncate:
            raise BlueLMError("no room is left for the prompt; lower --max-new-tokens") from None
        raise BlueLMError(f"{overflow} (or pass --truncate to keep only its end)") from None


def _show_ask(stream: TurnStream, *, raw: bool, quiet: bool) -> PresentedTurn:
    """Stream the answer to stdout (rendered on a terminal, plain with --raw or into a pipe, nothing for
    --json) through the presenter the chat uses; the turn commits itself whatever happens on screen."""
    from rich.console import Console

    from bluelm_cli.ui.presenter import present_turn
    from bluelm_cli.ui.render import StreamRenderer

    if quiet:
        return present_turn(stream, _NullRenderer(), interactive=False)
    console = Console(highlight=False)
    plain = raw or not console.is_terminal

    def end_line(result: AnswerResult) -> bool:
        failed_before_any_text = result.finish_reason is FinishReason.ERROR and not result.text
        return plain and not result.text.endswith("\n") and not failed_before_any_text

    return present_turn(
        stream, StreamRenderer(console, markdown=not raw), interactive=console.is_terminal,
        end_line=end_line, write=sys.stdout.write,
    )


class _NullRenderer:
    """`ask --json`: the answer is printed whole, afterwards."""

    def start(self) -> None:
        pass

    def feed(self, delta: str) -> None:
        pass

    def terminal_resized(self) -> None:
        pass

    def terminal_continued(self) -> None:
        pass

    def finish(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- chat
@app.command(cls=HelpCommand, short_help="Chat in the terminal: multi-turn, streaming, /help for commands.")
@setting_options(*MODEL_SETTINGS, "history")
def chat(
    message: Annotated[Optional[str], typer.Argument(help="A first message to send as the chat starts (optional).", metavar="MESSAGE", show_default=False)] = None,
    *,
    flags: dict[str, Any],
    load_in_8bit: Load8Opt = False,
    load_in_4bit: Load4Opt = False,
    continue_last: Annotated[bool, typer.Option("--continue", "-c", help="Continue the most recent session (as --resume alone does).")] = False,
    resume: Annotated[Optional[str], typer.Option("--resume", metavar="[NAME]", help="Continue the most recent session, or the one named NAME.", show_default=False)] = None,
    session_name: Annotated[Optional[str], typer.Option("--session", metavar="NAME", help="Start a new session with this name.", show_default=False)] = None,
    api_key: ApiKeyOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Chat in the terminal: multi-turn, streaming, /help for commands. Reads lines when stdin is piped."""
    from bluelm_cli.chat.background import BackgroundBackend, LoadFailed
    from bluelm_cli.config.paths import ensure_dir
    from bluelm_cli.session import Session, validate_session_name

    settings, paths = _resolve(flags)
    quantization = quantization_choice(load_in_8bit, load_in_4bit)
    if continue_last:
        if resume is not None:
            raise UsageError("use either --continue (-c) or --resume, not both")
        resume = "last"
    if resume is not None and session_name is not None:
        raise UsageError(f"use either {'--continue' if continue_last else '--resume'} or --session, not both")
    if session_name is not None:
        validate_session_name(session_name)
    errors = _stderr_console()
    resumed: Session | None = None
    if resume is not None:
        resumed = Session.resume(paths.sessions_dir, None if resume in ("", "last") else resume)
        _use_session_model(settings, resumed, errors)
    # On a terminal the prompt comes at once and a local model loads behind it; a script (or --api) waits for it.
    background: BackgroundBackend | None = None
    if not settings["api"] and sys.stdin.isatty() and sys.stdout.isatty():
        _early_checkpoint_defaults(settings)
        background = BackgroundBackend(
            lambda progress: load_engine_in_background(settings, quantization, progress),
            status=f"Loading {settings['model']}",
        )
        engine: Any = background
        model_id = settings["model"]
    else:
        engine, model_id = open_backend(settings, quantization, api_key, errors, api_key_file)
    if resumed is not None:
        session = resumed
        for key, value in _explicit_sampling(settings).items():
            session.set_setting(key, value)
    else:
        ensure_dir(paths.sessions_dir)
        session = Session.new(
            paths.sessions_dir,
            name=session_name,
            model_id=_recorded_model_id(model_id),
            system=settings["system"],
            sampling=settings.sampling(),
        )
    from rich.console import Console

    from bluelm_cli.chat.service import Chat
    from bluelm_cli.ui.repl import run_chat

    chat_service = Chat(engine, session)
    on_model_ready = None
    if background is not None and resumed is None:
        on_model_ready = _late_checkpoint_defaults(chat_service, settings, background)
    try:
        status = run_chat(chat_service, console=Console(highlight=False), paths=paths, verbose=verbose,
                          resumed=resumed is not None, on_model_ready=on_model_ready, settings=settings,
                          keep_history=bool(settings["history"]), first_message=message)
    except KeyboardInterrupt:
        status = ExitStatus.INTERRUPTED
    except LoadFailed:
        if resumed is None and not chat_service.session.turns:  # nothing was said: leave no empty session behind
            _discard(chat_service.session)
        raise
    if background is not None:
        background.exit_now_if_loading(status)
    return status


def _discard(session: Any) -> None:
    session.close()
    try:
        session.journal.unlink()
    except OSError:
        pass


def _early_checkpoint_defaults(settings: ResolvedSettings) -> None:
    """The checkpoint's generation_config.json defaults before its weights load, when it is on this machine
    (a new session records them); its warnings come from the load itself."""
    folder = _local_checkpoint(settings["model"])
    if folder is not None:
        settings.apply_checkpoint_defaults(read_generation_config(folder)[0])


def _late_checkpoint_defaults(chat: Chat, settings: ResolvedSettings, background: Any) -> Any:
    """After a first download: the checkpoint's defaults, for the settings the user has not changed since."""
    created_with = settings.sampling().as_dict()

    def apply() -> None:
        changed = settings.apply_checkpoint_defaults(background.loaded.loaded.generation_defaults)
        current = chat.sampling.as_dict()
        for key in changed:
            if current.get(key) == created_with.get(key):
                chat.set_setting(key, settings[key])

    return apply


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


def _fit_answer_budget(chat: Chat, settings: ResolvedSettings, question: str, errors: Console, *, verbose: bool) -> None:
    """`ask` on a model whose context can't hold the default answer budget: lower max_new_tokens to what the
    context leaves after the prompt (a budget given with -n is the user's and is refused as before)."""
    from bluelm_cli.core.prompt import user_segment

    budget = chat.sampling.max_new_tokens
    if settings.source_of("max_new_tokens") == "flag" or budget < chat.context_limit:
        return  # it leaves room for a prompt: older turns are dropped to fit, as in a chat
    prompt = chat.context_used() + len(chat.backend.encoder.encode_plain(user_segment(question)))
    room = chat.context_limit - prompt
    if room >= budget or room < 1:
        return  # it fits; or the prompt alone does not, which the send reports
    chat.set_setting("max_new_tokens", room)
    if verbose:
        errors.print(
            f"Note: max_new_tokens lowered from {budget} to {room}: the model's context is {chat.context_limit}"
            f" tokens and the prompt takes {prompt}", style="dim", markup=False, highlight=False,
        )


# ---------------------------------------------------------------------------------- config, sessions
@app.command("config", cls=HelpCommand, short_help="Show the effective settings, their sources, and the paths.")
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


app.add_typer(sessions_app, name="sessions", short_help="List, show, remove or search saved chat sessions.")


@app.command(cls=HelpCommand, short_help="Measure load, time to first token per turn, and decode speed.")
@setting_options("model", "source", "device", "dtype", "compile", "kv_cache", "quantize", "context_shift", "prompt_lookup", "api")
def bench(
    *,
    flags: dict[str, Any],
    api_key: ApiKeyOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Random weights built on the device, shaped like --shape (or --model's config.json when it is a folder): no download.")] = False,
    shape: Annotated[Optional[str], typer.Option(help="Shapes for --random-weights: 7b (published BlueLM-7B), 7b-32k (the same with a 32K context), cpu25m (26M parameters) or cpu25m-32k; default: 7b on a GPU, cpu25m on the CPU.", metavar="SHAPE", show_default=False)] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Tokens in the first message.", metavar="N")] = 256,
    new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=2, help="Tokens decoded every turn (also --new-tokens).", metavar="N")] = 64,
    turns: Annotated[int, typer.Option(min=1, help="Turns in the conversation.", metavar="N")] = 16,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also measure plain model.generate() re-encoding the history each turn, and print ratios.")] = False,
    repeats: Annotated[int, typer.Option(min=1, metavar="N", help="Run the conversation N times; keep each turn's best figures.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with a `turns` list.")] = False,
    runner: Annotated[str, typer.Option(metavar="NAME", help="The CUDA fast path to measure: graphs (CUDA graphs per attention window, the chat's), compiled (torch.compile) or fused (graphs per window with RMSNorm, RoPE and SiLU compiled into one kernel each).")] = "graphs",
    debug: DebugOpt = False,
) -> int:
    """Measure load time, prefill, time to first token per turn and decode speed (see BENCHMARKS.md)."""
    if _resolve(flags)[0]["api"]:  # a served model, measured from the client (no torch imported)
        return _bench_served(flags, api_key, api_key_file, prompt_tokens=prompt_tokens, new_tokens=new_tokens, turns=turns,
                             repeats=repeats, as_json=as_json, other_options=baseline or random_weights)
    from bluelm_cli.bench.local import SHAPES, format_report, random_weights_model, run_bench
    from bluelm_cli.local.engine import StepRunner
    from bluelm_cli.local.fastpath import RUNNERS
    from bluelm_cli.local.loading import pick_device, pick_dtype

    if runner not in RUNNERS:
        raise UsageError(f"unknown runner '{runner}'; use one of {', '.join(RUNNERS)}")
    settings, _ = _resolve(flags)
    errors = _stderr_console()
    if random_weights:
        folder = Path(settings["model"]).expanduser()
        target = pick_device(settings["device"])
        if shape is None:  # a 7B on a CPU takes tens of GB and minutes a turn: CPU-sized shapes there
            shape = "cpu25m" if target.type == "cpu" else "7b"
        if settings.source_of("model") != "default" and folder.exists():
            shapes: Any = folder
        elif shape in SHAPES:
            shapes = SHAPES[shape]
            _check_bench_memory(shape, shapes, target, pick_dtype(settings["dtype"], target))
        else:
            raise UsageError(f"unknown shape '{shape}'; use one of {', '.join(SHAPES)}")
        with errors.status(f"Building a random-weights model ({shape if shapes is not folder else folder}) on {target}…"):
            loaded = random_weights_model(shapes, target, pick_dtype(settings["dtype"], target))
        label = f"random weights, {shape if shapes is not folder else folder} shapes"
    else:
        loaded = load_local(settings, None, errors, chatting=False)
        label = loaded.model_id
    runner_started = time.perf_counter()
    engine = local_engine(loaded, settings, errors, runner)
    runner_s = time.perf_counter() - runner_started
    with errors.status("Running the benchmark conversation…"):
        report = run_bench(engine, prompt_tokens=prompt_tokens, new_tokens=new_tokens, turns=turns,
                           baseline=baseline, model_label=label, repeats=repeats)
    if type(engine.runner) is not StepRunner:
        report.compile_s = runner_s
        report.runner = runner
    typer.echo(report.to_json() if as_json else format_report(report))
    return ExitStatus.OK


def _check_bench_memory(shape: str, config: dict[str, Any], target: Any, dtype: Any) -> None:
    """Refuse shapes whose random weights don't fit the CPU's free memory, saying how much they need."""
    if target.type != "cpu":
        return  # a GPU that runs out says so itself (CUDA out of memory), before minutes are spent
    import torch

    from bluelm_cli.core.sizes import describe_parameters, parameter_count

    parameters = parameter_count(config)
    needed = parameters * torch.tensor([], dtype=dtype).element_size()
    free = _free_memory()
    if free is not None and needed > free:
        raise UsageError(
            f"--shape {shape} has {describe_parameters(parameters)} parameters: about {needed / 1e9:.1f} GB of"
            f" {str(dtype).removeprefix('torch.')} weights, and this machine has {free / 1e9:.1f} GB free; use"
            " --shape cpu25m on the CPU, or a GPU (--device cuda)"
        )


def _free_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _bench_served(flags: dict[str, Any], api_key: str | None, api_key_file: str | None, *, prompt_tokens: int, new_tokens: int, turns: int,
                  repeats: int, as_json: bool, other_options: bool) -> int:
    from bluelm_cli.bench.remote import format_served_report, run_served_bench

    if other_options:
        raise UsageError("--baseline and --random-weights measure a local model; leave them out with --api")
    settings, _ = _resolve(flags)
    errors = _stderr_console()
    backend, _ = open_backend(settings, None, api_key, errors, api_key_file)
    with errors.status("Running the benchmark conversation…"):
        report = run_served_bench(backend, prompt_tokens=prompt_tokens, new_tokens=new_tokens, turns=turns, repeats=repeats)
    typer.echo(report.to_json() if as_json else format_served_report(report))
    return ExitStatus.OK


@app.command("export", cls=HelpCommand, short_help="Write the model as plain Llama for vLLM, SGLang, TGI (hf) or llama.cpp, ollama (gguf).")
@setting_options("model", "source")
def export(
    out: Annotated[Path, typer.Argument(help="New folder (hf) or file (gguf) to write.", metavar="OUT", show_default=False)],
    *,
    flags: dict[str, Any],
    export_format: Annotated[Optional[str], typer.Option("--format", help="hf (a folder) or gguf (one file); default: gguf when OUT ends in .gguf, else hf.", metavar="FORMAT", show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), bfloat16, float16 or float32.", metavar="DTYPE")] = "auto",
    dequantize: Annotated[bool, typer.Option(
        "--dequantize", help="Write an AWQ/GPTQ release's 4-bit layers as plain DTYPE weights instead of keeping them.")] = False,
    debug: DebugOpt = False,
) -> int:
    """Write the model as plain Llama (no remote code) for other engines; see the README's "Exporting to other engines"."""
    from bluelm_cli.cli.startup import shown_markup as escape
    from bluelm_cli.core.sanitize import safe_for_terminal
    from bluelm_cli.export import export_checkpoint

    settings, _ = _resolve(flags)
    if export_format is None:  # the file name says it: `bluelm export model.gguf`
        export_format = "gguf" if out.suffix.lower() == ".gguf" else "hf"
    if export_format == "gguf":
        import importlib.util

        if importlib.util.find_spec("gguf") is None:  # an extra, not installed by `pip install .`
            raise BlueLMError("GGUF export needs the gguf package: pip install 'bluelm-cli[export]' (or pip install gguf)")
    console = _stderr_console()
    with console.status(f"Exporting {escape(settings['model'])}…", spinner="dots") as status:
        written = export_checkpoint(
            settings["model"], out, format=export_format, dtype=dtype, source=settings["source"],
            on_status=lambda text: status.update(escape(text) + "…"), dequantize=dequantize,
            on_note=lambda text: console.print(f"[dim]Note: {escape(safe_for_terminal(text))}[/]"),
            on_warning=lambda text: console.print(f"[yellow]Warning:[/] {escape(safe_for_terminal(text))}"),
        )
    sys.stdout.write(safe_for_terminal(f"Exported {settings['model']} to {written} ({export_format})") + "\n")
    return ExitStatus.OK


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
