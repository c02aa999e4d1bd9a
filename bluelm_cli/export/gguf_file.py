"""BlueLM checkpoint → one GGUF file for llama.cpp and ollama, written with the `gguf` package.

Llama architecture with the folded embedding (see hf.py). llama.cpp's Llama graph rotates interleaved
pairs, so q/k rows are permuted as its own converter does (conversion/llama.py `permute`); 32K ntkmixed
becomes a `rope_freqs` tensor holding the per-frequency divisors, which ggml applies as `theta / ff`.
The vocabulary is SentencePiece's pieces with their scores and types (the tags USER_DEFINED, so llama.cpp
cuts them out of the text whole). Tensors are written one at a time after the header.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bluelm_cli.export.chat_template import GGUF_CHAT_TEMPLATE
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.export.hf import check_shapes, open_weights, llama_config, llama_tensors, piece_count, resolve_dtype
from bluelm_cli.export.tokenizer_json import read_model_proto, steps_llama_cpp_skips

__all__ = ["export_gguf", "gguf_tensor_name"]

_LAYER_PARTS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_tensor_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, _, layer, part = name.split(".", 3)
    return f"blk.{layer}.{_LAYER_PARTS[part]}"


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half (HF) row order → llama.cpp's interleaved pairs, per head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(
    folder: Path,
    out_file: Path,
    *,
    dtype: str = "auto",
    on_status: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> int:
    """Write the GGUF for the checkpoint in `folder`; returns the number of tensors written."""
    import gguf

    skipped = steps_llama_cpp_skips(read_model_proto(folder / "tokenizer.model"))
    if skipped and on_warning:
        on_warning(
            f"this tokenizer.model normalizes text ({'; '.join(skipped)}) and llama.cpp does not: text that "
            "normalization changes is tokenized differently there; normalize prompts before sending them, "
            "or serve the hf export (its tokenizer.json carries the normalizer)"
        )

    source_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype_name = resolve_dtype(dtype, source_config)
    pieces = piece_count(folder / "tokenizer.model")
    config = llama_config(source_config, pieces, dtype_name)
    source_rope = source_config.get("rope_scaling") or source_config.get("rope_parameters") or {}
    rope_type = source_rope.get("type") or source_rope.get("rope_type") or "default"
    if rope_type not in ("default", "ntkmixed"):
        # llama.cpp has its own keys for some types (linear, yarn) but computes them its own way; unverified
        # here, so refuse rather than write a GGUF that silently computes plain RoPE.
        raise BlueLMError(
            f"GGUF export supports the published RoPE types (default and ntkmixed), not {rope_type!r}; "
            "use --format hf (it carries every transformers RoPE type)"
        )
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(folder.name)
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype_name])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(pieces)
    _add_vocabulary(writer, folder / "tokenizer.model", config)

    tensors: list[tuple[str, Callable[[], np.ndarray], Any]] = []
    if "rope_scaling" in config:
        factors = np.asarray(config["rope_scaling"]["long_factor"], dtype=np.float32)
        tensors.append(("rope_freqs.weight", lambda: factors, None))
    tensors_in = open_weights(folder, source_config)
    check_shapes(tensors_in, source_config, folder)
    if hasattr(tensors_in, "layout") and on_note:
        on_note(f"GGUF holds plain tensors: the {tensors_in.describe()} weights are dequantised as its kernel computes "
                f"them and written as {dtype_name}" + ("" if dtype_name == "float32" else " (--dtype float32 keeps them exact)")
                + "; llama.cpp's llama-quantize can make a 4-bit GGUF of it")
    for name, make, _shape in llama_tensors(tensors_in, source_config, pieces, torch.float32):
        tensors.append((gguf_tensor_name(name), _converter(name, make, heads, kv_heads, dtype_name), name))

    for gguf_name, produce, _ in tensors:
        array = produce()  # each tensor is produced twice (header, then data) so only one is ever in memory
        writer.add_tensor_info(gguf_name, _raw_shape(array), array.dtype, array.nbytes, raw_dtype=_raw_type(gguf, array))
        del array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, produce, _ in tensors:
        if on_status:
            on_status(f"Writing {gguf_name}")
        writer.write_tensor_data(produce())
    writer.close()
    return len(tensors)


def _converter(name: str, make: Callable[[], torch.Tensor], heads: int, kv_heads: int, dtype: str) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        tensor = make()
        if name.endswith("q_proj.weight"):
            tensor = interleave_rope_rows(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = interleave_rope_rows(tensor, kv_heads)
        if tensor.ndim == 1 or dtype == "float32":  # norms stay float32, as llama.cpp's converter keeps them
            return tensor.float().numpy()
        if dtype == "float16":
            return tensor.to(torch.float16).numpy()
        # numpy has no bfloat16: hand gguf the raw 16-bit patterns.
        return _Bf16(tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy())

    return produce


class _Bf16(np.ndarray):
    """An int16 array holding bfloat16 bit patterns, marked so the writer records BF16."""

    def __new__(cls, array: np.ndarray) -> _Bf16:
        return np.asarray(array).view(cls)


def _raw_type(gguf: Any, array: np.ndarray) -> Any:
    return gguf.GGMLQuantizationType.BF16 if isinstance(array, _Bf16) else None


def _raw_shape(array: np.ndarray) -> Any:
    return array.shape


def _add_vocabulary(writer: Any, tokenizer_model: Path, config: dict[str, Any]) -> None:
    proto = read_model_proto(tokenizer_model)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    writer.add_token_scores([float(p.score) for p in proto.pieces])
    # SentencePiece's piece types are GGUF's token types (NORMAL 1 … USER_DEFINED 4, BYTE 6).
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # llama.cpp would put a "▁" after every tag; the chat template writes SentencePiece's one per span instead.
    # Measured (scripts/verify_gguf_llamacpp.py): every chat prompt then gets our engine's ids unless a message
    # contains "<s>"/"</s>" as text; add_space_prefix=true gets 1 in 200.
    writer.add_add_space_prefix(False)
    writer.add_remove_extra_whitespaces(bool(proto.normalizer_spec.remove_extra_whitespaces))
    writer.add_chat_template(GGUF_CHAT_TEMPLATE)
