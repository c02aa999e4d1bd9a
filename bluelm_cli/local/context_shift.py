"""Context shift (opt-in, as llama.cpp's): when old turns leave the prompt, keep the cache of the turns that
stay and move their keys to their new positions instead of prefilling them again.

Keys are cached after RoPE: a key at position `s` is the position-free key rotated by `s·θ_i` in each pair of
dims (i, i + d/2) (the rotate-half layout). Rotations compose, so moving it to position `t` is one more
rotation by `(t - s)·θ_i`, whatever the inverse frequencies θ are (the 2K model's plain ones or BlueLM-32K's
ntkmixed ones). Values carry no position and move as they are.

This is not what a fresh prefill of the kept text gives: from the first layer on, the kept tokens' hidden
states once attended to the dropped turns, and they still carry that. Answers differ (usually slightly);
that is the price of never re-reading the window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

# Matches shorter than this are not worth a shift (the re-prefill they save is tiny).
MIN_SHIFT_TOKENS = 8


def find_shift(cached: Sequence[int], ids: Sequence[int], start: int) -> tuple[int, int] | None:
    """Where the cache holds `ids[start:]`'s longest prefix past `start`: (its first cached position, its length).

    `start` is where `ids` and `cached` diverge (their common prefix). After old turns are dropped, the kept turns
    sit later in `cached` than they will in `ids`; None when no run of MIN_SHIFT_TOKENS matches.
    """
    if start >= len(ids):
        return None
    best: tuple[int, int] | None = None
    head = list(ids[start : start + MIN_SHIFT_TOKENS])
    if len(head) < MIN_SHIFT_TOKENS:
        return None
    for source in range(start + 1, len(cached) - MIN_SHIFT_TOKENS + 1):
        if cached[source] != head[0] or list(cached[source : source + MIN_SHIFT_TOKENS]) != head:
            continue
        length = MIN_SHIFT_TOKENS
        limit = min(len(cached) - source, len(ids) - start)
        while length < limit and cached[source + length] == ids[start + length]:
            length += 1
        if best is None or length > best[1]:
            best = (source, length)
    return best


def rotary_inverse_frequencies(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's RoPE inverse frequencies (its rotary embedding's `inv_freq` buffer), or None if it has none."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq
    return None


def rerotate(keys: torch.Tensor, inv_freq: torch.Tensor, delta: int) -> torch.Tensor:
    """`keys` ([..., positions, head_dim], rotate-half RoPE applied) moved by `delta` positions, in float32."""
    # Angles of thousands of radians: taken in float64 before the cosines, or float32 rounding alone costs 1e-4.
    # (On the host: not every accelerator has float64.)
    angles = float(delta) * inv_freq.detach().to(device="cpu", dtype=torch.float64)
    angles = torch.cat((angles, angles))
    cos = angles.cos().to(device=keys.device, dtype=torch.float32)
    sin = angles.sin().to(device=keys.device, dtype=torch.float32)
    states = keys.float()
    first, second = states.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return states * cos + rotated_half * sin


def shiftable(cache: Cache) -> bool:
    """Whether every layer keeps plain floating-point key and value tensors that can be moved in place."""
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            return False
        if not keys.is_floating_point() or not values.is_floating_point():
            return False
    return bool(getattr(cache, "layers", ()))


def shift_cache(cache: Cache, inv_freq: torch.Tensor, target: int, source: int, length: int) -> None:
    """Move positions [source, source + length) of every layer to [target, target + length), keys re-rotated.

    Rows are written in place (a static cache's buffers keep their addresses for the captured graphs); the
    caller then crops the cache to `target + length`.
    """
    if not 0 <= target < source:
        raise ValueError("a context shift moves kept positions earlier")
    delta = target - source
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        moved_keys = rerotate(keys[:, :, source : source + length], inv_freq, delta).to(keys.dtype)
        moved_values = values[:, :, source : source + length].clone()
        keys[:, :, target : target + length] = moved_keys
        values[:, :, target : target + length] = moved_values
