"""`bluelm sessions`: list, show, remove and search the saved chats, without loading a model.

Reads only the journals (:mod:`bluelm_cli.chat.journal`); nothing here imports torch or the engine, so each
of these answers in a fraction of a second even where the model takes minutes to load.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.cells import cell_len

from bluelm_cli.cli.options import HelpCommand
from bluelm_cli.chat.conversation import Conversation
from bluelm_cli.core.errors import BlueLMError, ExitStatus, UsageError
from bluelm_cli.chat.journal import SessionInfo, find_journal, in_use_message, list_sessions, live_holder, replay
from bluelm_cli.config.paths import user_paths

__all__ = ["sessions_app"]

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
_PREVIEW_WIDTH = 40

sessions_app = typer.Typer(
    name="sessions",
    help="List saved chat sessions (most recent first); show, remove or search them.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass(frozen=True)
class _Listed:
    info: SessionInfo
    conversation: Conversation | None  # None: the journal can't be read at all


@sessions_app.callback()
def list_command(ctx: typer.Context, debug: DebugOpt = False) -> int | None:
    """List saved chat sessions, most recent first: name, turns, last used, model, first message.

    Continue one with `bluelm chat --resume NAME` (or `bluelm ask -c`)."""
    if ctx.invoked_subcommand is not None:
        return None
    sessions_dir = user_paths().sessions_dir
    listed = _listed(sessions_dir)
    if not listed:
        typer.echo(f"No sessions yet in {sessions_dir}.")
        return ExitStatus.OK
    names = {item.info.path: _label(item.info.name) for item in listed}
    models = {item.info.path: _label(_short_model(item.info.model_id)) for item in listed if item.conversation is not None}
    # Padded to their width on screen, not their length: a Chinese character takes two columns.
    name_width = max(cell_len(name) for name in names.values())
    model_width = max((cell_len(model) for model in models.values()), default=0)
    for item in listed:
        info = item.info
        name = _pad(names[info.path], name_width)
        when = info.last_used.astimezone().strftime("%Y-%m-%d %H:%M")
        if item.conversation is None:
            typer.echo(f"{name}     ? turns  {when}  (unreadable: {_for_stdout(info.unreadable or '')})")
            continue
        first = item.conversation.turns[0].user if item.conversation.turns else ""
        damaged = "  (damaged: some records were skipped)" if info.damaged else ""
        typer.echo(
            f"{name}  {info.turns:>4} turn{' ' if info.turns == 1 else 's'}  {when}  "
            f"{_pad(models[info.path], model_width)}  {_for_stdout(preview(first)) if first else '(empty)'}{damaged}"
        )
    return ExitStatus.OK


def _pad(text: str, width: int) -> str:
    """`text` followed by spaces up to `width` columns on screen."""
    return text + " " * max(0, width - cell_len(text))


def _label(text: str) -> str:
    """A session name or model id: from a journal anyone may have written, so sanitised wherever it goes."""
    from bluelm_cli.core.sanitize import safe_for_terminal

    return safe_for_terminal(text)


def _for_stdout(text: str) -> str:
    """User text bound for a terminal goes through the one sanitiser; a pipe gets it as it is."""
    import sys

    from bluelm_cli.core.sanitize import safe_for_terminal

    return safe_for_terminal(text) if sys.stdout.isatty() else text


@sessions_app.command(cls=HelpCommand, name="show")
def show_command(
    name: Annotated[Optional[str], typer.Argument(help="The session (default: the most recent).", metavar="NAME", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The session as JSON (the /save format).")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="A Markdown transcript (what /save x.md writes).")] = False,
    debug: DebugOpt = False,
) -> int:
    """Show a session's conversation: rendered on a terminal, or as JSON or Markdown."""
    from bluelm_cli.chat import transcript

    if as_json and as_markdown:
        raise UsageError("choose one of --json and --markdown")
    conversation = _conversation(name)
    if as_json:
        sys.stdout.write(json.dumps(transcript.to_json_dict(conversation), ensure_ascii=False, indent=2) + "\n")
        return ExitStatus.OK
    if as_markdown:
        sys.stdout.write(transcript.to_markdown(conversation))
        return ExitStatus.OK
    _show_rendered(conversation)
    return ExitStatus.OK


@sessions_app.command(cls=HelpCommand, name="rm")
def rm_command(
    names: Annotated[list[str], typer.Argument(help="The sessions to delete.", metavar="NAME...", show_default=False)],
    debug: DebugOpt = False,
) -> int:
    """Delete saved sessions (their journals)."""
    sessions_dir = user_paths().sessions_dir
    paths = [_existing_journal(sessions_dir, name) for name in names]  # all known before any is deleted
    with contextlib.ExitStack() as held:  # and none open in a chat, which would go on journaling into nothing
        for name, path in zip(names, paths):
            held.enter_context(_not_in_a_chat(path, name))
        _remove(names, paths)
    return ExitStatus.OK


@contextlib.contextmanager
def _not_in_a_chat(path: Path, name: str) -> Iterator[None]:
    """Hold the journal's lock (the one a chat holds while the session is open) for the block; refuse a
    session open in a chat."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield  # gone or unreadable: the removal says what is wrong
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.fstat(fd)
            raise BlueLMError(in_use_message(name, live_holder(path, (info.st_dev, info.st_ino)), removing=True)) from None
        except OSError:
            pass  # a file system without locks: as the chat itself, go on unlocked
        yield
    finally:
        os.close(fd)


def _remove(names: list[str], paths: list[Path]) -> None:
    for name, path in zip(names, paths):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BlueLMError(f"cannot delete {path} ({exc.strerror or exc}); check its permissions") from None
        typer.echo(f"Removed session {_label(name)}")


@sessions_app.command(cls=HelpCommand, name="search")
def search_command(
    text: Annotated[str, typer.Argument(help="Text to find (case-insensitive) in messages and answers.", metavar="TEXT", show_default=False)],
    debug: DebugOpt = False,
) -> int:
    """Find TEXT in every session's messages and answers (most recent session first); exit 1 if none has it."""
    sessions_dir = user_paths().sessions_dir
    needle = text.casefold()
    if not needle.strip():
        raise BlueLMError("give some text to search for")
    found = 0
    for item in _listed(sessions_dir):
        if item.conversation is None:
            continue
        bodies = [(number, role, body) for number, turn in enumerate(item.conversation.turns, start=1)
                  for role, body in (("you", turn.user), ("bluelm", turn.answer))]
        if item.conversation.pending is not None:  # sent, not answered: still findable
            bodies.append((len(item.conversation.turns) + 1, "you (not answered)", item.conversation.pending))
        for number, role, body in bodies:
            at = body.casefold().find(needle)
            if at < 0:
                continue
            found += 1
            typer.echo(f"{_label(item.info.name)} #{number} {role}: {_for_stdout(_snippet(body, at, len(needle)))}")
    if not found:
        typer.echo(f"No session has '{_label(text)}'.", err=True)
        return ExitStatus.ERROR
    return ExitStatus.OK


# ------------------------------------------------------------------------------------------ helpers
def preview(text: str, width: int = _PREVIEW_WIDTH) -> str:
    """One line of at most `width` characters: “first words…”."""
    line = " ".join(text.split())
    return f"“{line[: width - 1]}…”" if len(line) > width else f"“{line}”"


def _snippet(text: str, at: int, length: int, around: int = 30) -> str:
    start, end = max(0, at - around), min(len(text), at + length + around)
    body = " ".join(text[start:end].split())
    return f"{'…' if start else ''}{body}{'…' if end < len(text) else ''}"


def _short_model(model_id: str) -> str:
    """A folder path is shown by its last part; a hub id as it is."""
    return Path(model_id).name if model_id.startswith(("/", ".", "~")) else model_id


def _listed(sessions_dir: Path) -> list[_Listed]:
    _refuse_a_file_in_the_way(sessions_dir)
    listed = []
    for info in list_sessions(sessions_dir):
        if info.unreadable is not None:
            listed.append(_Listed(info, None))  # listed as unreadable, never hidden
            continue
        try:
            conversation, _ = replay(info.path, repair=False)
        except BlueLMError:
            continue  # removed since it was listed
        listed.append(_Listed(info, conversation))
    return listed


def _refuse_a_file_in_the_way(sessions_dir: Path) -> None:
    """A file where the sessions folder (or a folder above it) should be is an error, not "no sessions yet":
    no chat could journal there either."""
    for folder in (sessions_dir, *sessions_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise BlueLMError(f"{folder} is a file, not a folder; point BLUELM_HOME at a folder (or remove that file)")
            return


def _existing_journal(sessions_dir: Path, name: str) -> Path:
    return find_journal(sessions_dir, name)


def _conversation(name: str | None) -> Conversation:
    conversation, _ = replay(find_journal(user_paths().sessions_dir, name), repair=False)
    return conversation


def _show_rendered(conversation: Conversation) -> None:
    from rich.console import Console
    from rich.text import Text

    from bluelm_cli.ui.output import ChatOutput

    console = Console(highlight=False)
    out = ChatOutput(console)
    count = len(conversation.turns)
    console.print(Text.assemble(("Session ", "bold"), (_label(conversation.name), "bold"),
                                f" · {_label(conversation.model_id)} · {count} turn{'s' if count != 1 else ''}"))
    if conversation.system:
        out.note(f"System: {conversation.system}")
    out.blank()
    out.show_turns(conversation.turns)
    if conversation.pending is not None:
        out.show_pending(conversation.pending, f"bluelm chat --resume {conversation.name}, then /retry, sends it")
