"""BlueLMForCausalLM for current transformers: Llama's layers plus an embedding LayerNorm.

Computes what the published BlueLM-7B checkpoints compute (see docs/MODEL.md) with parameter names identical
to theirs, so their weights load with no renaming. It uses transformers' cache classes (DynamicCache,
StaticCache), its attention backends (sdpa by default, eager, flash-attention) and `generate()`, and it
records hidden states and attentions, checkpoints gradients and returns tuples through the same transformers
utilities as its Llama, so generic transformers code (generation modes, peft, Trainer) works with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from bluelm_cli.modeling._compat import accepts_past_key_values, cache_keyword, causal_mask, output_cache
from bluelm_cli.modeling.configuration import BlueLMConfig, check_rope_type


def rope_frequencies(config: BlueLMConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies over the full head dim and the factor cos/sin are scaled by.

    "default" and BlueLM's "ntkmixed" (frequency i divided by exp(a·(i+1)^b)) are computed here; every other
    type by transformers' `ROPE_INIT_FUNCTIONS`, exactly as its Llama computes them.
    """
    params = config.rope_parameters
    # The config refuses other types when built, but a caller may have replaced rope_parameters since.
    check_rope_type(params)
    rope_type = params["rope_type"]
    if rope_type not in ("default", "ntkmixed"):
        return ROPE_INIT_FUNCTIONS[rope_type](config, device)
    dim = config.head_dim
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if rope_type == "ntkmixed":
        factor, power = float(params["factor"]), float(params["power"])
        a = math.log(factor) / (dim / 2) ** power
        index = torch.arange(1, dim // 2 + 1, dtype=torch.float32, device=device)
        inv_freq = inv_freq / torch.exp(a * index**power)
    return inv_freq, 1.0


def rope_inverse_frequencies(config: BlueLMConfig) -> torch.Tensor:
    """The inverse frequencies of :func:`rope_frequencies` (at the configured length, for "dynamic")."""
    return rope_frequencies(config)[0]


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the published model computes it: in float32, scaled by the weight in the input's dtype."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def silu_and_multiply(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half times the second half: the fused gate/up projection's output into the down projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


class BlueLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm  # see compile_pointwise

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.kernel(hidden_states, self.weight, self.variance_epsilon)


class BlueLMRotaryEmbedding(nn.Module):
    """cos/sin per position, as transformers' LlamaRotaryEmbedding computes them (the same buffers and the same
    `dynamic_rope_update`, which re-derives the frequencies for "dynamic" and "longrope" from the sequence length)."""

    inv_freq: torch.Tensor
    original_inv_freq: torch.Tensor

    def __init__(self, config: BlueLMConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = rope_frequencies(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def reset_frequencies(self, device: torch.device | None = None) -> None:
        """Recompute the buffers from the config (after a model was built on the meta device)."""
        inv_freq, self.attention_scaling = rope_frequencies(self.config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return hidden_states
    batch, heads, length, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(batch, heads, n_rep, length, head_dim)
    return expanded.reshape(batch, heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    # The published model takes the softmax in float32 whatever the weights' dtype.
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class BlueLMAttention(nn.Module):
    def __init__(self, config: BlueLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections: q, k and v in one matmul
        self.rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = apply_rotary_pos_emb  # see compile_pointwise

    def fuse(self) -> bool:
        """Replace q/k/v_proj by one projection of their concatenated weights (the same outputs, one matmul)."""
        if self.qkv_proj is not None:
            return False
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if not _fusable(parts):
            return False
        self.qkv_proj = _concatenated(parts)
        self._qkv_sizes = [part.out_features for part in parts]
        del self.q_proj, self.k_proj, self.v_proj
        return True

    @accepts_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self.qkv_proj is not None:
            query, key, value = self.qkv_proj(hidden_states).split(self._qkv_sizes, dim=-1)
        else:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query = query.view(hidden_shape).transpose(1, 2)
        key = key.view(hidden_shape).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.attention_dropout if self.training else 0.0
        output, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        # The weights are what `output_attentions` records (None from backends that never form them).
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class BlueLMMLP(nn.Module):
    def __init__(self, config: BlueLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections: gate and up in one matmul
        # For the fused gate/up output, when the activation is SiLU (see compile_pointwise).
        self.activate_gate_up: Callable[[torch.Tensor], torch.Tensor] | None = (
            silu_and_multiply if config.hidden_act == "silu" else None)

    def fuse(self) -> bool:
        """Replace gate/up_proj by one projection of their concatenated weights (the same outputs, one matmul)."""
        if self.gate_up_proj is not None or not _fusable((self.gate_proj, self.up_proj)):
            return False
        self.gate_up_proj = _concatenated((self.gate_proj, self.up_proj))
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            if self.activate_gate_up is not None:
                return self.down_proj(self.activate_gate_up(self.gate_up_proj(x)))
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _fusable(parts: tuple[nn.Module, ...]) -> bool:
    # Plain Linear layers only (a quantized layer subclasses or replaces Linear and keeps its own format), without
    # accelerate's hooks (layers spread over devices), on one device and dtype.
    if not all(type(part) is nn.Linear and part.bias is None and not hasattr(part, "_hf_hook") for part in parts):
        return False
    weights = [part.weight for part in parts]
    return len({(w.device, w.dtype, w.shape[1]) for w in weights}) == 1


def _concatenated(parts: tuple[nn.Linear, ...]) -> nn.Linear:
    weight = torch.cat([part.weight.detach() for part in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse every layer's q/k/v and gate/up projections (for inference, after loading); how many were fused.

    Each layer then runs two matmuls where it ran five (q/k/v in one, gate/up in one): fewer kernel launches and
    fatter matmuls per decode step. Each output element is the dot product it was (a GEMM of another width may
    sum it in another order: equal to float rounding, measured within 1e-6 in float32).
    The parameter names change, so a fused model is not for saving (exports read the checkpoint files).
    """
    fused = 0
    for module in model.modules():
        if isinstance(module, (BlueLMAttention, BlueLMMLP)) and module.fuse():
            fused += 1
    return fused


def compile_pointwise(model: nn.Module, *, backend: str | Callable = "inductor") -> int:
    """Compile the element-wise pieces between the matmuls, each into one kernel: every RMSNorm, the rotary embedding
    of q and k, and SiLU times up after the fused gate/up projection; how many modules now use them.

    Eager, a RMSNorm is seven kernels and RoPE about twelve a layer: most of a decode step's ~1,500 kernels on a GPU.
    Compiled once each with dynamic shapes (prefill and decode, every attention window), they are ordinary kernels
    that a CUDA graph captures, so the graph runner keeps its cheap capture per window and gets fused kernels. The
    values equal the eager ones to float rounding (a reduction may sum in another order), not bit for bit.
    """
    compiled: dict[str, Callable] = {}

    def kernel(function: Callable) -> Callable:
        if function.__name__ not in compiled:
            compiled[function.__name__] = torch.compile(function, backend=backend, dynamic=True, fullgraph=True)
        return compiled[function.__name__]

    changed = 0
    for module in model.modules():
        if isinstance(module, BlueLMRMSNorm):
            module.kernel = kernel(rms_norm)
        elif isinstance(module, BlueLMAttention):
            module.rotary = kernel(apply_rotary_pos_emb)
        elif isinstance(module, BlueLMMLP) and module.activate_gate_up is not None:
            module.activate_gate_up = kernel(silu_and_multiply)
        else:
            continue
        changed += 1
    return changed


def eager_pointwise(model: nn.Module) -> None:
    """Undo compile_pointwise: the eager functions again (after a compile that failed, say)."""
    for module in model.modules():
        if isinstance(module, BlueLMRMSNorm):
            module.kernel = rms_norm
        elif isinstance(module, BlueLMAttention):
            module.rotary = apply_rotary_pos_emb
        elif isinstance(module, BlueLMMLP) and module.activate_gate_up is not None:
            module.activate_gate_up = silu_and_multiply


class BlueLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BlueLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BlueLMAttention(config, layer_idx)
        self.mlp = BlueLMMLP(config)
        self.input_layernorm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @accepts_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BlueLMPreTrainedModel(PreTrainedModel):
    config_class = BlueLMConfig
    config: BlueLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["BlueLMDecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # What `output_hidden_states` / `output_attentions` collect, through transformers' output-capturing hooks.
    _can_record_outputs = {"hidden_states": BlueLMDecoderLayer, "attentions": BlueLMAttention}
    # Older checkpoints saved the rotary buffer; it is recomputed from the config.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, BlueLMRotaryEmbedding):
            # Not transformers' generic rotary init: it knows neither "ntkmixed" nor where "default" is computed here.
            inv_freq, _ = rope_frequencies(module.config, module.inv_freq.device)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)
            return
        super()._init_weights(module)
        if isinstance(module, BlueLMRMSNorm):
            module.weight.fill_(1.0)


class BlueLMModel(BlueLMPreTrainedModel):
    def __init__(self, config: BlueLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # The one difference from Llama: a LayerNorm (with bias) on the token embeddings.
        self.embed_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps) if config.use_stable_embedding else None
        )
        self.layers = nn.ModuleList(BlueLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BlueLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.embed_layer_norm is not None:
            inputs_embeds = self.embed_layer_norm(inputs_embeds)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        mask = causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            # hidden_states goes first and by position: the output-capturing hook records it as the layer's input.
            hidden_states = layer(hidden_states, position_embeddings, mask, **cache_keyword(cache), **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **cache_keyword(cache))


class BlueLMForCausalLM(BlueLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: BlueLMConfig) -> None:
        super().__init__(config)
        self.model = BlueLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        sampleable = self.config.tokenizer_vocab_size
        if sampleable is not None and sampleable < logits.shape[-1]:
            # Embedding rows past the tokenizer are padding: an id there could never be decoded.
            logits[..., sampleable:] = torch.finfo(logits.dtype).min
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_keyword(output_cache(outputs)),
        )
