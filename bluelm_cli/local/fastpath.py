"""The CUDA fast path: a static KV cache sized to the context and a one-token decode step replayed from CUDA graphs.

Batch-1 decoding of a 7B model should be limited by reading the weights (about 215 tok/s on an H100),
but eager PyTorch spends ~20 ms of Python and kernel-launch overhead per token. A static cache gives
the decode step fixed shapes and addresses, so it can be captured in a CUDA graph once and replayed each
token. Prefill stays eager (its length varies). Cache reuse across turns still works: the static cache is
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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache, StaticLayer

from bluelm_cli.local.engine import StepRunner
from bluelm_cli.local.loading import LoadedModel


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

    def __init__(self, model: torch.nn.Module, max_cache_len: int) -> None:
        super().__init__(model)
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


def attention_windows(max_cache_len: int, smallest: int = 256) -> list[int]:
    """Window sizes a decode step is captured for: powers of two from `smallest`, then the cache's length."""
    windows = []
    size = smallest
    while size < max_cache_len:
        windows.append(size)
        size *= 2
    return [*windows, max_cache_len]


class GraphRunner(_StaticCacheRunner):
    """StepRunner over one windowed static cache, its decode step replayed from a CUDA graph per window.

    `use_graphs=False` runs the same windowed steps eagerly (how the window logic is tested on a CPU).
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, use_graphs: bool = True, smallest_window: int = 256) -> None:
        super().__init__(model, max_cache_len)
        self.windows = attention_windows(max_cache_len, smallest_window)
        self._window = _Window(max_cache_len)
        self._use_graphs = use_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _make_cache(self) -> RewindableStaticCache:
        return WindowedStaticCache(self.model.config, self.max_positions, self._window)

    def window_for(self, positions: int) -> int:
        """The smallest window holding `positions` slots."""
        for size in self.windows:
            if size >= positions:
                return size
        raise ValueError(f"{positions} positions exceed the static cache's {self.max_positions}")

    def prefill(self, cache: Cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        if cache is self._cache:
            self._window.size = self.window_for(start + ids.shape[1])
        return super().prefill(cache, ids, start)

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
        """Allocate the cache and capture a decode graph per window (at load time, behind a status line)."""
        cache = self.new_cache()
        device = self._token.device
        with torch.inference_mode():
            self.prefill(cache, torch.ones((1, 4), dtype=torch.long, device=device), 0)  # allocates the cache
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
            torch.cuda.synchronize(device)


def static_cache_length(context_length: int, bytes_per_token: int, free_bytes: int, *, headroom: float = 0.75) -> int:
    """Positions to preallocate: the whole context when it fits in `headroom` of free memory, else what does.

    A 32K BlueLM needs 16 GiB of bf16 KV cache; next to 15 GB of weights on a 24 GB card, the static
    cache must shrink (the chat's context shrinks with it) rather than fail to allocate.
    """
    affordable = int(free_bytes * headroom) // max(1, bytes_per_token)
    return max(0, min(context_length, affordable // 256 * 256))


DEFAULT_RUNNER = "graphs"
RUNNERS = ("graphs", "compiled", "fused")


def make_runner(
    loaded: LoadedModel,
    *,
    enabled: bool = True,
    on_status: Callable[[str], None] | None = None,
    kind: str = DEFAULT_RUNNER,
) -> StepRunner:
    """The fast path on CUDA when enabled (`kind`: "graphs", "compiled" or "fused"); eager everywhere else or if it fails."""
    if kind not in RUNNERS:
        raise ValueError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")
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
        runner = CompiledRunner(loaded.model, positions) if kind == "compiled" else GraphRunner(loaded.model, positions)
        runner.warm_up()
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
