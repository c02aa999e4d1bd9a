"""Chat with a served model: a :class:`~bluelm_cli.core.backend.Backend` for OpenAI-compatible servers.

`bluelm chat --api http://host:8000/v1` answers through vLLM, SGLang, TGI, llama.cpp's server, ollama or
`transformers serve` instead of a local model; the chat service (journal, /retry, /undo, /set, /stats,
system prompt) is the same. Nothing here imports torch or transformers: the REPL starts at once.

May import: core, config. Never torch, transformers or terminal code.
"""

from __future__ import annotations

from bluelm_cli.remote.backend import RemoteBackend, connect
from bluelm_cli.remote.http import RemoteError, ServerURL

__all__ = ["RemoteBackend", "RemoteError", "ServerURL", "connect"]
