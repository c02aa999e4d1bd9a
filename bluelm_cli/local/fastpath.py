"""The CUDA fast path: a static KV cache sized to the context and a one-token decode step replayed from CUDA graphs.

Batch-1 decoding of a 7B model should be limited by reading the weights (about 215 tok/s on an H100),
but eager PyTorch spends ~20 ms of Python and kernel-launch overhead per token. A static cache gives
the decode step fixed shapes and addresses, so it can be captured in a CUDA graph once and replayed each
token. Prefill stays eager (its length varies) unless the graph prefill below is asked for. Cache reuse across turns still works: the static cache is
cropped by moving its length counter back.

Two runners do this:
- `GraphRunner` (the default) captures the eager forward itself, once per attention window (256, 512, ...
  up to the cache's length), so a step reads only the part of the cache that can hold tokens yet instead
  of all 32K slots. Capturing takes seconds, not torch.compile's tens of seconds.
- `CompiledRunner` lets torch.compile (mode reduce-overhead) fuse and capture the step, attending over the
  whole cache. The first GPU check (H100, 7B, 2K context) measured 118 tok/s with it and 39 s of warm-up.
- "fused" (`make_runner(kind="fused")`) is `GraphRunner` over a model whose element-wise pieces are compiled
  (`modeling.compile_pointwise`: each RMSNorm, RoPE on q and k, SiLU times up, one kernel each): the graphs' cheap
  capture per window with far fewer kernels in them. Opt-in (`bluelm bench --runner fused`) until a GPU has measured it.

The graph prefill (`GraphRunner(prefill_graphs=True)`, `make_runner(prefill_graph=True)`, opt-in until a GPU has
measured it) runs each prefill chunk as one replayed CUDA graph too: the chunk's tokens padded to a bucket length
(powers of two from 64 to the chunk size), see `_PaddedPrefill`. Graphs, not torch.compile per bucket: a capture
costs one eager forward and takes well under a second, where compiling the decode step alone took 39 s on the H100.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable

import torch
from torch.nn.attention import sdpa_kernel
from transformers import StaticCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import create_causal_mask

from bluelm_cli.local.engine import _PREFILL_ATTENTION, DEFAULT_PREFILL_CHUNK, StepRunner
from bluelm_cli.local.loading import LoadedModel
from bluelm_cli.modeling._compat import causal_mask


class RewindableStaticCache(StaticCache):
    """transformers' StaticCache, croppable on every transformers release BlueLM supports.

    Cropping a static cache means moving each layer's length counter back; stale slots are overwritten before
    they are attended to. transformers 5.24 gave StaticLayer a `crop` that does just that; 5.17-5.23 keep
    the same counter but have no `crop`, so the engine's cross-turn reuse would die there.
    """

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("a static cache is cropped by a negative count: the number of tokens to remove")
        for layer in self.layers:
            # In place: the counter's address is baked into the captured graph.
            layer.cumulative_length.sub_(-tokens_to_remove)

    def rewind(self) -> None:
        """Empty the cache: every layer's length counter back to 0, in place and without reading it (no host sync).
        Stale slots are overwritten before they are attended to."""
        with torch.inference_mode():
            for layer in self.layers:
                layer.cumulative_length.zero_()


class _StaticCacheRunner(StepRunner):
    """A runner over one static cache for its whole life, with the decode step's inputs in fixed buffers:
    a captured graph reads and writes the same addresses at every replay."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        super().__init__(model, prefill_chunk=prefill_chunk)
        self.max_positions = max_cache_len
        device = next(model.parameters()).device
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._cache: RewindableStaticCache | None = None

    def _make_cache(self) -> RewindableStaticCache:
        return RewindableStaticCache(config=self.model.config, max_cache_len=self.max_positions)

    def new_cache(self) -> Cache:
        if self._cache is None:
            self._cache = self._make_cache()
        else:
            self._rewind(self._cache)
        return self._cache

    @staticmethod
    def _rewind(cache: RewindableStaticCache) -> None:
        cache.rewind()

    def _forward_one(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=position, cache=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]


class CompiledRunner(_StaticCacheRunner):
    """The decode step over the whole static cache, compiled by torch.compile (CUDA graphs on CUDA)."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, mode: str | None = "reduce-overhead", backend: str = "inductor") -> None:
        super().__init__(model, max_cache_len)
        self._compiled = torch.compile(self._forward_one, mode=mode, backend=backend, fullgraph=True, dynamic=False)

    def decode(self, cache: Cache, token: torch.Tensor, position: int) -> torch.Tensor:
        if cache is not self._cache:
            return super().decode(cache, token, position)
        self._token.copy_(token)
        self._position.fill_(position)
        # The graph's output buffer is overwritten by the next replay: copy it out.
        return self._compiled(self._token, self._position).clone()

    def warm_up(self, steps: int = 3) -> None:
        """Compile and capture now (at load time, behind a status line) rather than on the first answer."""
        cache = self.new_cache()
        with torch.inference_mode():
            self.prefill(cache, torch.ones((1, 4), dtype=torch.long, device=self._token.device), 0)
            for step in range(steps):
                self.decode(cache, torch.ones((1, 1), dtype=torch.long, device=self._token.device), 4 + step)
        self._rewind(cache)


def kv_bytes_per_token(config: object, dtype: torch.dtype) -> int:
    """Keys and values of one position over every layer (0.5 MiB for BlueLM-7B in bf16)."""
    heads = getattr(config, "num_key_value_heads")
    head_dim = getattr(config, "head_dim")
    layers = getattr(config, "num_hidden_layers")
    return 2 * layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class _Window:
    """How many of the static cache's slots attention reads: a prefix that covers every position written."""

    def __init__(self, size: int) -> None:
        self.size = size


class _WindowedStaticLayer(StaticLayer):
    """A StaticLayer whose attention (and mask) covers only the first `window.size` slots."""

    def __init__(self, max_cache_len: int, window: _Window) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self._window = window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        size = self._window.size
        return keys[:, :, :size], values[:, :, :size]

    def get_mask_sizes(self, query_length: int, *args: object) -> tuple[int, int]:  # type: ignore[override]
        return self._window.size, 0


class WindowedStaticCache(RewindableStaticCache):
    """A static cache whose readers attend over a window of it, set by the runner before each step."""

    def __init__(self, config: object, max_cache_len: int, window: _Window) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.layers = [_WindowedStaticLayer(max_cache_len, window) for _ in self.layers]


def _powers_of_two_then(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes = []
    size = smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def attention_windows(max_cache_len: int, smallest: int = 256) -> list[int]:
    """Window sizes a decode step is captured for: powers of two from `smallest`, then the cache's length."""
    return _powers_of_two_then(max_cache_len, smallest)


def prefill_buckets(prefill_chunk: int, max_cache_len: int, smallest: int = 64) -> list[int]:
    """Lengths a graph prefill pads a chunk to: powers of two from `smallest`, then the longest chunk that fits."""
    return _powers_of_two_then(min(prefill_chunk, max_cache_len), smallest)


# Whether this transformers' create_causal_mask can be told to build the mask even where `is_causal` would do.
_MASK_CAN_BE_FORCED = "allow_is_causal_skip" in inspect.signature(create_causal_mask).parameters


_PREFILL_FAILED = "the graph prefill"

# Attention implementations whose mask the padded prefill builds as transformers does (a boolean or additive mask over
# the window). flash-attention-2's kernels align a causal mask to the keys' end, which a window past the tokens breaks.
_PADDED_ATTENTION = ("sdpa", "eager")


class _PaddedPrefill:
    """One prefill shape: `bucket` tokens from a start position, attending over `window` slots of the static cache, with
    its inputs in fixed buffers (and, on CUDA, the captured graph that reads them).

    The chunk's `count` real tokens come first, padding after (token 0, positions continuing past the last real one).
    Every token is written into the cache at its position, padding too, so the cache's length counter is set back to
    `start + count` at the end (in the graph): the padding's slots lie past the cache's length, where the causal mask
    hides them from every later query (a query at position p sees slots <= p, and slot p was written by then), and the
    next decode step, verify or prefill overwrites them. Within the chunk the padding comes after every real token,
    so causality hides it from them too. Logits are formed for the last real token only (`logits_to_keep` as an index
    tensor).

    `fresh` (start 0, an empty cache): the window is the bucket itself, so the query and key lengths are equal and
    transformers passes SDPA no mask, `is_causal=True`: flash attention. Otherwise (a later turn's or chunk's prefill)
    the start varies between replays, so the mask is built on the device from the cache's length counter, over the
    smallest attention window that holds `start + bucket` slots (SDPA's memory-efficient kernel, which takes a mask).
    """

    def __init__(self, bucket: int, window: int, fresh: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.bucket, self.window, self.fresh = bucket, window, fresh
        self.ids = torch.zeros((1, bucket), dtype=torch.long, device=device)
        self.positions = torch.zeros((1, bucket), dtype=torch.long, device=device)
        self.offsets = torch.arange(bucket, dtype=torch.long, device=device)
        self.last = torch.zeros((1,), dtype=torch.long, device=device)  # index of the last real token
        self.end = torch.zeros((), dtype=torch.long, device=device)  # the cache's length after the chunk
        # The mask helper reads only the shape, dtype and device of the embeddings: a stand-in with no storage to speak of.
        self.embeds_like = torch.empty((1, 1, 1), dtype=dtype, device=device).expand(1, bucket, 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def load(self, ids: torch.Tensor, start: int) -> None:
        """The chunk's ids and positions into the buffers (device-side copies and fills: no host sync)."""
        count = ids.shape[1]
        self.ids[:, :count].copy_(ids)
        self.ids[:, count:].zero_()
        torch.add(self.offsets, start, out=self.positions[0])
        self.last.fill_(count - 1)
        self.end.fill_(start + count)


class GraphRunner(_StaticCacheRunner):
    """StepRunner over one windowed static cache, its decode step replayed from a CUDA graph per window.

    `use_graphs=False` runs the same windowed steps eagerly (how the window logic is tested on a CPU).
    `prefill_graphs=True`: each prefill chunk runs padded to a bucket (see `_PaddedPrefill`), replayed from a graph
    captured on the bucket's first use; with `use_graphs=False` the padded steps run eagerly.
    """

    def __init__(
        self, model: torch.nn.Module, max_cache_len: int, *, use_graphs: bool = True, smallest_window: int = 256,
        prefill_graphs: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, smallest_bucket: int = 64,
    ) -> None:
        super().__init__(model, max_cache_len, prefill_chunk=prefill_chunk)
        self.windows = attention_windows(max_cache_len, smallest_window)
        self._window = _Window(max_cache_len)
        self._use_graphs = use_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graphs = prefill_graphs
        self.buckets = prefill_buckets(prefill_chunk, max_cache_len, smallest_bucket)
        # (bucket, window, fresh) -> its buffers and graph; the shapes whose capture failed run eagerly.
        self._prefills: dict[tuple[int, int, bool], _PaddedPrefill] = {}
        self._failed_prefills: set[tuple[int, int, bool]] = set()
        # All prefill graphs draw on one memory pool: they never run at once and their outputs are copied out at once,
        # so the pool holds the largest bucket's activations rather than the sum over buckets.
        self._prefill_pool: tuple[int, int] | None = None

    def _make_cache(self) -> RewindableStaticCache:
        return WindowedStaticCache(self.model.config, self.max_positions, self._window)

    def window_for(self, positions: int) -> int:
        """The smallest window holding `positions` slots."""
        for size in self.windows:
            if size >= positions:
                return size
        raise ValueError(f"{positions} positions exceed the static cache's {self.max_positions}")

    def bucket_for(self, count: int) -> int | None:
        """The smallest bucket holding `count` tokens (None: longer than any)."""
        for size in self.buckets:
            if size >= count:
                return size
        return None

    def prefill(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        if cache is not self._cache:
            return super().prefill(cache, ids, start)
        if not self.prefill_graphs:
            return self._eager_prefill(ids, start)
        logits = None
        for offset in range(0, ids.shape[1], self.prefill_chunk):
            logits = self._prefill_chunk(ids[:, offset : offset + self.prefill_chunk], start + offset)
        if logits is None:
            raise ValueError("prefill needs at least one token")
        return logits

    def _eager_prefill(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self._window.size = self.window_for(start + ids.shape[1])
        return super().prefill(self._cache, ids, start)  # type: ignore[arg-type]

    def _prefill_chunk(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """One chunk (at most `prefill_chunk` tokens) padded to its bucket; eager where no bucket fits or capture failed."""
        count = ids.shape[1]
        bucket = self.bucket_for(count)
        if bucket is None or start + bucket > self.max_positions:
            return self._eager_prefill(ids, start)  # the padding would run past the cache's last slot
        if self.model.config._attn_implementation not in _PADDED_ATTENTION:
            return self._eager_prefill(ids, start)
        fresh = start == 0
        if not fresh and not _MASK_CAN_BE_FORCED:
            return self._eager_prefill(ids, start)
        key = (bucket, bucket if fresh else self.window_for(start + bucket), fresh)
        if key in self._failed_prefills:
            return self._eager_prefill(ids, start)
        step = self._prefills.get(key)
        if step is None:
            step = self._prefills[key] = _PaddedPrefill(*key, ids.device, self.model.get_input_embeddings().weight.dtype)
        step.load(ids, start)
        if not self._use_graphs:
            return self._padded_forward(step)
        if step.graph is None:
            try:
                self._capture_prefill(step, start)
            except Exception as error:  # noqa: BLE001 - a failed capture falls back to the eager prefill, never crashes
                del self._prefills[key]
                self._failed_prefills.add(key)
                self._set_length(start)
                first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
                warnings.warn(f"{_PREFILL_FAILED} of {bucket} tokens failed ({first}); that length prefills eagerly",
                              RuntimeWarning, stacklevel=2)
                return self._eager_prefill(ids, start)
        assert step.graph is not None and step.logits is not None
        step.graph.replay()
        # Copied out: another bucket's replay may reuse the shared pool's memory under this graph's output.
        return step.logits.clone()

    def _padded_forward(self, step: _PaddedPrefill) -> torch.Tensor:
        """The padded chunk through the model (what a prefill graph captures): logits of its last real token, [1, vocab]."""
        self._window.size = step.window
        mask = None
        if not step.fresh:
            # Built from the cache's length counter on the device (the start varies between replays), over the window.
            mask = causal_mask(config=self.model.config, inputs_embeds=step.embeds_like, attention_mask=None,
                               cache=self._cache, position_ids=step.positions, allow_is_causal_skip=False)
        with sdpa_kernel(_PREFILL_ATTENTION):
            out = self.model(input_ids=step.ids, position_ids=step.positions, attention_mask=mask, cache=self._cache,
                             use_cache=True, logits_to_keep=step.last)
        assert self._cache is not None
        for layer in self._cache.layers:
            # In place, from a device buffer: the padding's slots fall past the cache's length.
            layer.cumulative_length.copy_(step.end)
        return out.logits[:, -1, :]

    def _set_length(self, length: int) -> None:
        assert self._cache is not None
        for layer in self._cache.layers:
            layer.cumulative_length.fill_(length)

    def _capture_prefill(self, step: _PaddedPrefill, start: int) -> None:
        device = step.ids.device
        # A first run outside the capture (kernels load, libraries allocate workspaces), on a side stream as the decode
        # graphs' warm-up does. It writes what the replay writes; the length counter goes back for the replay.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._padded_forward(step)
        torch.cuda.current_stream(device).wait_stream(side)
        self._set_length(start)
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_pool, capture_error_mode="thread_local"):
            logits = self._padded_forward(step)
        step.graph, step.logits = graph, logits

    def verify(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        # Eager, like a prefill: the window must cover the draft's positions (a replayed decode step leaves it as
        # it was at capture).
        if cache is self._cache:
            self._window.size = self.window_for(start + ids.shape[1])
        return super().verify(cache, ids, start)

    def decode(self, cache: Cache, token: torch.Tensor, position: int) -> torch.Tensor:
        if cache is not self._cache:
            return super().decode(cache, token, position)
        window = self.window_for(position + 1)
        self._token.copy_(token)
        self._position.fill_(position)
        captured = self._graphs.get(window)
        if captured is None:
            self._window.size = window
            return self._forward_one(self._token, self._position)
        graph, logits = captured
        graph.replay()
        # The graph's own output buffer, no copy: it stays valid until the next replay, which is all decode() promises.
        return logits

    def warm_up(self) -> None:
        """Allocate the cache and capture a decode graph per window, and with `prefill_graphs` a prefill graph per bucket
        from an empty cache (at load time, behind a status line)."""
        cache = self.new_cache()
        device = self._token.device
        with torch.inference_mode():
            self._eager_prefill(torch.ones((1, 4), dtype=torch.long, device=device), 0)  # allocates the cache
            if not self._use_graphs:
                self._rewind(cache)
                return
            # Kernels load and libraries allocate their workspaces on first use: do that outside the capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for window in self.windows:
                    self._window.size = window
                    self._forward_one(self._token, self._position)
            torch.cuda.current_stream(device).wait_stream(side)
            self._rewind(cache)
            for window in self.windows:
                self._window.size = window
                graph = torch.cuda.CUDAGraph()
                # thread_local: the REPL's thread may touch CUDA state while the model loads behind the prompt.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    logits = self._forward_one(self._token, self._position)
                self._graphs[window] = (graph, logits)
            if self.prefill_graphs:
                # A chat's first prompt prefills from an empty cache: those graphs (one per bucket, flash attention) are
                # captured now, so its time to first token is a replay. A later turn's (per bucket and window) are
                # captured on first use.
                for bucket in self.buckets:
                    self._prefill_chunk(torch.ones((1, bucket), dtype=torch.long, device=device), 0)
                    self._rewind(cache)
            torch.cuda.synchronize(device)


def static_cache_length(context_length: int, bytes_per_token: int, free_bytes: int, *, headroom: float = 0.75) -> int:
    """Positions to preallocate: the whole context when it fits in `headroom` of free memory, else what does.

    A 32K BlueLM needs 16 GiB of bf16 KV cache; next to 15 GB of weights on a 24 GB card, the static
    cache must shrink (the chat's context shrinks with it) rather than fail to allocate.
    """
    affordable = int(free_bytes * headroom) // max(1, bytes_per_token)
    return max(0, min(context_length, affordable // 256 * 256))


DEFAULT_RUNNER = "graphs"
# Off until the GPU check's `bench_prefill` step has measured the 1,000-token TTFT with and without it (BENCHMARKS.md).
DEFAULT_PREFILL_GRAPH = False
RUNNERS = ("graphs", "compiled", "fused")


def make_runner(
    loaded: LoadedModel,
    *,
    enabled: bool = True,
    on_status: Callable[[str], None] | None = None,
    kind: str = DEFAULT_RUNNER,
    prefill_graph: bool | None = None,
) -> StepRunner:
    """The fast path on CUDA when enabled (`kind`: "graphs", "compiled" or "fused"); eager everywhere else or if it fails.

    `prefill_graph`: the graphs and fused runners also replay each prefill chunk from a CUDA graph per bucket length;
    None = `DEFAULT_PREFILL_GRAPH` (what the chat gets)."""
    if kind not in RUNNERS:
        raise ValueError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")
    if prefill_graph is None:
        prefill_graph = DEFAULT_PREFILL_GRAPH
    # bitsandbytes' layers are not capturable; torchao's quantized weights (--quantize) are.
    bitsandbytes = bool(loaded.quantization) and not loaded.quantization.startswith("torchao")
    if not enabled or loaded.device.type != "cuda" or bitsandbytes:
        return StepRunner(loaded.model)
    placed_on = {str(device) for device in (getattr(loaded.model, "hf_device_map", None) or {}).values()}
    if len(placed_on) > 1:
        # A graph is captured on one device's stream; a model spread over several GPUs steps eagerly.
        if on_status:
            on_status(f"The model spans {len(placed_on)} devices: decoding on the eager path")
        return StepRunner(loaded.model)
    if on_status:
        what = "Capturing the decode step" if kind == "graphs" else "Compiling the decode step"
        on_status(f"{what} for this GPU (once per start; --no-compile skips it)…")
    try:
        free_bytes, _ = torch.cuda.mem_get_info(loaded.device)
        per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        positions = static_cache_length(loaded.context_length, per_token, free_bytes)
        if positions < min(loaded.context_length, 1024):
            if on_status:
                on_status("Warning: too little free GPU memory for a static KV cache; using the eager path")
            return StepRunner(loaded.model)
        if positions < loaded.context_length and on_status:
            on_status(f"The KV cache holds {positions} of the model's {loaded.context_length} positions (free GPU memory)")
        runner: GraphRunner | CompiledRunner
        if kind == "fused":
            _compile_pointwise(loaded.model)
        if kind == "compiled":
            if prefill_graph and on_status:
                on_status("The graph prefill is for the graphs and fused runners: the compiled runner prefills eagerly")
            runner = CompiledRunner(loaded.model, positions)
        else:
            runner = GraphRunner(loaded.model, positions, prefill_graphs=prefill_graph)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            runner.warm_up()
        for warning in caught:
            if on_status and str(warning.message).startswith(_PREFILL_FAILED):  # that length prefills eagerly
                on_status(f"Warning: {warning.message}")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return runner
    except Exception as error:  # noqa: BLE001 - any capture or compiler failure must fall back, never crash
        if on_status:
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            on_status(f"Warning: the fast path failed ({first}); using the eager path")
        if kind == "fused":
            _eager_pointwise(loaded.model)  # the eager path must not call kernels that failed to compile
        if kind in ("compiled", "fused"):
            # Best effort: dynamo's reset can itself trip over compiled functions being collected meanwhile.
            with contextlib.suppress(Exception):
                torch.compiler.reset()
        return StepRunner(loaded.model)


def _compile_pointwise(model: torch.nn.Module) -> None:
    from bluelm_cli.modeling.modeling_bluelm import compile_pointwise

    if not compile_pointwise(model):
        raise ValueError("the fused runner needs a BlueLM model (nothing to compile)")


def _eager_pointwise(model: torch.nn.Module) -> None:
    from bluelm_cli.modeling.modeling_bluelm import eager_pointwise

    eager_pointwise(model)
