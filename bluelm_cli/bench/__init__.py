"""The measurements behind `bluelm bench`: turns on the local engine or a served model, and the engine
overhead per token. Imported only by `bluelm bench` (never by chat, ask or --help).

May import: core, config, modeling, local, remote, testing.
"""
