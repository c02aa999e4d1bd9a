"""`bluelm ask`: one question, the answer on stdout (with -c or --session, the next turn of a saved chat)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from bluelm_cli.cli.common import (
    ApiKeyFileOpt,
    ApiKeyOpt,
    DebugOpt,
    Load4Opt,
    Load8Opt,
    VerboseOpt,
    _explicit_sampling,
    _print_error,
    _recorded_model_id,
    _resolve,
    _stderr_console,
    _use_session_model,
)
from bluelm_cli.cli.options import MODEL_SETTINGS, setting_options
from bluelm_cli.cli.startup import open_backend, quantization_choice
from bluelm_cli.config.paths import UserPaths
from bluelm_cli.config.settings import ResolvedSettings
from bluelm_cli.core.errors import BlueLMError, ExitStatus, UsageError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.core.prompt import SystemPromptTooLongError
from bluelm_cli.ui.stats import result_json, stats_line

if TYPE_CHECKING:
    from rich.console import Console

    from bluelm_cli.chat.service import Chat, TurnStream
    from bluelm_cli.core.backend import AnswerResult, Backend
    from bluelm_cli.session import Session
    from bluelm_cli.ui.presenter import PresentedTurn


def _read_prompt(argument: str | None, *, required: bool = True) -> str:
    """stdin (when piped) first, then a blank line, then the argument."""
    parts: list[str] = []
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        nul = data.find(b"\x00")
        if nul >= 0:  # as `-f` refuses a binary file: a NUL byte is no text (and would reach the model as one)
            raise BlueLMError(
                f"standard input is binary (a NUL byte at byte {nul}); only text can be asked;"
                " pipe text, or extract it first (e.g. pdftotext FILE -)"
            )
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
    from bluelm_cli.chat.attachments import Attachment, check_fits, read_attachment, same_file, token_count, with_attachments
    from bluelm_cli.core.sanitize import safe_for_terminal
    from bluelm_cli.ui.ending_signals import ending_signals_interrupt

    from bluelm_cli.chat.journal import announce_holder

    announce_holder("ask")  # a second bluelm refused the session this one holds is told it is an ask
    settings, paths = _resolve(flags)
    quantization = quantization_choice(load_in_8bit, load_in_4bit)
    attachments: list[Attachment] = []
    for path in files or []:  # a file given twice goes in once (twice, it also counted twice against the context)
        if not any(same_file(attached.name, str(path)) for attached in attachments):
            attachments.append(read_attachment(str(path)))
    question = _read_prompt(prompt, required=not attachments)
    resumed = _resume_for_ask(paths, continue_last, session_name)
    chat = None
    try:
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
        try:
            stream = _start_ask(chat, question, truncate)
        except SystemPromptTooLongError:
            if resumed is None and chat.session.journal is not None and not chat.session.turns:
                _discard_new_session(chat.session)  # `--session NAME` began it: a session nothing could be asked in
            raise
        if stream.plan.truncated_from is not None:
            errors.print(
                f"[yellow]Note:[/] the prompt was {stream.plan.truncated_from:,} tokens; "
                f"kept its last {stream.plan.truncated_to:,} (--truncate)"
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
        if result.finish_reason is FinishReason.ERROR:  # the answer failed midway (server or engine); the partial answer was printed
            _print_error(result.error or "the answer failed midway; ask again")
            return ExitStatus.ERROR
        if result.finish_reason is FinishReason.CONTENT_FILTER:  # a script must not take a filtered answer for a whole one
            _print_error("the server's content filter stopped the answer; what it let through is on stdout. Rephrase the"
                         " question, or ask the server's operator about the filter")
            return ExitStatus.FILTERED
        return ExitStatus.OK
    finally:
        # Let the next bluelm open the session now, not at exit (and, in one process, at all: tests, scripts).
        for session in {id(s): s for s in (resumed, chat.session if chat is not None else None) if s is not None}.values():
            session.close()


def _discard_new_session(session: Session) -> None:
    session.close()
    if session.journal is not None:
        session.journal.unlink(missing_ok=True)


def _resume_for_ask(paths: UserPaths, continue_last: bool, name: str | None) -> Session | None:
    """The session `ask -c` / `--session NAME` continues (found before the model loads); None for a new one."""
    from bluelm_cli.session import Session, validate_session_name

    if name is not None:
        validate_session_name(name)
        from bluelm_cli.chat.journal import journal_path

        return Session.resume(paths.sessions_dir, name) if journal_path(paths.sessions_dir, name).is_file() else None
    if continue_last:
        from bluelm_cli.chat.journal import NoSavedSessionsError

        try:
            return Session.resume(paths.sessions_dir, None)
        except NoSavedSessionsError as none:
            raise NoSavedSessionsError(
                none.sessions_dir, "there is none to continue: drop -c to ask without one, or --session NAME to start one"
            ) from None
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
    from bluelm_cli.core.prompt import ContextOverflowError

    try:
        return chat.send(question, truncate=truncate)
    except SystemPromptTooLongError as too_long:
        raise SystemPromptTooLongError(too_long.system_tokens, chat.context_limit, chat.sampling.max_new_tokens,
                                       too_long.room, "give a shorter --system (--system none drops it)") from None
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
            f"Note: max_new_tokens lowered from {budget:,} to {room:,}: the model's context is {chat.context_limit:,}"
            f" tokens and the prompt takes {prompt:,}", style="dim", markup=False, highlight=False,
        )

