"""The terminal: the REPL loop and its keys, the slash-command table, the streaming Markdown renderer and
the presenter that shows a turn (for the REPL and for ask), terminal modes and signals, the clipboard.

May import: core, config, chat. Never local, remote or torch: the REPL never touches tensors; it gets a
Chat and a Backend from cli.
"""
