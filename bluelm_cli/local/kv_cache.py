"""An 8-bit KV cache: keys and values stored as int8 with one scale per head and position.

What lets bf16 BlueLM-7B-Chat-32K hold its whole 32K context next to its 14 GB of weights: the bf16 cache takes
0.5 MiB a token (16 GiB at 32K); this one 2 x 32 layers x 32 heads x (128 int8 + one float32 scale) = 264 KiB
a token (8.25 GiB at 32K).

Why not transformers' `QuantizedCache`: its group-wise backends (quanto, HQQ) need packages this project does not
install, re-quantize the whole cache every `residual_length` tokens and cannot be cropped, which the engine's
cross-turn reuse needs (undo, retry, an edited turn crop the cache at the common prefix); its fp8 backend freezes
one scale per tensor at the first update, so a later token larger than the first prompt's saturates. Here each
(head, position) vector has its own absmax scale, so appending never re-quantizes anything, cropping is a slice,
and a prompt prefilled in chunks is quantized as one prefilled at once.

Attention reads the cache dequantized: each layer's update returns its keys and values in the model's dtype, a
transient the size of one layer's full-precision cache (512 MiB at 32K for BlueLM-7B in bf16), freed when the next
layer runs.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

KV_CACHE_KINDS = ("model", "int8")
_INT8_MAX = 127.0


def quantize_per_head(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, heads, positions, head_dim] → int8 values and float32 scales [batch, heads, positions, 1].

    Symmetric: each head's vector at each position is scaled so that its largest magnitude maps to 127."""
    as_float = states.float()
    scale = as_float.abs().amax(dim=-1, keepdim=True) / _INT8_MAX
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero vector keeps a usable scale
    quantized = torch.round(as_float / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return quantized, scale


def dequantize_per_head(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (quantized.float() * scale).to(dtype)


class Int8Layer(DynamicLayer):
    """A cache layer holding int8 keys/values (per-head, per-position scales) in buffers that grow by doubling.

    Only the quantized buffers persist; `keys`/`values` stay empty tensors that carry the model's dtype and device.
    """

    def __init__(self, max_capacity: int | None = None) -> None:
        super().__init__()
        self.max_capacity = max_capacity  # the context window: never reserve rows past it
        self._length = 0
        self._buffers: list[torch.Tensor] | None = None  # key int8, key scale, value int8, value scale

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._length = 0
        self._buffers = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        assert self._buffers is not None
        key_q, key_scale, value_q, value_scale = self._buffers
        key_q[:, :, start:end], key_scale[:, :, start:end] = quantize_per_head(key_states)
        value_q[:, :, start:end], value_scale[:, :, start:end] = quantize_per_head(value_states)
        self._length = end
        dtype = key_states.dtype
        return (
            dequantize_per_head(key_q[:, :, :end], key_scale[:, :, :end], dtype),
            dequantize_per_head(value_q[:, :, :end], value_scale[:, :, :end], dtype),
        )

    def _reserve(self, end: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = self._buffers[0].shape[-2] if self._buffers is not None else 0
        if end <= capacity:
            return
        grown = max(256, 2 * capacity)
        if self.max_capacity:
            grown = min(grown, self.max_capacity)
        grown = max(grown, end)
        buffers = []
        for states in (key_states, value_states):
            batch, heads, _, head_dim = states.shape
            buffers.append(torch.empty((batch, heads, grown, head_dim), dtype=torch.int8, device=states.device))
            buffers.append(torch.empty((batch, heads, grown, 1), dtype=torch.float32, device=states.device))
        if self._buffers is not None and self._length:
            for new, old in zip(buffers, self._buffers):
                new[:, :, : self._length] = old[:, :, : self._length]
        self._buffers = buffers

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("an int8 cache layer is cropped by a negative count: the number of tokens to remove")
        if self.is_initialized:
            self._length = max(0, self._length + tokens_to_remove)

    def reset(self) -> None:
        self._length = 0
        self._buffers = None
        super().reset()

    def stored_bytes(self) -> int:
        """Bytes the quantized buffers hold for the cached positions (not the reserve past them)."""
        if self._buffers is None:
            return 0
        return sum(buffer[:, :, : self._length].numel() * buffer.element_size() for buffer in self._buffers)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the int8 KV cache serves one conversation (batch 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the int8 KV cache serves one conversation (batch 1)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the int8 KV cache serves one conversation (no beam search)")
