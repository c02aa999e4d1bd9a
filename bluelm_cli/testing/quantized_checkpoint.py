"""Tiny BlueLM checkpoints in the exact layouts of the three published 4-bit releases.

- `chat-4bits`: BlueLM-7B-Chat-4bits, GPTQ-for-LLaMa "old cuda" v1. `pytorch_model-0000N-of-0000M.bin`
  shards with their index; config.json is the Chat config plus `"quantization_bit": 4` (no
  `quantization_config`). Every q/k/v/o/gate/up/down projection: `qweight` int32 [in/8, out] (input row
  8r+j in bits 4j..4j+3), `qzeros` int32 [in/128, out/8] holding zero - 1 packed the way GPTQ-for-LLaMa's
  `pack` does it (cast to uint32, shifted and OR-ed: a zero of 0 becomes 0xFFFFFFFF and sets its nibble and
  every higher nibble of the word to 0xF), `scales` float32 [in/128, out], no g_idx, no bias. Embeddings,
  the embedding LayerNorm, the RMSNorms and lm_head bf16.
- `chat-32k-awq`: BlueLM-7B-Chat-32K-AWQ, AutoAWQ GEMM. `qweight` int32 [in, out/8] and `qzeros` int32
  [in/128, out/8] with output columns in the interleaved order (0, 2, 4, 6, 1, 3, 5, 7), zeros as they are,
  `scales` fp16 [in/128, out]; `.bin` shards; `quantization_config` {bits 4, group_size 128, quant_method
  awq, version gemm, zero_point true}; everything else fp16; RoPE ntkmixed factor 16 power 0.3.
- `chat-32k-gptq`: BlueLM-7B-Chat-32K-GPTQ, AutoGPTQ v1 symmetric. safetensors shards,
  `quantize_config.json` and the same dict in config.json; `qweight` as Chat-4bits, `qzeros` holding
  8 - 1 = 7 in every nibble, `scales` fp16, `g_idx` int32 [in], a zero fp16 `bias` on each linear.

The integer weights come from round-to-nearest quantization of `tiny_checkpoint`'s random weights (the
quantizers of GPTQ-for-LLaMa / AutoAWQ without their calibration). Chat-4bits checkpoints also get groups
whose weights are all ≥ 0, so zero points of 0 sit in the top nibble and below it: the trap is in the file.
Tensor shapes need in-features that are multiples of 128: use `QUANTIZED_SPEC` (hidden 256, MLP 384).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from bluelm_cli.testing.tiny_checkpoint import TinySpec, _write_weights, build_checkpoint, random_state_dict

__all__ = ["LAYOUTS", "QUANTIZED_SPEC", "ZERO_POINT_ZERO_COLUMNS", "ZERO_POINT_ZERO_LINEARS", "build_quantized_checkpoint", "pack_gptq_zeros"]

GROUP_SIZE = 128
LAYOUTS = ("chat-4bits", "chat-32k-awq", "chat-32k-gptq")
QUANTIZED_SPEC = TinySpec(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)
_NTK_32K = {"type": "ntkmixed", "factor": 16.0, "power": 0.3}
_AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Chat-4bits: output columns whose first group is made all non-negative, so that their zero point is 0:
# column 7 is the top nibble of its word, 2 and 13 (word 1, nibble 5) lie below the top. Done in these
# projections only: the trap turns the zeros of the columns above to 16, and the tiny model should still talk.
ZERO_POINT_ZERO_COLUMNS = (2, 7, 13)
ZERO_POINT_ZERO_LINEARS = ("self_attn.q_proj", "mlp.down_proj")


def _asymmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-for-LLaMa's asymmetric round-to-nearest per group of 128 inputs: q [in, out], zero and scale [groups, out]."""
    out_features, in_features = weight.shape
    grouped = weight.float().t().reshape(in_features // GROUP_SIZE, GROUP_SIZE, out_features)
    low = grouped.amin(1).clamp(max=0)
    high = grouped.amax(1).clamp(min=0)
    scale = (high - low) / 15
    scale[scale == 0] = 1.0
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(grouped / scale[:, None]) + zero[:, None], 0, 15)
    return q.reshape(in_features, out_features).to(torch.int64), zero.to(torch.int64), scale


def _awq(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's pseudo_quantize_tensor with zero points (the scales stored as fp16)."""
    out_features, in_features = weight.shape
    grouped = weight.float().t().reshape(in_features // GROUP_SIZE, GROUP_SIZE, out_features)
    high, low = grouped.amax(1), grouped.amin(1)
    scale = (high - low).clamp(min=1e-5) / 15
    zero = (-torch.round(low / scale)).clamp(0, 15)
    q = torch.clamp(torch.round(grouped / scale[:, None]) + zero[:, None], 0, 15)
    return q.reshape(in_features, out_features).to(torch.int64), zero.to(torch.int64), scale.half()


def _symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoGPTQ's symmetric round-to-nearest: the zero point is 8 everywhere."""
    out_features, in_features = weight.shape
    grouped = weight.float().t().reshape(in_features // GROUP_SIZE, GROUP_SIZE, out_features)
    high = torch.maximum(grouped.amin(1).abs(), grouped.amax(1))
    scale = (2 * high / 15).half()
    q = torch.clamp(torch.round(grouped / scale.float()[:, None]) + 8, 0, 15)
    zero = torch.full_like(scale, 8, dtype=torch.int64)
    return q.reshape(in_features, out_features).to(torch.int64), zero, scale


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[in, out] nibbles → int32 [in/8, out]: row 8r+j into bits 4j..4j+3 of row r (GPTQ's qweight)."""
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= q[j::8] << (4 * j)
    return _as_int32(words)


def _pack_columns(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[n, out] nibbles → int32 [n, out/8]: column 8c+order[j] into bits 4j..4j+3 of column c."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for j, column in enumerate(order):
        words |= values[:, column::8] << (4 * j)
    return _as_int32(words)


def pack_gptq_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """GPTQ-for-LLaMa's (and AutoGPTQ v1's) qzeros: `(zeros - 1).astype(uint32)` shifted and OR-ed into uint32 words.

    Done with explicit 32-bit wrap-around: -1 is 0xFFFFFFFF, and shifting it left by 4j keeps bits 4j..31 set,
    so a zero of 0 turns its own nibble and every higher nibble of the word to 0xF."""
    stored = (zeros - 1) & 0xFFFFFFFF  # numpy's astype(np.uint32) of a negative int64
    words = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= (stored[:, j::8] << (4 * j)) & 0xFFFFFFFF  # uint32 shift: the bits above 31 are lost
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 → the int32 tensor with the same bits (as `.astype(np.int32)`)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _force_zero_points(weight: torch.Tensor) -> torch.Tensor:
    """The first group of the chosen output columns made non-negative: their asymmetric zero point is 0."""
    weight = weight.clone()
    for column in ZERO_POINT_ZERO_COLUMNS:
        weight[column, :GROUP_SIZE] = weight[column, :GROUP_SIZE].abs()
    return weight


def _quantized_linear(layout: str, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    if layout == "chat-4bits":
        q, zero, scale = _asymmetric(_force_zero_points(weight) if module.endswith(ZERO_POINT_ZERO_LINEARS) else weight)
        return {"qweight": _pack_rows(q), "qzeros": pack_gptq_zeros(zero), "scales": scale.to(torch.float32)}
    if layout == "chat-32k-awq":
        q, zero, scale = _awq(weight)
        return {"qweight": _pack_columns(q, _AWQ_PACK_ORDER), "qzeros": _pack_columns(zero, _AWQ_PACK_ORDER), "scales": scale}
    q, zero, scale = _symmetric(weight)
    in_features, out_features = q.shape
    return {
        "qweight": _pack_rows(q),
        "qzeros": pack_gptq_zeros(zero),
        "scales": scale,
        "g_idx": (torch.arange(in_features) // GROUP_SIZE).to(torch.int32),
        "bias": torch.zeros(out_features, dtype=torch.float16),
    }


_QUANTIZE_CONFIG = {
    "bits": 4,
    "group_size": GROUP_SIZE,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}


def _layout_spec(layout: str, spec: TinySpec) -> TinySpec:
    if layout == "chat-4bits":
        return dataclasses.replace(spec, dtype="bfloat16", weights_format="bin-sharded")
    if layout == "chat-32k-awq":
        return dataclasses.replace(spec, dtype="float16", weights_format="bin-sharded", rope_scaling=dict(_NTK_32K))
    return dataclasses.replace(spec, dtype="float16", weights_format="safetensors-sharded", rope_scaling=dict(_NTK_32K))


def build_quantized_checkpoint(folder: Path, layout: str, spec: TinySpec = QUANTIZED_SPEC) -> Path:
    """Write a tiny checkpoint of `layout` (one of LAYOUTS) into `folder` and return it."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if spec.hidden_size % GROUP_SIZE or spec.intermediate_size % GROUP_SIZE:
        raise ValueError(f"hidden_size and intermediate_size must be multiples of {GROUP_SIZE} (the group size)")
    spec = _layout_spec(layout, spec)
    folder = build_checkpoint(Path(folder), spec)  # side files, tokenizer and traps as published
    for stale in [*folder.glob("pytorch_model*"), *folder.glob("model*.safetensors*")]:
        stale.unlink()
    config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    plain = random_state_dict(dataclasses.replace(spec, dtype="float32"), config["vocab_size"])
    stored_dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float16
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in plain.items():
        module = name.removesuffix(".weight")
        if module.endswith(_LINEARS):
            weights.update({f"{module}.{part}": value.contiguous() for part, value in _quantized_linear(layout, module, tensor).items()})
        else:
            weights[name] = tensor.to(stored_dtype).contiguous()
    _write_weights(folder, weights, spec)
    if layout == "chat-4bits":
        config["quantization_bit"] = 4
    elif layout == "chat-32k-awq":
        config["quantization_config"] = {"bits": 4, "group_size": GROUP_SIZE, "quant_method": "awq",
                                         "version": "gemm", "zero_point": True}
    else:
        config["quantization_config"] = {**_QUANTIZE_CONFIG, "quant_method": "gptq"}
        (folder / "quantize_config.json").write_text(json.dumps(_QUANTIZE_CONFIG, indent=2) + "\n", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n", encoding="utf-8")
    return folder
