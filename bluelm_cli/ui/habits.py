"""Words people bring from `ollama run`, `llm chat` and `aichat`, and what to use here instead.

Slash commands that ollama (or habit) has and we don't, llm chat's `!` words and aichat's `.` words are
answered with the command to use, rather than "unknown command" or being sent to the model.
"""

from __future__ import annotations

__all__ = ["SETTING_ALIASES", "foreign_command_hint", "foreign_line_hint", "foreign_set_hint", "setting_alias"]

_MULTILINE = 'start a multi-line message with """ and end it with """ (Alt-Enter also adds a line)'

# /word → what to use (for slash words that are not ours).
_SLASH_WORDS: dict[str, str] = {
    "system": "use /set system TEXT",
    "parameters": "use /show parameters",
    "params": "use /show parameters",
    "info": "use /show info",
    "verbose": "use /set verbose (or /stats on)",
    "quiet": "use /set quiet (or /stats off)",
    "new": "use /reset (or /clear)",
    "regenerate": "use /retry",
    "regen": "use /retry",
    "cont": "use /continue",
    "edit": "press Ctrl-X Ctrl-E to edit the message in $EDITOR",
    "multi": f"{_MULTILINE}",
    "history": "the input history is chosen at start: bluelm chat --no-history keeps none",
    "nohistory": "the input history is chosen at start: bluelm chat --no-history keeps none",
    "model": "the model is chosen at start (bluelm chat --model M); /show info describes this one",
    "models": "the model is chosen at start (bluelm chat --model M); /show info describes this one",
    "list": "the model is chosen at start (bluelm chat --model M); bluelm sessions lists saved chats",
    "sessions": "in the shell, bluelm sessions lists saved chats and bluelm chat --resume NAME continues one",
    "template": "use /show template (BlueLM's chat format is fixed)",
    "attach": "use /file PATH",
    "fragment": "use /file PATH",
}

# Whole lines that are another tool's command (llm chat's ! words, aichat's . words).
_LINE_WORDS: dict[str, tuple[str, str]] = {
    "!multi": ("llm chat", _MULTILINE),
    "!end": ("llm chat", 'end a multi-line message with """'),
    "!edit": ("llm chat", "press Ctrl-X Ctrl-E to edit the message in $EDITOR"),
    "!fragment": ("llm chat", "use /file PATH"),
    ".help": ("aichat", "use /help"),
    ".exit": ("aichat", "use /exit (or Ctrl-D)"),
    ".continue": ("aichat", "use /continue"),
    ".regenerate": ("aichat", "use /retry"),
    ".file": ("aichat", "use /file PATH"),
    ".clear": ("aichat", "use /clear"),
    ".info": ("aichat", "use /show info"),
}

_TAKES_ARGUMENT = ("!fragment", ".file")

# /set WORD in ollama that we don't take.
_SET_WORDS: dict[str, str] = {
    "history": "the input history is chosen at start: bluelm chat --no-history (or history = false in the config file) keeps none",
    "nohistory": "the input history is chosen at start: bluelm chat --no-history (or history = false in the config file) keeps none",
    "wordwrap": "answers always wrap at the terminal's width",
    "nowordwrap": "answers always wrap at the terminal's width",
    "format": "there is no JSON mode; ask for JSON in the message",
    "noformat": "there is no JSON mode; ask for JSON in the message",
    "template": "BlueLM's chat format is fixed; /show template shows it",
    "num_ctx": "the context window is the model's own; /show says how much of it is in use",
    "stop": "answers end at the model's </s>; /set num_predict N limits their length",
    "min_p": "use top_p or top_k",
    "repeat_last_n": "repeat_penalty looks at the whole answer",
}

# Other names for settings /set takes: ollama's parameter names and short forms.
SETTING_ALIASES: dict[str, str] = {
    "num_predict": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "temp": "temperature",
    "repeat_penalty": "repetition_penalty",
}


def foreign_command_hint(name: str) -> str | None:
    """What to use instead of `/name`, if it is a word from another tool."""
    return _SLASH_WORDS.get(name.lower())


def foreign_line_hint(line: str) -> str | None:
    """``!multi is llm chat's; here …`` if the whole line (its first word) is another tool's command."""
    parts = line.strip().split(maxsplit=1)
    word = parts[0].lower() if parts else ""
    known = _LINE_WORDS.get(word)
    # Only the word alone, or a word that takes an argument: "!multiline strings?" is a message.
    if known is None or (len(parts) > 1 and word not in _TAKES_ARGUMENT):
        return None
    tool, instead = known
    return f"{word} is {tool}'s; here, {instead}"


def foreign_set_hint(key: str) -> str | None:
    return _SET_WORDS.get(key.lower())


def setting_alias(key: str) -> str | None:
    """The setting an ollama name or a short form (num_predict, temp, repeat_penalty) stands for."""
    return SETTING_ALIASES.get(key.lower())
