"""How big a BlueLM model is, from its config alone: parameters and the bytes its weights take.

Used before anything is loaded or built: the CPU warning (a 25M-parameter model is not slow anywhere)
and `bluelm bench`'s memory check. Pure arithmetic over config.json's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A model this large runs on a CPU at a pace people notice (the published 7B: about 6.9 billion).
SLOW_ON_CPU_PARAMETERS = 1_000_000_000


def parameter_count(config: Mapping[str, Any]) -> int:
    """Parameters of a BlueLM config (a config.json dict): embeddings, the LayerNorm on them, each
    layer's attention (keys and values sized by num_key_value_heads) and MLP, the final norm, lm_head."""
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    vocab = int(config.get("vocab_size") or 100096)  # BlueLM's when a shape leaves it out
    inter = int(config["intermediate_size"])
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden  # and its two RMSNorms
    embed_norm = 2 * hidden if config.get("use_stable_embedding", True) else 0
    lm_head = 0 if config.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + embed_norm + layers * per_layer + hidden + lm_head


def describe_parameters(count: int) -> str:
    """``6.9B``, ``26M``."""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.0f}M"
    return f"{count:,}"
