"""The CUDA fast path: a static KV cache sized to the context and a compiled one-token decode step.

Batch-1 decoding of a 7B model should be limited by reading the weights (about 215 tok/s on an H100),
but eager PyTorch spends ~20 ms of Python and kernel-launch overhead per token. A static cache gives
the decode step fixed shapes and addresses, so torch.compile can capture it in a CUDA graph once and
replay it each token. Prefill stays eager (its length varies). Cache reuse across turns still works:
the static cache is cropped by moving its length counter back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache

from bluelm_cli.engine import StepRunner
from bluelm_cli.loading import LoadedModel


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


class CompiledRunner(StepRunner):
    """StepRunner over one StaticCache with the decode step compiled (CUDA graphs on CUDA)."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, mode: str | None = "reduce-overhead", backend: str = "inductor") -> None:
        super().__init__(model)
        self.max_positions = max_cache_len
        device = next(model.parameters()).device
        # Inputs live in fixed buffers: a CUDA graph replays reads from the same addresses every time.
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._cache: RewindableStaticCache | None = None
        self._compiled = torch.compile(self._decode_step, mode=mode, backend=backend, fullgraph=True, dynamic=False)

    def new_cache(self) -> Cache:
        # One cache for the life of the runner: its buffers' addresses are baked into the captured graph.
        if self._cache is None:
            self._cache = RewindableStaticCache(config=self.model.config, max_cache_len=self.max_positions)
        else:
            self._rewind(self._cache)
        return self._cache

    @staticmethod
    def _rewind(cache: RewindableStaticCache) -> None:
        # Moving the length counter back is enough: stale slots are overwritten before they are attended to.
        length = int(cache.get_seq_length())
        if length:
            with torch.inference_mode():
                cache.crop(-length)

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=position, cache=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

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


def static_cache_length(context_length: int, bytes_per_token: int, free_bytes: int, *, headroom: float = 0.75) -> int:
    """Positions to preallocate: the whole context when it fits in `headroom` of free memory, else what does.

    A 32K BlueLM needs 16 GiB of bf16 KV cache; next to 15 GB of weights on a 24 GB card, the static
    cache must shrink (the chat's context shrinks with it) rather than fail to allocate.
    """
    affordable = int(free_bytes * headroom) // max(1, bytes_per_token)
    return max(0, min(context_length, affordable // 256 * 256))


def make_runner(
    loaded: LoadedModel,
    *,
    enabled: bool = True,
    on_status: Callable[[str], None] | None = None,
) -> StepRunner:
    """The compiled runner on CUDA when enabled; eager everywhere else or if compilation fails."""
    if not enabled or loaded.device.type != "cuda" or loaded.quantization:
        return StepRunner(loaded.model)
    if on_status:
        on_status("Compiling the decode step for this GPU (once per start; --no-compile skips it)…")
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
        runner = CompiledRunner(loaded.model, positions)
        runner.warm_up()
        return runner
    except Exception as error:  # noqa: BLE001 - any compiler failure must fall back, never crash
        if on_status:
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            on_status(f"Warning: compiling failed ({first}); using the eager path")
        torch._dynamo.reset()
        return StepRunner(loaded.model)
