"""The chat's slash commands: ONE table that dispatch, ``/help`` and Tab completion all read.

Each :class:`Command` names its handler, its one-line help and the completer for its argument, so a
new command is one entry in :data:`COMMANDS` and nothing else. Handlers get the running
:class:`~bluelm_cli.repl.ChatRepl` and the argument text; they report problems by raising
:class:`~bluelm_cli.errors.BlueLMError` (the REPL prints ``Error: …`` and goes on).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter, WordCompleter
from prompt_toolkit.document import Document

from bluelm_cli.errors import BlueLMError, UsageError
from bluelm_cli.paths import ensure_dir
from bluelm_cli.session import Session
from bluelm_cli.settings import SAMPLING_KEYS, SPECS

if TYPE_CHECKING:
    from bluelm_cli.repl import ChatRepl

__all__ = ["COMMANDS", "ChatCompleter", "Command", "code_blocks", "find_command", "unknown_command_message"]

Handler = Callable[["ChatRepl", str], None]


@dataclass(frozen=True)
class Command:
    name: str  # without the slash
    usage: str  # as shown by /help, e.g. "/save [PATH]"
    help: str  # one line
    run: Handler
    complete: Completer | None = None  # completes the argument text (what follows "/name ")
    aliases: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- handlers
def _help(repl: ChatRepl, args: str) -> None:
    repl.show_help()


def _reset(repl: ChatRepl, args: str) -> None:
    repl.session.reset()
    repl.note("New conversation; settings kept.")


def _save(repl: ChatRepl, args: str) -> None:
    if args:
        path = Path(_unquote(args)).expanduser()
    else:
        path = ensure_dir(repl.paths.sessions_dir) / f"{repl.session.name or 'chat'}.json"
    written = repl.session.save(path)
    repl.note(f"Saved to {written}")


def _load(repl: ChatRepl, args: str) -> None:
    if not args:
        raise UsageError("usage: /load PATH (a session saved with /save as .json)")
    path = Path(_unquote(args)).expanduser()
    loaded = Session.load(path)  # raises before anything changes: the current conversation stays intact
    if loaded.model_id != repl.session.model_id:
        repl.warn(f"{path} was saved with {loaded.model_id}; continuing with {repl.session.model_id}")
    repl.session.adopt(loaded)
    count = len(loaded.turns)
    repl.note(f"Loaded {count} turn{'s' if count != 1 else ''} from {path}")
    if repl.interactive:
        repl.show_turns(repl.session.turns)


def _retry(repl: ChatRepl, args: str) -> None:
    if not repl.session.turns:
        raise BlueLMError("nothing to retry yet; send a message first")
    repl.ask(repl.session.turns[-1].user, retry=True)


def _undo(repl: ChatRepl, args: str) -> None:
    turn = repl.session.undo()
    if turn is None:
        raise BlueLMError("nothing to undo; the conversation is empty")
    repl.note(f"Removed the last exchange ({_preview(turn.user)})")


def _set(repl: ChatRepl, args: str) -> None:
    key, _, value = args.partition(" ")
    value = value.strip()
    if not key or not value:
        raise UsageError(f"usage: /set KEY VALUE; keys: {', '.join(SAMPLING_KEYS)}")
    if key not in SPECS:
        hint = _did_you_mean(key, SAMPLING_KEYS)
        raise UsageError(
            f"unknown setting '{key}'{hint}; /set can change: {', '.join(SAMPLING_KEYS)}"
        )
    parsed = repl.session.set_setting(key, value)
    repl.note(f"{key} = {_show_value(parsed)}")


def _show(repl: ChatRepl, args: str) -> None:
    repl.show_state()


def _copy(repl: ChatRepl, args: str) -> None:
    if not repl.interactive:
        raise BlueLMError("/copy needs a terminal: it asks the terminal to set the clipboard (OSC 52)")
    if not repl.session.turns:
        raise BlueLMError("there is no answer to copy yet")
    answer = repl.session.turns[-1].answer
    if not args:
        repl.copy(answer, "the last answer")
        return
    blocks = code_blocks(answer)
    try:
        number = int(args)
    except ValueError:
        raise UsageError("usage: /copy [N]; N is the number of a code block in the last answer (1 = first)") from None
    if not blocks:
        raise BlueLMError("the last answer has no code blocks; /copy without a number copies the whole answer")
    if not 1 <= number <= len(blocks):
        raise BlueLMError(
            f"the last answer has {len(blocks)} code block{'s' if len(blocks) != 1 else ''}; use a number from 1 to {len(blocks)}"
        )
    repl.copy(blocks[number - 1], f"code block {number}")


def _stats(repl: ChatRepl, args: str) -> None:
    choice = args.lower()
    if choice not in ("on", "off", ""):
        raise UsageError("usage: /stats on|off")
    if choice:
        repl.show_stats = choice == "on"
    repl.note(f"Stats {'on' if repl.show_stats else 'off'}")


def _exit(repl: ChatRepl, args: str) -> None:
    repl.exit_requested = True


# ------------------------------------------------------------------------------------------ completers
class _SettingCompleter(Completer):
    """``/set KEY VALUE``: the keys /set can change, then the special values some of them take."""

    _VALUES = {"seed": ["none"], "system": ["none"], "temperature": ["0"]}

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if " " not in text:
            for key in SAMPLING_KEYS:
                if key.startswith(text):
                    yield Completion(key + " ", start_position=-len(text), display=key, display_meta=SPECS[key].help)
            return
        key, _, value = text.partition(" ")
        for choice in self._VALUES.get(key, []):
            if choice.startswith(value.strip()):
                yield Completion(choice, start_position=-len(value.lstrip()))


_PATHS = PathCompleter(expanduser=True)

COMMANDS: tuple[Command, ...] = (
    Command("help", "/help", "List the commands and keys.", _help),
    Command("reset", "/reset", "Start a new conversation (settings are kept).", _reset),
    Command("save", "/save [PATH]", "Save the conversation: JSON, or a Markdown transcript for .md.", _save, _PATHS),
    Command("load", "/load PATH", "Load a conversation saved with /save (replaces the current one).", _load, _PATHS),
    Command("retry", "/retry", "Answer the last message again.", _retry),
    Command("undo", "/undo", "Remove the last exchange.", _undo),
    Command("set", "/set KEY VALUE", "Change a sampling setting or the system prompt.", _set, _SettingCompleter()),
    Command("show", "/show", "Show the settings, model, device and context used.", _show),
    Command("copy", "/copy [N]", "Copy the last answer, or its N-th code block, to the clipboard.", _copy),
    Command("stats", "/stats on|off", "Show tokens, time to first token and speed after each answer.", _stats,
            WordCompleter(["on", "off"])),
    Command("exit", "/exit", "Quit (Ctrl-D too).", _exit, aliases=("quit",)),
)

_BY_NAME: dict[str, Command] = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def find_command(name: str) -> Command | None:
    return _BY_NAME.get(name)


def unknown_command_message(name: str) -> str:
    """``unknown command /rset; did you mean /reset? (/help lists them)``"""
    return f"unknown command /{name}{_did_you_mean(name, [c.name for c in COMMANDS], prefix='/')} (/help lists them)"


class ChatCompleter(Completer):
    """Tab completion from the command table: names after ``/``, then each command's own completer."""

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or text.startswith("//") or "\n" in text:
            return
        if " " not in text:
            for command in COMMANDS:
                if command.name.startswith(text[1:]):
                    yield Completion(
                        f"/{command.name}", start_position=-len(text), display_meta=command.help
                    )
            return
        name, _, argument = text[1:].partition(" ")
        command = find_command(name)
        if command is None or command.complete is None:
            return
        yield from command.complete.get_completions(Document(argument, len(argument)), complete_event)


# ------------------------------------------------------------------------------------------ helpers
def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced and indented code blocks in ``markdown``, in order."""
    from markdown_it import MarkdownIt  # rich's own Markdown parser

    tokens = MarkdownIt().parse(markdown)
    return [token.content for token in tokens if token.type in ("fence", "code_block")]


def _did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if not matches and name:
        matches = [choice for choice in choices if choice.startswith(name[:2])][:1]
    return f"; did you mean {prefix}{matches[0]}?" if matches else ""


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _preview(text: str, width: int = 50) -> str:
    line = " ".join(text.split())
    return f"“{line[: width - 1]}…”" if len(line) > width else f"“{line}”"


def _show_value(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return repr(value) if "\n" not in value else f"{len(value)} characters"
    return str(value)
