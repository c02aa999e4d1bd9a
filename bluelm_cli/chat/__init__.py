"""The chat service: one call owns a turn (journal the message, fit the context, stream events, commit the
ending), for every face; the conversation, its crash-safe journal, transcripts, attachments, and the
backend that loads in the background. bluelm_cli/session.py (where the design card puts it) belongs here.

May import: core, config. Never a backend implementation (local, remote) and never terminal code: it
speaks to any core.Backend.
"""
