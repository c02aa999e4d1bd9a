"""The chat's slash commands: ONE table that dispatch, ``/help`` and Tab completion all read.

Each :class:`Command` names its handler, its one-line help and the completer for its argument, so a
new command is one entry in :data:`COMMANDS` and nothing else. Handlers see only a narrow
:class:`CommandContext` (the chat service, its output, the user paths), never the REPL; they return an
outcome for the loop (an answer to show, or exit) and report problems by raising
:class:`~bluelm_cli.core.errors.BlueLMError` (the loop prints ``Error: …`` and goes on).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, Union

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter, WordCompleter
from prompt_toolkit.document import Document

from bluelm_cli.chat.attachments import Attachment, check_fits, read_attachment, same_file, token_count
from bluelm_cli.core.backend import ModelLoading
from bluelm_cli.chat.service import Chat, TurnStream
from bluelm_cli.core.sanitize import safe_for_terminal
from bluelm_cli.ui.clipboard import copy_to_clipboard
from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.ui.habits import SETTING_ALIASES, foreign_command_hint, foreign_set_hint, setting_alias
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.config.paths import UserPaths, ensure_dir, expand_user
from bluelm_cli.session import Session
from bluelm_cli.config.settings import ResolvedSettings
from bluelm_cli.core.prompt import AI_TAG, BOS_TEXT, EOS_TEXT, HUMAN_TAG, prompt_text
from bluelm_cli.core.settings import GENERATION_KEYS, SAMPLING_KEYS, SPECS
from bluelm_cli.ui.show import info_rows, parameter_rows, session_values

__all__ = [
    "COMMANDS", "EXIT_WORDS", "ChatCompleter", "Command", "CommandContext", "ExitChat", "Outcome", "ShowAnswer",
    "code_blocks", "context_meter", "find_command", "run_command", "unknown_command_message",
]

# What /help says about the keys of the prompt (bound in repl.py).
KEYS_HELP = (
    'Enter sends · Alt-Enter (or Esc Enter) adds a line · a multi-line paste is one message · """ starts and ends a block',
    "Ctrl-R searches earlier messages · Ctrl-X Ctrl-E edits the message in $EDITOR · Tab completes",
    "Ctrl-C stops an answer or clears the line · Ctrl-D, /exit, or exit or quit alone quits",
    '//text sends a message starting with / · " exit" (a leading space) or """exit""" sends the word exit',
)

# Typed alone at the prompt, these end the chat as /exit does (as in `llm chat` and Python).
EXIT_WORDS = ("exit", "quit")


class CommandContext(Protocol):
    """What a command may use: the conversation, the output, the user's folders, the stats switch,
    the settings as resolved at start (with their sources; None where there are none), and the files
    attached to the next message."""

    chat: Chat
    out: ChatOutput
    paths: UserPaths
    interactive: bool
    show_stats: bool
    settings: ResolvedSettings | None
    attachments: list[Attachment]


@dataclass(frozen=True)
class ExitChat:
    """End the chat."""


@dataclass(frozen=True)
class ShowAnswer:
    """Stream this answer to the screen and commit it, as for a typed message."""

    stream: TurnStream


Outcome = Union[ExitChat, ShowAnswer, None]
Handler = Callable[[CommandContext, str], Outcome]


@dataclass(frozen=True)
class Command:
    name: str  # without the slash
    usage: str  # as shown by /help, e.g. "/save [PATH]"
    help: str  # one line
    run: Handler
    complete: Completer | None = None  # completes the argument text (what follows "/name ")
    aliases: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- handlers
def _help(ctx: CommandContext, args: str) -> Outcome:
    ctx.out.rows([(_usage_with_aliases(command), command.help) for command in COMMANDS])
    for line in KEYS_HELP:
        ctx.out.note(line)
    return None


def _reset(ctx: CommandContext, args: str) -> Outcome:
    old = ctx.chat.session
    new = ctx.chat.start_over()
    if new is old:
        ctx.out.note("New conversation; settings kept.")
    else:
        ctx.out.note(f"New session {new.name}; settings kept. {_kept_in(old.name)}")
    return None


def _kept_in(name: str) -> str:
    return f"The earlier turns stay in session {name} (bluelm chat --resume {name})."


def _save(ctx: CommandContext, args: str) -> Outcome:
    session = ctx.chat.session
    if args:
        path = expand_user(_unquote(args))
    else:
        path = ensure_dir(ctx.paths.sessions_dir) / f"{session.name or 'chat'}.json"
    written = session.save(path)
    ctx.out.note(f"Saved to {written}")
    return None


def _load(ctx: CommandContext, args: str) -> Outcome:
    if not args:
        raise UsageError("usage: /load PATH (a session saved with /save as .json)")
    path = expand_user(_unquote(args))
    loaded = Session.load(path)  # raises before anything changes: the current conversation stays intact
    running = ctx.chat.session.model_id
    if loaded.model_id != running:
        ctx.out.warn(f"{path} was saved with {loaded.model_id}; continuing with {running}")
    ctx.chat.check_adoptable(loaded, what=str(path))  # before a new session starts: a refusal changes nothing
    old = ctx.chat.session
    new = ctx.chat.start_over()  # the current turns stay in their own session
    ctx.chat.adopt(loaded)
    count = len(loaded.turns)
    ctx.out.note(f"Loaded {count} turn{'s' if count != 1 else ''} from {path}"
                 + ("" if new is old else f" into new session {new.name}. {_kept_in(old.name)}"))
    if ctx.interactive:
        ctx.out.show_turns(ctx.chat.session.turns)
    return None


def _retry(ctx: CommandContext, args: str) -> Outcome:
    return ShowAnswer(ctx.chat.retry())


def _undo(ctx: CommandContext, args: str) -> Outcome:
    turn = ctx.chat.undo()
    ctx.out.note(f"Removed the last exchange ({_preview(turn.user)})")
    return None


def _set(ctx: CommandContext, args: str) -> Outcome:
    key, _, value = args.partition(" ")
    value = value.strip()
    if key == "parameter":  # ollama's /set parameter KEY VALUE
        key, _, value = value.partition(" ")
        value = value.strip()
    if not key:  # a bare /set (or /set parameter): what can be set, and how
        _list_settings(ctx)
        return None
    if key in ("verbose", "quiet") and not value:  # ollama's switches for the stats line
        return _stats(ctx, "on" if key == "verbose" else "off")
    key = setting_alias(key) or key
    hint = foreign_set_hint(key)
    if hint and key not in SPECS:
        raise UsageError(f"/set {key} is ollama's; {hint}")
    if key not in SPECS:
        hint = _did_you_mean(key, [*SAMPLING_KEYS, *SETTING_ALIASES])
        raise UsageError(f"unknown setting '{key}'{hint}; /set can change: {', '.join(SAMPLING_KEYS)}")
    if not value:
        raise UsageError(f"usage: /set {key} {SPECS[key].metavar}; {key} must be {SPECS[key].expected}")
    parsed = ctx.chat.set_setting(key, value)
    ctx.out.note(f"{key} = {_show_value(parsed)}")
    return None


def _list_settings(ctx: CommandContext) -> None:
    """What a bare /set prints: each setting /set can change, its value now, and its other names."""
    values = {"system": ctx.chat.system, **ctx.chat.sampling.as_dict()}
    names = {key: [alias for alias, target in SETTING_ALIASES.items() if target == key] for key in SAMPLING_KEYS}
    ctx.out.note("Usage: /set KEY VALUE (also ollama's /set parameter KEY VALUE)")
    rows = []
    for key in SAMPLING_KEYS:
        spec = SPECS[key]
        also = f" (also {', '.join(names[key])})" if names[key] else ""
        rows.append((f"{key} {spec.metavar}", f"{_show_value(values[key])} · {spec.help.rstrip('.')}{also}"))
    rows.append(("verbose | quiet", f"{'verbose' if ctx.show_stats else 'quiet'} · show or hide the stats line after each answer"))
    ctx.out.rows(rows)


def _show(ctx: CommandContext, args: str) -> Outcome:
    what = args.lower()
    if what == "info":
        ctx.out.rows(info_rows(ctx.chat.backend.info()))
        return None
    if what in ("parameters", "params", "settings"):
        session = ctx.chat.session
        rows = parameter_rows(ctx.settings, session_values(session.system, ctx.chat.sampling.as_dict()), session.name)
        ctx.out.rows([(name, f"{value:<28}  {source}") for name, value, source in rows])
        return None
    if what == "system":
        system = ctx.chat.system
        if system:
            ctx.out.print_text(system)
        else:
            ctx.out.note("No system prompt; /set system TEXT sets one.")
        return None
    if what == "template":
        _show_template(ctx)
        return None
    if what:
        raise UsageError(f"usage: /show [info|parameters|system|template]; '{args}' is not one of them")
    chat = ctx.chat
    session = chat.session
    settings = chat.sampling.as_dict()
    active = len(session.active_turns())
    try:
        info = chat.backend.info()
        model = f"{info.model_id} ({info.device}, {info.dtype})"
        context = context_meter(chat.context_used(), chat.context_limit)
    except ModelLoading:  # what needs the tokenizer says so rather than making /show wait
        model, context = f"{session.model_id} (model loading)", "(model loading)"
    rows: list[tuple[str, str]] = [
        ("model", model),
        ("session", f"{session.name} · {_count(len(session.turns), 'turn')}, {active} in the context"),
        ("context", context),
        ("system", "(unset)" if not session.system else _show_value(session.system)),
    ]
    rows += [(key, "(unset)" if settings[key] is None else str(settings[key])) for key in GENERATION_KEYS]
    rows.append(("stats", "on" if ctx.show_stats else "off"))
    ctx.out.rows(rows)
    return None


def _show_template(ctx: CommandContext) -> None:
    """BlueLM's chat format as the prompt builder writes it, special tokens included (ollama's /show template)."""
    example = prompt_text("{system}", [("{message 1}", "{answer 1}")], "{message 2}")
    ctx.out.print_text(example)
    ctx.out.note(
        f"{BOS_TEXT} opens the conversation and {EOS_TEXT} closes each answer; {HUMAN_TAG} and {AI_TAG} are"
        " single tokens. BlueLM has no system role: the system prompt is plain text before the first"
        f" {HUMAN_TAG} (now: {'unset' if not ctx.chat.system else _show_value(ctx.chat.system)})."
    )


def _continue(ctx: CommandContext, args: str) -> Outcome:
    return ShowAnswer(ctx.chat.continue_())


def _file(ctx: CommandContext, args: str) -> Outcome:
    if not args:
        if not ctx.attachments:
            raise UsageError("usage: /file PATH; the text file goes into your next message (/file clear drops attached files)")
        names = ", ".join(attachment.name for attachment in ctx.attachments)
        ctx.out.note(f"Attached to the next message: {names} (/file clear drops them)")
        return None
    if args == "clear":
        count = len(ctx.attachments)
        ctx.attachments.clear()
        ctx.out.note(f"Dropped {_count(count, 'attached file')}")
        return None
    attachment = read_attachment(_unquote(args))
    chat = ctx.chat
    encoder = chat.backend.encoder
    # The same file again (edited since, say) replaces its earlier copy: in the message twice, it would also
    # count twice against the context.
    same = [index for index, attached in enumerate(ctx.attachments) if same_file(attached.name, attachment.name)]
    others = [attached for index, attached in enumerate(ctx.attachments) if index not in same]
    check_fits(encoder, chat.system, [*others, attachment],
               context_limit=chat.context_limit, max_new_tokens=chat.sampling.max_new_tokens)
    if same:
        ctx.attachments[same[0]] = attachment
        again = " again"
        where = ", in place of the earlier copy"
    else:
        ctx.attachments.append(attachment)
        again = where = ""
    ctx.out.note(
        f"Attached {attachment.name}{again} ({token_count(encoder, attachment):,} tokens){where}; it goes with your next message"
    )
    return None


def _copy(ctx: CommandContext, args: str) -> Outcome:
    if not ctx.interactive:
        raise BlueLMError("/copy needs a terminal: it asks the terminal to set the clipboard (OSC 52)")
    last = ctx.chat.last_turn()
    if last is None:
        raise BlueLMError("there is no answer to copy yet")
    answer = last.answer
    if not args:
        _to_clipboard(ctx, answer, "the last answer")
        return None
    blocks = code_blocks(answer)
    try:
        number = int(args)
    except ValueError:
        raise UsageError("usage: /copy [N]; N is the number of a code block in the last answer (1 = first)") from None
    if not blocks:
        raise BlueLMError("the last answer has no code blocks; /copy without a number copies the whole answer")
    if not 1 <= number <= len(blocks):
        raise BlueLMError(
            f"the last answer has {_count(len(blocks), 'code block')}; use a number from 1 to {len(blocks)}"
        )
    _to_clipboard(ctx, blocks[number - 1], f"code block {number}")
    return None


def _to_clipboard(ctx: CommandContext, text: str, what: str) -> None:
    """Put ``text`` on the clipboard through the terminal (OSC 52)."""
    try:
        # What is copied is pasted next, often into a shell: an escape in it (ESC [201~ ends a bracketed
        # paste early, and what follows runs as if typed) or a bidi override is made visible first.
        copy_to_clipboard(safe_for_terminal(text), ctx.out.console.file)
    except ValueError as exc:
        raise BlueLMError(str(exc)) from None
    ctx.out.note(f"Copied {what} ({len(text)} characters) to the clipboard")


def _stats(ctx: CommandContext, args: str) -> Outcome:
    choice = args.lower()
    if choice not in ("on", "off", ""):
        raise UsageError("usage: /stats on|off")
    if choice:
        ctx.show_stats = choice == "on"
    ctx.out.note(f"Stats {'on' if ctx.show_stats else 'off'}")
    return None


def _exit(ctx: CommandContext, args: str) -> Outcome:
    return ExitChat()


# ------------------------------------------------------------------------------------------ completers
class _SettingCompleter(Completer):
    """``/set KEY VALUE``: the keys /set can change, then the special values some of them take."""

    _VALUES = {"seed": ["none"], "system": ["none"], "temperature": ["0"]}

    _SWITCHES = {"verbose": "Show the stats line after each answer.", "quiet": "Hide the stats line."}

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if text.startswith("parameter "):  # ollama's spelling: /set parameter KEY VALUE
            text = text[len("parameter ") :]
        if " " not in text:
            for key in SAMPLING_KEYS:
                if key.startswith(text):
                    yield Completion(key + " ", start_position=-len(text), display=key, display_meta=SPECS[key].help)
            for alias, key in SETTING_ALIASES.items():
                if alias.startswith(text) and text:
                    yield Completion(alias + " ", start_position=-len(text), display=alias, display_meta=f"= {key}")
            if document.text_before_cursor == text:
                for switch, meta in self._SWITCHES.items():
                    if switch.startswith(text):
                        yield Completion(switch, start_position=-len(text), display_meta=meta)
            return
        key, _, value = text.partition(" ")
        for choice in self._VALUES.get(key, []):
            if choice.startswith(value.strip()):
                yield Completion(choice, start_position=-len(value.lstrip()))


_PATHS = PathCompleter(expanduser=True)

COMMANDS: tuple[Command, ...] = (
    Command("help", "/help", "List the commands and keys.", _help, aliases=("?",)),
    Command("reset", "/reset", "Start a new conversation in a new session; settings are kept.", _reset, aliases=("clear",)),
    Command("save", "/save [PATH]", "Save the conversation: JSON, or a Markdown transcript for .md.", _save, _PATHS),
    Command("load", "/load PATH", "Load a conversation saved with /save into a new session.", _load, _PATHS),
    Command("retry", "/retry", "Answer the last message again.", _retry),
    Command("continue", "/continue", "Go on with an answer that was cut off or interrupted.", _continue),
    Command("file", "/file PATH", "Put a text file into your next message (/file clear drops it).", _file, _PATHS),
    Command("undo", "/undo", "Remove the last exchange.", _undo),
    Command("set", "/set [KEY VALUE]", "Change a sampling setting or the system prompt; alone: list them.", _set,
            _SettingCompleter()),
    Command("show", "/show [info|parameters|system|template]",
            "Settings and context used; info: the model; parameters: with sources; system: the prompt;"
            " template: the chat format.",
            _show, WordCompleter(["info", "parameters", "system", "template"])),
    Command("copy", "/copy [N]", "Copy the last answer, or its N-th code block, to the clipboard.", _copy),
    Command("stats", "/stats on|off", "Show tokens, time to first token and speed after each answer.", _stats,
            WordCompleter(["on", "off"])),
    Command("exit", "/exit", "Quit (Ctrl-D, or exit or quit alone, too).", _exit, aliases=("quit", "bye")),
)

_BY_NAME: dict[str, Command] = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def find_command(name: str) -> Command | None:
    return _BY_NAME.get(name)


def run_command(ctx: CommandContext, line: str) -> Outcome:
    """Run ``/name args`` (the line as typed, with its slash). Raises BlueLMError for an unknown name."""
    name, _, args = line[1:].partition(" ")
    if "\n" in name:  # "/cmd" followed by more lines: still a command, the rest is its argument
        name, _, rest = name.partition("\n")
        args = f"{rest} {args}"
    command = find_command(name)
    if command is None:
        raise BlueLMError(unknown_command_message(name))
    return command.run(ctx, args.strip())


def unknown_command_message(name: str) -> str:
    """``unknown command /rset; did you mean /reset? (/help lists them)``; another tool's word says what to use."""
    hint = foreign_command_hint(name)
    if hint:
        return f"unknown command /{name}; {hint} (/help lists them; //{name} sends it as a message)"
    return (f"unknown command /{name}{_did_you_mean(name, list(_BY_NAME), prefix='/')} (/help lists them;"
            f" //{name} sends it as a message)")


class ChatCompleter(Completer):
    """Tab completion from the command table: names after ``/``, then each command's own completer."""

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or text.startswith("//") or "\n" in text:
            return
        if " " not in text:
            for command in COMMANDS:
                for name in (command.name, *command.aliases):
                    if name.startswith(text[1:]) and name.isalpha():
                        yield Completion(f"/{name}", start_position=-len(text), display_meta=command.help)
            return
        name, _, argument = text[1:].partition(" ")
        command = find_command(name)
        if command is None or command.complete is None:
            return
        yield from command.complete.get_completions(Document(argument, len(argument)), complete_event)


# ------------------------------------------------------------------------------------------ helpers
def context_meter(used: int, limit: int) -> str:
    """``1234 / 2048 tokens in use (60%)``: the context meter of /show and the prompt's toolbar."""
    return f"{used:,} / {limit:,} tokens in use ({100 * used // max(limit, 1)}%)"


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


def _usage_with_aliases(command: Command) -> str:
    """``/exit, /quit, /bye``"""
    return ", ".join([command.usage, *(f"/{alias}" for alias in command.aliases)])


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _preview(text: str, width: int = 50) -> str:
    line = " ".join(text.split())
    return f"“{line[: width - 1]}…”" if len(line) > width else f"“{line}”"


def _show_value(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        if len(value) > _LONGEST_SHOWN:  # a page of instructions is not echoed whole: /show system shows it
            start = repr(f"{value[:_SHOWN_START].rstrip()} …")
            return f"{start} ({len(value):,} characters; /show system shows it all)"
        return repr(value) if "\n" not in value else f"{len(value)} characters"
    return str(value)


_LONGEST_SHOWN = 100  # characters of a text setting echoed as they are
_SHOWN_START = 60  # of a longer one, its start
