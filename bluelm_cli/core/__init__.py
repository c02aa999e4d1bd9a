"""The lowest layer: the types every other layer shares, and nothing else.

The errors a user can act on, why an answer ended (FinishReason), the Backend protocol and the answer
result both backends return, the chat format as prompt ids and how a conversation is fitted into the
context, the settings table with its validation, the worker-thread stream both backends use, and the one
sanitiser for text that reaches a terminal from outside.

May import: the standard library only (no torch, transformers, rich, prompt_toolkit or typer).
"""
