"""`bluelm chat`: the REPL on a terminal (the model loading behind the prompt), lines from a pipe."""

from __future__ import annotations

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
    _local_checkpoint,
    _recorded_model_id,
    _resolve,
    _stderr_console,
    _use_session_model,
)
from bluelm_cli.cli.options import MODEL_SETTINGS, setting_options
from bluelm_cli.cli.startup import load_engine_in_background, open_backend, quantization_choice
from bluelm_cli.config.settings import ResolvedSettings, read_generation_config
from bluelm_cli.core.errors import ExitStatus, UsageError

if TYPE_CHECKING:
    from bluelm_cli.chat.service import Chat


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
    from bluelm_cli.chat.journal import announce_holder
    from bluelm_cli.config.paths import ensure_dir
    from bluelm_cli.session import Session, validate_session_name

    announce_holder("chat")  # a second bluelm refused the session this one holds is told it is a chat
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
        if background is None:  # the tokenizer is here: a --system that leaves no room is refused before a session begins
            from bluelm_cli.core.prompt import check_system_prompt_fits

            check_system_prompt_fits(engine.encoder, settings["system"], context_limit=engine.context_limit,
                                     max_new_tokens=settings.sampling().max_new_tokens,
                                     remedy="give a shorter --system (--system none drops it)")
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
    # A chat left without a word (or the empty one a /clear began) leaves no session behind either: it would
    # list as "0 turns (empty)" and be what `chat -c` / `ask -c` continue instead of the last conversation.
    ended = chat_service.session
    # A session the user named keeps what was set in it (a system prompt, say), to be resumed by that name.
    named_by_user = session_name is not None and ended.name == validate_session_name(session_name)
    if (ended is not resumed and not ended.turns and ended.pending is None and ended.journal is not None
            and (not named_by_user or _only_started(ended.journal))):
        _discard(ended)
    if background is not None:
        background.exit_now_if_loading(status)
    return status


def _only_started(journal: Path | None) -> bool:
    """Whether a journal holds its start record alone (no `/set`, no `/load`)."""
    if journal is None:
        return False
    try:
        with journal.open("rb") as records:
            return sum(1 for line in records if line.strip()) <= 1
    except OSError:
        return False


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
