"""The Typer faces: chat, ask, bench, export, sessions, config; options generated from the settings table;
start-up (opening the local model or a served one). The only layer that picks a backend.

May import: every other layer. Nothing imports cli.
"""
