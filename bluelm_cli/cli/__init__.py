"""The Typer faces: chat, ask, bench, export, sessions, config; options generated from the settings table;
start-up (opening the local model or a served one). The only layer that picks a backend.

app.py is the group (the command line read, every error one line and an exit status) and registers the
commands, one module each: ask.py, chat_command.py, config_command.py, sessions.py, bench_command.py,
export_command.py; what several of them share is in common.py.

May import: every other layer. Nothing imports cli.
"""
