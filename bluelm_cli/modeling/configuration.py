"""BlueLMConfig: the fields of a published BlueLM config.json, read natively (no remote code)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class BlueLMConfig(PreTrainedConfig):
    """Configuration of BlueLM-7B (Base, Chat, 32K variants).

    Published configs carry `rope_scaling = {"type": "ntkmixed", "factor": k, "power": b}` for the 32K
    models; transformers 5 standardizes that into `rope_parameters` (rope_type "ntkmixed"), which our
    rotary embedding implements itself. Every RoPE type transformers has (linear, dynamic, yarn, longrope,
    llama3, ...) is computed by transformers' own `ROPE_INIT_FUNCTIONS`, as its Llama does, with the same
    meaning of `max_position_embeddings` and `original_max_position_embeddings`.
    """

    model_type = "BlueLM"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 100096,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 3,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        use_stable_embedding: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        attention_dropout: float = 0.0,
        head_dim: int | None = None,
        tokenizer_vocab_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.use_stable_embedding = use_stable_embedding
        self.attention_dropout = attention_dropout
        self.head_dim = head_dim or hidden_size // num_attention_heads
        # Rows of the embedding beyond the tokenizer's pieces are padding; the model masks their logits
        # when this is known (the loader sets it from the tokenizer).
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_parameters = _standard_rope_parameters(rope_parameters or rope_scaling, rope_theta)
        super().__init__(**kwargs)

    @property
    def context_length(self) -> int:
        """Positions the checkpoint can attend over: factor × max_position_embeddings for ntkmixed."""
        factor = 1.0
        if self.rope_parameters.get("rope_type") == "ntkmixed":
            factor = float(self.rope_parameters.get("factor", 1.0))
        return int(self.max_position_embeddings * factor)

    def _validate_ntkmixed_rope_parameters(self, rope_parameters: dict[str, Any], ignore_keys: Any = None) -> None:
        # Found by name by transformers' `validate_rope` (the standard types have theirs in the mixin); without
        # it every 32K config logs "Missing validation function ... 'ntkmixed'". `_standard_rope_parameters`
        # has already checked the fields.
        return None


def _standard_rope_parameters(scaling: dict[str, Any] | None, rope_theta: float) -> dict[str, Any]:
    params = dict(scaling or {})
    rope_type = params.pop("type", None) or params.pop("rope_type", None) or "default"
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", rope_theta)
    check_rope_type(params)
    return params


# BlueLM's own type, plain RoPE, and every type transformers computes (what its Llama accepts).
IMPLEMENTED_ROPE_TYPES = ("default", "ntkmixed", *ROPE_INIT_FUNCTIONS)


def check_rope_type(params: dict[str, Any]) -> None:
    """Refuse RoPE parameters the model does not implement, rather than compute them as plain RoPE."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in IMPLEMENTED_ROPE_TYPES:
        raise ValueError(
            f"BlueLM implements RoPE types {', '.join(repr(name) for name in IMPLEMENTED_ROPE_TYPES)}, not {rope_type!r}: "
            "fix the type in rope_scaling / rope_parameters of config.json"
        )
    if rope_type == "ntkmixed":
        for key in ("factor", "power"):
            if key not in params:
                raise ValueError(f"rope_scaling of type 'ntkmixed' needs a {key!r}")
