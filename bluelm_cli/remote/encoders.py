"""Counting tokens for a served model, which tokenizes prompts itself.

The chat service fits the conversation into the context with a :class:`~bluelm_cli.core.prompt.PromptEncoder`;
for a server its counts must be right or too high, never too low. In order of preference:

1. :class:`ServerEncoder` — the server's own tokenize endpoint (vLLM and SGLang `/tokenize`, llama.cpp
   `/tokenize`, TGI `/tokenize`): exact.
2. :class:`SentencePieceEncoder` — `--model` names a local BlueLM folder (a checkpoint or its export)
   holding `tokenizer.model`: exact for a BlueLM export, which tokenizes like SentencePiece.
3. :class:`ByteEstimateEncoder` — neither: one "token" per UTF-8 byte, plus one per segment. No
   SentencePiece or byte-level BPE tokenizer makes more tokens than that, so the estimate is an upper
   bound: answers are never cut by the server for lack of room, but old turns are dropped early (about
   3-4 times the real count for English or Chinese text).

The ids of 1 and 3 are only ever counted (and, for `ask --truncate`, decoded back); nothing sends them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.remote.http import PROBE_TIMEOUT_S, HttpClient, RemoteError

# Stand-ins: prompt ids for a server are counted, never sent, so BOS/EOS need only occupy one place each.
_BOS, _EOS = -1, -2
_MEMO_LIMIT = 4096
# A served model is sent text, never ids: a saved answer's ids (from whichever tokenizer) are never "foreign".
_ANY_ID = 2**62


class ServerEncoder:
    """Counts with the server's tokenize endpoint; remembers each text's ids (history is re-counted every turn)."""

    description = "by the server"

    def __init__(self, client: HttpClient, model: str, tokenize_path: str, detokenize_path: str) -> None:
        self.bos_id, self.eos_id = _BOS, _EOS
        self.vocab_size = _ANY_ID
        self._client = client
        self._model = model
        self._tokenize = tokenize_path
        self._detokenize = detokenize_path
        self._memo: dict[str, list[int]] = {}

    @classmethod
    def probe(cls, client: HttpClient, model: str) -> ServerEncoder | None:
        """The server's tokenize endpoint if it has one that answers with ids, else None."""
        for path in (f"{client.url.root_path}/tokenize", f"{client.url.api_path}/tokenize"):
            try:
                ids = _ids_from(client.request_json("POST", path, _tokenize_body(model, "[|Human|]:hi"), timeout=PROBE_TIMEOUT_S))
            except RemoteError:
                continue
            if ids:
                return cls(client, model, path, path.removesuffix("tokenize") + "detokenize")
        return None

    def encode_plain(self, text: str) -> list[int]:
        if text not in self._memo:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            ids = _ids_from(self._client.request_json("POST", self._tokenize, _tokenize_body(self._model, text)))
            if ids is None:
                raise BlueLMError(f"the server's {self._tokenize} answered without token ids; try again")
            self._memo[text] = ids
        return list(self._memo[text])

    def decode(self, ids: list[int]) -> str:
        body = {"model": self._model, "tokens": ids}
        answer = self._client.request_json("POST", self._detokenize, body)
        text = answer.get("prompt", answer.get("content")) if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise BlueLMError(f"the server's {self._detokenize} did not return text; shorten the prompt instead of --truncate")
        return text


class SentencePieceEncoder:
    """Counts with the `tokenizer.model` of a local BlueLM folder (no torch, no transformers)."""

    description = "by the local tokenizer"

    def __init__(self, model_file: Path) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.vocab_size = _ANY_ID

    @classmethod
    def from_folder(cls, model: str) -> SentencePieceEncoder | None:
        path = Path(model).expanduser() / "tokenizer.model"
        return cls(path) if path.is_file() else None

    def encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class ByteEstimateEncoder:
    """An upper bound: each UTF-8 byte one id, plus a leading id per segment (a tokenizer's word prefix)."""

    description = "estimated (upper bound: one per UTF-8 byte)"
    _SEGMENT = 256

    def __init__(self) -> None:
        self.bos_id, self.eos_id = _BOS, _EOS
        self.vocab_size = _ANY_ID

    def encode_plain(self, text: str) -> list[int]:
        return [self._SEGMENT, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "ignore")


def _tokenize_body(model: str, text: str) -> dict[str, Any]:
    # One body for every server's spelling: vLLM/SGLang read "prompt", llama.cpp "content", TGI "inputs".
    return {"model": model, "prompt": text, "content": text, "inputs": text,
            "add_special_tokens": False, "add_special": False}


def _ids_from(answer: Any) -> list[int] | None:
    """Token ids from a tokenize answer: {"tokens": [ids]} (vLLM, SGLang, llama.cpp; llama.cpp's
    with_pieces gives [{"id": …}]), or TGI's [{"id": …, "text": …}]."""
    items = answer.get("tokens") if isinstance(answer, dict) else answer
    if not isinstance(items, list):
        return None
    ids: list[int] = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("id")
        if not isinstance(item, int) or isinstance(item, bool):
            return None
        ids.append(item)
    return ids
