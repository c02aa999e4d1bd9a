"""Per-token time spent outside the model's forward pass, measured two ways for `bluelm bench`.

1. Instrumented: a real generation whose decode steps are timed one by one (`TimedRunner`), with the
   device synchronised before and after each forward so its GPU time falls inside the window. Whatever
   remains of the decode window (first to last answer token) is the engine's own per-token work:
   sampling, the repetition penalty, detokenizing, streaming through the worker queue. The engine queues
   a token's forward before the host reads the token, so the first forward runs before the window opens
   and the window holds one forward fewer than it has tokens after the first. On a GPU the syncs stop
   the engine's work overlapping the forward, as it does in a plain run: an upper bound there; on a CPU
   it is exact.
2. Stubbed: the same decode loop with the forward replaced by a fixed logits row of a chosen vocabulary
   size (`CachedLogitsRunner`): every token then costs only the engine's own work. This isolates the
   sampling cost at the published 7B vocabulary (100,096) on any machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from transformers.cache_utils import Cache

from bluelm_cli.local.engine import ChatEngine, StepRunner
from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings

PUBLISHED_VOCAB = 100_096  # BlueLM-7B's config.json vocab_size
# Tokens each overhead run decodes at least (where the context has room), whatever the bench's turns decode: a
# 2-token turn has one interval to time, too few to say anything.
MIN_OVERHEAD_TOKENS = 16


@dataclass
class ForwardSplit:
    """One instrumented generation: the decode window split into forward passes and everything else."""

    decode_steps: int  # forward passes of the answer: one per token after the first (which the prefill gives)
    window_s: float  # first to last answer token: decode_steps intervals
    forward_s: float  # summed forward passes (device-synchronised), decode_steps of them
    first_forward_s: float  # the one queued before the first token was read, outside the window

    @property
    def forward_ms_per_token(self) -> float:
        return 1000 * self.forward_s / self.decode_steps

    @property
    def _outside_s(self) -> float:
        return self.window_s - (self.forward_s - self.first_forward_s)

    @property
    def outside_ms_per_token(self) -> float:
        return 1000 * self._outside_s / self.decode_steps

    @property
    def outside_fraction(self) -> float:
        return self._outside_s / self.window_s


@dataclass
class OverheadReport:
    forward_ms_per_token: float  # median over the instrumented runs
    outside_forward_ms_per_token: float
    outside_forward_fraction: float  # of the decode time
    runs: int
    # Stubbed forward: engine-only ms per token, keyed "<vocab> <greedy|default sampling>".
    stub_ms_per_token: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class TimedRunner(StepRunner):
    """Delegates to another runner and times each decode() call, synchronising the device around it."""

    def __init__(self, inner: StepRunner) -> None:
        super().__init__(inner.model)
        self.inner = inner
        self.max_positions = inner.max_positions
        self.decode_times: list[float] = []

    def new_cache(self) -> Cache:
        return self.inner.new_cache()

    def prefill(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.inner.prefill(cache, ids, start)

    def decode(self, cache: Cache, token: torch.Tensor, position: int) -> torch.Tensor:
        _synchronize(token.device)
        started = time.perf_counter()
        logits = self.inner.decode(cache, token, position)
        _synchronize(token.device)
        self.decode_times.append(time.perf_counter() - started)
        return logits


class CachedLogitsRunner(StepRunner):
    """No model: every step returns (a copy of, as the compiled runner does) one fixed logits row."""

    def __init__(self, model: torch.nn.Module, logits: torch.Tensor) -> None:
        super().__init__(model)
        self.logits = logits

    def new_cache(self) -> Cache:
        return _NoCache()

    def prefill(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.logits.clone()

    def decode(self, cache: Cache, token: torch.Tensor, position: int) -> torch.Tensor:
        return self.logits.clone()


class _NoCache:
    """What the engine asks of a cache, for a runner that has none."""

    def crop(self, max_length: int) -> None:
        pass


def stub_logits(vocab_size: int, sampleable: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A [1, vocab_size] logits row shaped like a model's: random over the tokenizer's pieces, masked past them."""
    generator = torch.Generator().manual_seed(seed)
    row = torch.randn((1, vocab_size), generator=generator) * 4
    row[:, sampleable:] = torch.finfo(torch.float32).min
    return row.to(device=device, dtype=dtype)


def measure_split(engine: ChatEngine, prompt_ids: list[int], settings: SamplingSettings) -> ForwardSplit:
    """One generation of exactly settings.max_new_tokens tokens with every forward timed."""
    timed = TimedRunner(engine.runner)
    instrumented = ChatEngine(engine.loaded, runner=timed)
    result = instrumented.stream(PromptPlan(prompt_ids), settings, min_new_tokens=settings.max_new_tokens).finish()
    steps = len(timed.decode_times)
    if steps < 1 or result.decode_tok_s <= 0 or steps != result.new_tokens - 1:
        raise ValueError("the overhead measurement needs at least two answer tokens, all of them decoded")
    return ForwardSplit(decode_steps=steps, window_s=(result.new_tokens - 1) / result.decode_tok_s,
                        forward_s=sum(timed.decode_times), first_forward_s=timed.decode_times[0])


def measure_stub(engine: ChatEngine, prompt_ids: list[int], settings: SamplingSettings, vocab_size: int) -> float:
    """Milliseconds per token of the decode loop when the forward costs nothing (a fixed logits row)."""
    loaded = engine.loaded
    sampleable = loaded.tokenizer.sp_model.get_piece_size()
    logits = stub_logits(vocab_size, min(sampleable, vocab_size), engine.device, loaded.dtype)
    stubbed = ChatEngine(loaded, runner=CachedLogitsRunner(engine.model, logits))
    result = stubbed.stream(PromptPlan(prompt_ids), settings, min_new_tokens=settings.max_new_tokens).finish()
    return 1000 / result.decode_tok_s if result.decode_tok_s > 0 else float("nan")


def measure_overhead(
    engine: ChatEngine, prompt_ids: list[int], bench_settings: SamplingSettings, *, runs: int = 3
) -> OverheadReport:
    """The instrumented split (median of `runs`) with the bench's settings (decoding at least MIN_OVERHEAD_TOKENS
    tokens where the context has room), then stubbed runs: the model's
    vocabulary with the bench's settings and with default sampling, and the published 7B vocabulary with
    default sampling. Leaves the engine's cache reset (a compiled runner's one static cache is shared)."""
    room = engine.context_limit - len(prompt_ids)
    bench_settings = replace(bench_settings, max_new_tokens=max(bench_settings.max_new_tokens, min(MIN_OVERHEAD_TOKENS, room)))
    engine.reset()
    try:
        splits = [measure_split(engine, prompt_ids, bench_settings) for _ in range(max(1, runs))]
    finally:
        engine.reset()
    default_sampling = SamplingSettings(max_new_tokens=bench_settings.max_new_tokens, seed=0)
    model_vocab = int(engine.model.get_output_embeddings().weight.shape[0])
    stub: dict[str, float] = {}
    stub[f"{model_vocab} greedy"] = measure_stub(engine, prompt_ids, bench_settings, model_vocab)
    stub[f"{model_vocab} default sampling"] = measure_stub(engine, prompt_ids, default_sampling, model_vocab)
    if model_vocab != PUBLISHED_VOCAB:
        stub[f"{PUBLISHED_VOCAB} default sampling"] = measure_stub(engine, prompt_ids, default_sampling, PUBLISHED_VOCAB)
    return OverheadReport(
        forward_ms_per_token=statistics.median(s.forward_ms_per_token for s in splits),
        outside_forward_ms_per_token=statistics.median(s.outside_ms_per_token for s in splits),
        outside_forward_fraction=statistics.median(s.outside_fraction for s in splits),
        runs=len(splits),
        stub_ms_per_token=stub,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
