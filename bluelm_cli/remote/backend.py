"""The served model as a chat backend: which model, how long its context is, how to count, how to ask."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bluelm_cli.core.backend import BackendInfo
from bluelm_cli.core.prompt import BOS_TEXT, HUMAN_TAG, PromptEncoder, PromptPlan, prompt_text
from bluelm_cli.remote.encoders import ByteEstimateEncoder, SentencePieceEncoder, ServerEncoder
from bluelm_cli.remote.http import PROBE_TIMEOUT_S, HttpClient, RemoteError, ServerURL
from bluelm_cli.remote.stream import RemoteStream
from bluelm_cli.core.settings import SamplingSettings

# When the server does not say its context length: BlueLM-7B-Chat's.
DEFAULT_CONTEXT = 2048
# Sampling parameters outside OpenAI's API: vLLM and SGLang read top_k and repetition_penalty, llama.cpp
# top_k and repeat_penalty; strict servers (transformers serve) refuse unknown fields: then they go in
# transformers serve's `generation_config`, and if that is refused too, not at all (for the rest of the
# chat). Every value is sent, a repetition penalty of 1.0 too: left out, a server applies the model's own
# default (BlueLM's generation_config: 1.1).
_EXTRA_FIELDS = ("top_k", "repetition_penalty", "repeat_penalty")


@dataclass(frozen=True)
class ServerModel:
    name: str  # as shown and journaled: the server's id made safe for a terminal
    context_limit: int
    context_source: str  # where the context length was read, for the banner and /show
    id: str = ""  # as the server spells it, sent back in every request

    @property
    def request_id(self) -> str:
        return self.id or self.name


class RemoteBackend:
    """A model served over HTTP; `stream()` posts the conversation as chat messages."""

    def __init__(self, client: HttpClient, model: ServerModel, encoder: PromptEncoder, counting: str) -> None:
        self.client = client
        self.model = model
        self.encoder = encoder
        self.counting = counting  # how prompt tokens are counted (see remote.encoders)
        self.context_limit = model.context_limit
        self._extras = "fields"  # how top_k and repetition_penalty are sent: fields, generation_config, none
        self._text_completions = True  # /continue through /v1/completions (until the server has none)

    def info(self) -> BackendInfo:
        return BackendInfo(
            model_id=self.model.name,
            device=f"served at {self.client.url.api}",
            dtype=f"tokens counted {self.counting}",
            context_limit=self.context_limit,
        )

    def request(self, plan: PromptPlan, settings: SamplingSettings) -> tuple[str, dict[str, Any]]:
        """Where to post the turn and what. A new answer is a chat completion; /continue (an answer left open)
        is a text completion of the conversation in BlueLM's own format, which `transformers serve`, vLLM,
        SGLang, llama.cpp, TGI and ollama all serve (`transformers serve` refuses vLLM's
        `continue_final_message`, and its chat template can't leave the last answer open). A server without
        /v1/completions gets the chat request with `continue_final_message` (vLLM's and SGLang's way)."""
        body: dict[str, Any] = {
            "model": self.model.request_id,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": 1.0 if settings.greedy else settings.top_p,
            "stop": [HUMAN_TAG],
        }
        if settings.seed is not None:
            body["seed"] = settings.seed
        extras: dict[str, Any] = {"repetition_penalty": settings.repetition_penalty}
        if settings.top_k and not settings.greedy:
            extras["top_k"] = settings.top_k
        if self._extras == "fields":
            body.update(extras, repeat_penalty=settings.repetition_penalty)
        elif self._extras == "generation_config":  # transformers serve's way to pass generate() arguments
            body["generation_config"] = json.dumps(extras)
        if plan.partial_answer and self._text_completions:
            return f"{self.client.url.api_path}/completions", {**body, "prompt": continuation_prompt(plan)}
        messages: list[dict[str, str]] = []
        if plan.system:
            messages.append({"role": "system", "content": plan.system})
        for turn in plan.history:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.answer}]
        messages.append({"role": "user", "content": plan.message})
        body["messages"] = messages
        if plan.partial_answer:  # the open answer goes last, to be extended
            messages.append({"role": "assistant", "content": plan.partial_answer})
            body["continue_final_message"], body["add_generation_prompt"] = True, False
        return f"{self.client.url.api_path}/chat/completions", body

    def stream(self, plan: PromptPlan, settings: SamplingSettings) -> RemoteStream:
        path, body = self.request(plan, settings)

        def again(sent_path: str, sent_body: dict[str, Any], error: RemoteError) -> tuple[str, dict[str, Any]] | None:
            return self.request(plan, settings) if self._adapt(sent_path, sent_body, error) else None

        return RemoteStream(
            self.client, body, path=path, prompt_tokens=len(plan.ids),
            context_limit=self.context_limit, on_refused=again,
        )

    def _adapt(self, path: str, body: dict[str, Any], error: RemoteError) -> bool:
        """Whether a refusal names something this chat can do without (then it is not sent again): the
        sampling fields outside OpenAI's API (then they go as `generation_config`, then not at all), or
        /v1/completions (then /continue asks with the chat request)."""
        if error.status in (400, 422):
            if any(name in body and name in error.detail for name in _EXTRA_FIELDS):
                self._extras = "generation_config"
                return True
            if "generation_config" in body and "generation_config" in error.detail:
                self._extras = "none"
                return True
        if path.endswith("/completions") and not path.endswith("/chat/completions") and error.status in (404, 405, 501):
            self._text_completions = False
            return True
        return False


def continuation_prompt(plan: PromptPlan) -> str:
    """The conversation as BlueLM's prompt text with the open answer last: `{system}[|Human|]:…[|AI|]:{answer}`.
    No leading `<s>`: the server's tokenizer adds it."""
    history = [(turn.user, turn.answer) for turn in plan.history]
    return prompt_text(plan.system, history, plan.message).removeprefix(BOS_TEXT) + plan.partial_answer


def connect(api: str, *, api_key: str | None, model: str | None, local_tokenizer: str | None = None) -> RemoteBackend:
    """Reach the server, pick the model (`model`, else the first it lists), read its context length and
    choose how to count tokens. Raises RemoteError (one line) when the server can't be used."""
    client = HttpClient(ServerURL.parse(api), api_key)
    listed = _list_models(client)
    if model is None:
        if not listed:
            raise RemoteError(f"the server at {client.url.api} lists no models; name one with --model")
        entry = listed[0]
    else:
        entry = next((item for item in listed if item.get("id") == model), None)
        if entry is None:
            names = ", ".join(client.server_text(str(item.get("id"))) for item in listed[:8]) or "none"
            raise RemoteError(f"the server at {client.url.api} does not serve '{model}' (it serves: {names}); "
                              "choose one with --model")
    name = str(entry["id"])
    served = ServerModel(client.server_text(name), *_context_length(client, name, entry), id=name)
    encoder: PromptEncoder | None = ServerEncoder.probe(client, name)
    if encoder is None and local_tokenizer:
        encoder = SentencePieceEncoder.from_folder(local_tokenizer)
    if encoder is None:
        encoder = ByteEstimateEncoder()
    return RemoteBackend(client, served, encoder, encoder.description)  # type: ignore[attr-defined]


def _list_models(client: HttpClient) -> list[dict[str, Any]]:
    path = f"{client.url.api_path}/models"
    answer = client.request_json("GET", path)
    models = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(models, list) or not all(isinstance(item, dict) and "id" in item for item in models):
        raise RemoteError(f"{client.url.api} answered GET {path} without a model list; "
                          "check that --api points at an OpenAI-compatible server")
    return models


def _context_length(client: HttpClient, name: str, entry: dict[str, Any]) -> tuple[int, str]:
    """The served context length, from wherever this server says it; else DEFAULT_CONTEXT."""
    if _positive(entry.get("max_model_len")):  # vLLM, SGLang
        return entry["max_model_len"], "/v1/models max_model_len"
    root = client.url.root_path
    probes = (
        ("GET", f"{root}/props", None, lambda a: (a.get("default_generation_settings") or {}).get("n_ctx") or a.get("n_ctx"), "/props n_ctx"),  # llama.cpp
        ("GET", f"{root}/info", None, lambda a: a.get("max_total_tokens"), "/info max_total_tokens"),  # TGI
        ("POST", f"{root}/api/show", {"model": name}, _ollama_context, "/api/show num_ctx"),  # ollama
    )
    for method, path, body, read, source in probes:
        try:
            answer = client.request_json(method, path, body, timeout=PROBE_TIMEOUT_S)
            value = read(answer) if isinstance(answer, dict) else None
        except (RemoteError, AttributeError, TypeError):
            continue
        if _positive(value):
            return value, source
    return DEFAULT_CONTEXT, "assumed: the server does not say"


def _ollama_context(answer: dict[str, Any]) -> int | None:
    # ollama runs a model with num_ctx (a Modelfile parameter), not the model's trained length.
    for line in str(answer.get("parameters") or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "num_ctx" and value.strip().isdigit():
            return int(value.strip())
    return None


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
