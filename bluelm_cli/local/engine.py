"""The chat engine: owns the model, its KV cache and the exact ids that cache holds; streams answers.

A new turn prefills only what is new: the longest common prefix with the cached ids is reused and the
cache is cropped there on divergence (undo, retry, edited history, another system prompt), never
thrown away. Generation runs in a worker thread; the caller iterates text deltas and may call `stop()`
from any thread. It takes prompt ids (the chat service fits the conversation into them) and knows
nothing about terminals; it is the local :class:`~bluelm_cli.chat.service.Backend`, and `bluelm bench` drives it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from bluelm_cli.core.backend import AnswerResult, BackendInfo
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.local.kv_cache import KV_CACHE_KINDS, Int8Layer
from bluelm_cli.local.context_shift import find_shift, rotary_inverse_frequencies, shift_cache, shiftable
from bluelm_cli.local.loading import LoadedModel, dtype_name
from bluelm_cli.local.prompt_lookup import DraftBudget, NgramLookup
from bluelm_cli.local.sampling import TokenSampler
from bluelm_cli.core.prompt import HUMAN_TAG, ContextOverflowError, PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.modeling.tokenizer import StreamDetokenizer
from bluelm_cli.core.worker_stream import WorkerStream


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a buffer that grows by doubling.

    DynamicLayer concatenates on every step, copying (and allocating) the whole layer's cache per token:
    O(context) work a token that dominated CPU decoding at 2K context. Here an append writes in place;
    `keys`/`values` are views of the first `length` rows, so crop() (a slice) works unchanged.
    """

    def __init__(self, max_capacity: int | None = None) -> None:
        super().__init__()
        self.max_capacity = max_capacity  # the context window: never reserve rows past it
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = max(256, 2 * (self._key_buffer.shape[-2] if self._key_buffer is not None else 0))
            if self.max_capacity:
                capacity = min(capacity, self.max_capacity)
            capacity = max(capacity, end)
            self._key_buffer = self._grow(self._key_buffer, key_states, length, capacity)
            self._value_buffer = self._grow(self._value_buffer, value_states, length, capacity)
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states  # type: ignore[index]
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]  # type: ignore[index]
        return self.keys, self.values

    @staticmethod
    def _grow(old: torch.Tensor | None, states: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        batch, heads, _, head_dim = states.shape
        buffer = torch.empty((batch, heads, capacity, head_dim), dtype=states.dtype, device=states.device)
        if old is not None and length:
            buffer[:, :, :length] = old[:, :, :length]
        return buffer


@dataclass(frozen=True)
class TokenizerEncoder:
    """The tokenizer as the prompt module sees it (a :class:`~bluelm_cli.core.prompt.PromptEncoder`)."""

    encode_plain: Callable[[str], list[int]]
    bos_id: int
    eos_id: int
    decode: Callable[[list[int]], str]
    vocab_size: int


# Never cuDNN's attention for a prefill: profiled on an H100 (torch 2.11, GPU check of 2026-11-25), it took
# 2.4 ms of host time per layer call (75 of the 133 ms a 35-token follow-up spent on the host, for 1.6 ms of
# GPU work) and about a second to plan each prompt length it had not seen. The other kernels plan nothing.
_PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Tokens a prefill forward takes at once. 2048 keeps a 32K prompt's activations to what a 2K prompt needs
# (e.g. the MLP's 2048 x 11008 intermediates in bf16: 43 MiB), while a chunk is still long enough to keep a GPU busy.
DEFAULT_PREFILL_CHUNK = 2048


class StepRunner:
    """Runs the model one call at a time over a cache. The CUDA fast path swaps in a compiled decode step."""

    # Positions the runner's cache can hold, when it is preallocated; None = as many as the model allows.
    max_positions: int | None = None

    def __init__(self, model: torch.nn.Module, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_cache: str = "model") -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        # "model": keys and values in the model's dtype; "int8": int8 with a scale per head and position (local.kv_cache).
        self.kv_cache = kv_cache
        self._decode_positions: dict[torch.device, torch.Tensor] = {}

    def new_cache(self) -> Cache:
        cache = DynamicCache(config=self.model.config)
        limit = getattr(self.model.config, "context_length", None)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            if self.kv_cache == "int8":
                raise ValueError("the int8 KV cache needs a model whose every layer has a full (not sliding) cache")
            return cache
        layer_class = Int8Layer if self.kv_cache == "int8" else _GrowingLayer
        cache.layers = [layer_class(limit) for _ in cache.layers]
        return cache

    def prefill(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run `ids` (positions `start`...) into `cache`; the next-token logits of the last one, [batch, vocab].

        In chunks of `prefill_chunk` tokens into the same cache: a 32K prompt in one forward would hold
        activations for every position at once (its attention scores and MLP activations run to GiBs).
        Only the last position's logits are ever formed (`logits_to_keep=1`): fp32 logits for 32K positions
        of a 100K vocabulary would take 12 GiB by themselves.
        """
        logits = None
        for offset in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, offset : offset + self.prefill_chunk]
            first = start + offset
            positions = torch.arange(first, first + chunk.shape[1], device=ids.device).unsqueeze(0)
            with sdpa_kernel(_PREFILL_ATTENTION):
                out = self.model(input_ids=chunk, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
        if logits is None:
            raise ValueError("prefill needs at least one token")
        return logits

    def decode(self, cache: Cache, token: torch.Tensor, position: int) -> torch.Tensor:
        """One token ([1, 1], at `position`) into `cache`: its next-token logits, [1, vocab], valid until the next call
        (a static runner returns its output buffer, which the next step overwrites; the caller may modify it)."""
        positions = self._decode_positions.get(token.device)
        if positions is None:
            # One position tensor per device, refilled every step rather than made anew.
            positions = self._decode_positions[token.device] = torch.empty((1, 1), dtype=torch.long, device=token.device)
        positions.fill_(position)
        with sdpa_kernel(_PREFILL_ATTENTION):
            out = self.model(input_ids=token, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def verify(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        """One forward over `ids` (a token and its speculative draft) from `start`: logits at every position, [n, vocab]."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=ids.shape[1])
        return out.logits[0]


class ChatEngine:
    def __init__(
        self, loaded: LoadedModel, runner: StepRunner | None = None, *, context_shift: bool = False,
        prompt_lookup: bool = False,
    ) -> None:
        self.loaded = loaded
        # Answers decode with prompt-lookup drafts checked in one forward (local.prompt_lookup): greedy ones pick
        # the tokens plain greedy decoding picks; sampled ones use exact speculative sampling (TokenSampler.speculate),
        # so every token has the distribution plain sampling gives it (a seed gives other tokens than without lookup).
        self.prompt_lookup = prompt_lookup
        # Opt-in: when old turns leave the prompt, move the kept turns' cache instead of prefilling them again
        # (local.context_shift). Answers then differ from a fresh prefill of the kept text.
        self.context_shift = context_shift
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        # Where the logits come out: with layers spread over several GPUs (accelerate's device map) that is
        # the last one, and sampling state lives beside them; accelerate moves input ids to the first.
        self.device = self.model.get_output_embeddings().weight.device
        self.runner = runner or StepRunner(self.model)
        # A preallocated (static) cache may hold fewer positions than the checkpoint allows.
        self.context_limit = min(loaded.context_length, self.runner.max_positions or loaded.context_length)
        self._cache: Cache | None = None
        self._cached_ids: list[int] = []
        self._lock = threading.Lock()
        self._human_id = self.tokenizer.sp_model.piece_to_id(HUMAN_TAG)
        self._eos_id = self.tokenizer.eos_token_id
        # The chat format is built by the pure prompt module; it needs only this much of the tokenizer.
        self.encoder = TokenizerEncoder(
            self.tokenizer.encode_plain,
            self.tokenizer.bos_token_id,
            self._eos_id,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            self.tokenizer.sp_model.get_piece_size(),  # never the padding rows past the tokenizer's pieces
        )

    def info(self) -> BackendInfo:
        loaded = self.loaded
        return BackendInfo(
            model_id=loaded.model_id,
            device=str(loaded.device),
            dtype=dtype_name(loaded.dtype),
            context_limit=self.context_limit,
            quantization=loaded.quantization or loaded.weights_format,
            architecture=_architecture(self.model.config),
            parameters=_parameter_count(self.model),
            origin=str(loaded.folder),
        )

    @property
    def cached_ids(self) -> tuple[int, ...]:
        """The ids whose keys and values the KV cache holds now (the conversation as the model has read it)."""
        return tuple(self._cached_ids)

    def count_tokens(self, text: str) -> int:
        return len(self.encoder.encode_plain(text))

    def reset(self) -> None:
        """Forget the cache (the next turn prefills from scratch)."""
        with self._lock:
            self._cache = None
            self._cached_ids = []

    # -------------------------------------------------------------------------------------- generation
    def stream(self, plan: PromptPlan, settings: SamplingSettings, *, min_new_tokens: int = 0) -> GenerationStream:
        """Start answering after `plan.ids`. Raises ContextOverflowError before starting if they can't fit.

        `min_new_tokens`: the answer cannot end (</s> or [|Human|]:) before it has this many tokens
        (generate()'s min_new_tokens; `bluelm bench` sets it so that every turn decodes the same count).
        """
        budget = self.context_limit - settings.max_new_tokens
        if len(plan.ids) > budget:
            raise ContextOverflowError(len(plan.ids), budget)
        return GenerationStream(self, plan, settings, min_new_tokens)

    def _generate(
        self,
        plan: PromptPlan,
        settings: SamplingSettings,
        min_new_tokens: int,
        stop_event: threading.Event,
        emit: Callable[[str], None],
    ) -> AnswerResult:
        with self._lock, torch.inference_mode():
            try:
                return self._generate_locked(plan, settings, min_new_tokens, stop_event, emit)
            except BaseException:
                # A failure mid-step can leave the cache half-written: start clean next time.
                self._cache = None
                self._cached_ids = []
                raise

    def _generate_locked(
        self,
        plan: PromptPlan,
        settings: SamplingSettings,
        min_new_tokens: int,
        stop_event: threading.Event,
        emit: Callable[[str], None],
    ) -> AnswerResult:
        started = time.perf_counter()
        ids = plan.ids
        reused = _common_prefix_length(self._cached_ids, ids)
        reused = min(reused, len(ids) - 1)  # at least one token must run to get the next-token logits
        shifted = 0
        if self._cache is None:
            self._cache = self.runner.new_cache()
            reused = 0
        else:
            cache_length = len(self._cached_ids)
            if self.context_shift:
                shifted = self._shift_kept_turns(ids, reused)
                reused += shifted
            if cache_length > reused:
                self._cache.crop(-(cache_length - reused))
        self._cached_ids = self._cached_ids[:reused]

        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        # The repetition penalty sees prompt and answer, as generate() does; a preallocated buffer avoids regrowth.
        history_ids = torch.empty((1, len(ids) + settings.max_new_tokens + 1), dtype=torch.long, device=self.device)
        history_ids[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        length = len(ids)

        suffix = history_ids[:, reused:length]
        logits = self.runner.prefill(self._cache, suffix, reused)
        forwards = 1
        self._cached_ids = list(ids)

        detokenizer = StreamDetokenizer(self.tokenizer)
        answer_ids: list[int] = []
        finish = FinishReason.LENGTH
        first_token_at = last_token_at = 0.0
        stop_ids = torch.tensor([self._eos_id, self._human_id], dtype=torch.long, device=self.device)
        reader = _TokenReader(self.device)
        # Sampling runs on the device with its state in buffers (local.sampling); its repetition penalty has seen the prompt.
        sampler = TokenSampler(settings, logits.shape[-1], logits.device, stop_ids, generator)
        sampler.observe(history_ids[:, :length])
        if self.prompt_lookup:
            finish, first_token_at, last_token_at, forwards = self._decode_with_lookup(
                ids, logits, history_ids, settings, min_new_tokens, sampler, stop_event, detokenizer, answer_ids, emit,
                forwards,
            )
        else:
            while True:
                sampled = sampler(logits, len(answer_ids) < min_new_tokens)
                reader.copy(sampled)
                # The sampled token goes into the history on the device, and the next forward is queued before the
                # host reads the token: the host's work for this token (stop checks, detokenizing, streaming) then
                # overlaps the GPU's next forward. If the token turns out to end the answer, that one forward was
                # spare; the cache then holds the stop token too, and `_cached_ids` says so.
                history_ids[:, length] = sampled
                length += 1
                more = len(answer_ids) + 1 < settings.max_new_tokens and length < self.context_limit
                queued = more and not stop_event.is_set()
                if queued:
                    logits = self.runner.decode(self._cache, history_ids[:, length - 1 : length], length - 1)
                    forwards += 1
                token = reader.value()
                if queued:
                    self._cached_ids.append(token)
                now = time.perf_counter()
                if not answer_ids and not first_token_at:
                    first_token_at = now
                last_token_at = now
                if token in (self._eos_id, self._human_id):
                    finish = FinishReason.STOP
                    break
                answer_ids.append(token)
                delta = detokenizer.add(token)
                if delta:
                    emit(delta)
                if stop_event.is_set():
                    finish = FinishReason.INTERRUPTED
                    break
                if len(answer_ids) >= settings.max_new_tokens:
                    finish = FinishReason.LENGTH
                    break
                if length >= self.context_limit:
                    finish = FinishReason.CONTEXT
                    break
        tail = detokenizer.flush()
        if tail:
            emit(tail)
        decode_seconds = last_token_at - first_token_at
        return AnswerResult(
            text=detokenizer.text,
            answer_ids=answer_ids,
            finish_reason=finish,
            prompt_tokens=len(ids),
            reused_tokens=reused,
            new_tokens=len(answer_ids),
            ttft_s=first_token_at - started,
            decode_tok_s=(len(answer_ids) - 1) / decode_seconds if len(answer_ids) > 1 and decode_seconds > 0 else 0.0,
            context_tokens=len(ids) + len(answer_ids) + 1,
            context_limit=self.context_limit,
            forwards=forwards,
            shifted_tokens=shifted,
        )

    def _decode_with_lookup(
        self, ids: list[int], logits: torch.Tensor, history_ids: torch.Tensor, settings: SamplingSettings,
        min_new_tokens: int, sampler: TokenSampler, stop_event: threading.Event,
        detokenizer: StreamDetokenizer, answer_ids: list[int], emit: Callable[[str], None], forwards: int,
    ) -> tuple[FinishReason, float, float, int]:
        """Decoding with prompt-lookup drafts: (finish, first and last token times, forwards)."""
        lookup = NgramLookup(ids)
        budget = DraftBudget()
        length = len(ids)
        first_token_at = last_token_at = 0.0
        # The answer's next tokens, chosen from logits already computed; all but the last are in the cache.
        queue = [int(sampler(logits, len(answer_ids) < min_new_tokens))]
        while True:
            for token in queue:
                history_ids[0, length] = token
                length += 1
                lookup.append(token)
                last_token_at = time.perf_counter()
                first_token_at = first_token_at or last_token_at
                if token in (self._eos_id, self._human_id):
                    return FinishReason.STOP, first_token_at, last_token_at, forwards
                answer_ids.append(token)
                delta = detokenizer.add(token)
                if delta:
                    emit(delta)
                if stop_event.is_set():
                    return FinishReason.INTERRUPTED, first_token_at, last_token_at, forwards
                if len(answer_ids) >= settings.max_new_tokens:
                    return FinishReason.LENGTH, first_token_at, last_token_at, forwards
                if length >= self.context_limit:
                    return FinishReason.CONTEXT, first_token_at, last_token_at, forwards
            queue = self._verify_step(lookup, budget, history_ids, length, settings, answer_ids, min_new_tokens, sampler)
            forwards += 1

    def _verify_step(
        self, lookup: NgramLookup, budget: DraftBudget, history_ids: torch.Tensor, length: int, settings: SamplingSettings,
        answer_ids: list[int], min_new_tokens: int, sampler: TokenSampler,
    ) -> list[int]:
        """One forward over the last token and a prompt-lookup draft; the tokens it settles, in order.

        Row i of the logits gives the token after draft token i; drafted tokens are kept while the sampler accepts
        them (greedy: while they are the argmax), and the first rejected row (or the row after the whole draft)
        gives one more token. The cache keeps the last token and the accepted drafts; the rejected ones are cropped
        off. An accepted drafted stop ends the answer there (the caller stops at it; the cache keeps what follows it
        among the accepted drafts, and `_cached_ids` says so).
        """
        room = min(settings.max_new_tokens - len(answer_ids) - 1, self.context_limit - length - 1)
        allowed = min(budget.limit(), room)
        draft = lookup.draft(allowed) if allowed > 0 else []
        last = history_ids[:, length - 1 : length]
        if not draft:
            logits = self.runner.decode(self._cache, last, length - 1)
            self._cached_ids.append(lookup.tokens[-1])  # the host copy: reading the device's would sync
            return [int(sampler(logits, len(answer_ids) < min_new_tokens))]
        history_ids[0, length : length + len(draft)] = torch.tensor(draft, dtype=torch.long)
        rows = self.runner.verify(self._cache, history_ids[:, length - 1 : length + len(draft)], length - 1)
        # The rows before min_new_tokens cannot choose a stop (a drafted stop there is rejected: its p is 0).
        suppressed = max(0, min(len(draft) + 1, min_new_tokens - len(answer_ids)))
        # Accept or reject the drafts on the device (greedy: the argmax; sampled: exact speculative sampling), then
        # read the count and the tokens in one go: one host sync per verify forward.
        outcome = sampler.speculate(rows, history_ids[0, length : length + len(draft)], suppressed).tolist()
        accepted = outcome[0]
        settled = outcome[1 : accepted + 2]
        budget.update(len(draft), accepted)
        if accepted < len(draft):
            self._cache.crop(-(len(draft) - accepted))  # type: ignore[union-attr]
        self._cached_ids += [lookup.tokens[-1], *draft[:accepted]]
        return settled

    def _shift_kept_turns(self, ids: list[int], start: int) -> int:
        """Context shift: if the cache holds the prompt's next tokens later on (old turns were dropped before
        them), move them to `start` onwards, keys re-rotated; the count moved (0: nothing to move, or a
        cache that cannot be moved). `_cached_ids` is updated to match; the caller crops the cache."""
        found = find_shift(self._cached_ids, ids, start)
        inv_freq = rotary_inverse_frequencies(self.model)
        if found is None or inv_freq is None or self._cache is None or not shiftable(self._cache):
            return 0
        source, length = found
        length = min(length, len(ids) - 1 - start)  # one token must still run for the next-token logits
        if length <= 0:
            return 0
        shift_cache(self._cache, inv_freq, start, source, length)
        self._cached_ids = self._cached_ids[:start] + self._cached_ids[source : source + length] + self._cached_ids[start + length :]
        return length


class GenerationStream(WorkerStream[AnswerResult]):
    """Iterate for text deltas; `result` holds the AnswerResult once iteration ends.

    `stop()` may be called from any thread (or a signal handler); generation ends within one decoding
    step and the partial answer is returned with finish_reason "interrupted". An exception in the
    worker is re-raised in the iterating thread.
    """

    def __init__(self, engine: ChatEngine, plan: PromptPlan, settings: SamplingSettings, min_new_tokens: int = 0) -> None:
        self.plan = plan
        self._stop = threading.Event()
        self._start(lambda emit: engine._generate(plan, settings, min_new_tokens, self._stop, emit), "bluelm-generate")

    def stop(self) -> None:
        self._stop.set()


def _architecture(config: object) -> str:
    names = getattr(config, "architectures", None) or [type(config).__name__.removesuffix("Config")]
    parts = [str(names[0])]
    for attribute, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size"), ("num_attention_heads", "attention heads")):
        value = getattr(config, attribute, None)
        if value is not None:
            parts.append(f"hidden size {value}" if attribute == "hidden_size" else f"{value} {label}")
    return ", ".join(parts)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


class _TokenReader:
    """Reads a sampled token on the host while later work stays queued on the GPU.

    `tensor.item()` would wait for everything queued on the stream, the next forward included; an asynchronous
    copy into pinned memory and an event wait only for the sampling. On a CPU every op has already run.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._pending: torch.Tensor | None = None
        if self._cuda:
            self._host = torch.empty((1,), dtype=torch.long, pin_memory=True)
            self._copied = torch.cuda.Event()

    def copy(self, token: torch.Tensor) -> None:
        if self._cuda:
            self._host.copy_(token.view(1), non_blocking=True)
            self._copied.record()
        else:
            self._pending = token

    def value(self) -> int:
        if self._cuda:
            self._copied.synchronize()
            return int(self._host[0])
        assert self._pending is not None
        return int(self._pending.view(-1)[0])


def _parameter_count(model: torch.nn.Module) -> int:
    """The model's weights, counting a 4-bit release's packed linears (buffers, not parameters) as out × in."""
    from bluelm_cli.modeling.quantized import PackedInt4Linear

    packed = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, PackedInt4Linear))
    return sum(parameter.numel() for parameter in model.parameters()) + packed
