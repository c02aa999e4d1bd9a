"""The published 4-bit BlueLM releases, read as their kernels read them, and turned into plain weights.

Three layouts, each verified against the code that reads it:

- **Chat-4bits** (`"quantization_bit": 4` in config.json, no `quantization_config`): GPTQ-for-LLaMa's
  "old cuda" v1, read by the `quant_cuda` extension of vivo-ai-lab/BlueLM (`VecQuant4MatMulKernel`).
  `qweight` int32 [in/8, out] holds input row 8r+j in bits 4j..4j+3; `qzeros` int32 [in/g, out/8] holds
  column 8c+j's zero minus one in bits 4j..4j+3; `scales` float32 [in/g, out]. The kernel computes, in
  float32, `zero = scale * ((nibble) + 1)` and then `scale * q - zero`, which nvcc (default `--fmad=true`,
  no flag in the extension's setup) contracts to one fused multiply-add. Each nibble is read on its own:
  the packer's uint32 trap (a zero of 0 stored as 0xFFFFFFFF, setting every higher nibble of the word to
  0xF) means zeros of 16 for those columns, and that is what the file computes; a loader that adds
  0x11111111 (carrying) or drops the +1 gives other weights.
- **Chat-32K-AWQ** (`quant_method` "awq", `version` "gemm"): AutoAWQ's GEMM layout. `qweight` int32
  [in, out/8] and `qzeros` int32 [in/g, out/8] pack output columns 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j] in
  bits 4j..; zeros are stored as they are; `scales` fp16 [in/g, out]; `w = (q - zero) * scale`.
- **Chat-32K-GPTQ** (`quant_method` "gptq", `checkpoint_format` "gptq" = v1): AutoGPTQ's layout, the same
  packing as Chat-4bits with fp16 scales, a `g_idx` naming each input row's group, and a bias per linear
  (zero in the release; a non-zero one is refused, as BlueLM's linears have none). v1 stores zero minus one.

The dequantised weight is exact in float32: with fp16 scales `(q - zero) * scale` needs at most 16
significant bits; with Chat-4bits' float32 scales the fused multiply-add is computed exactly in float64
(both terms are multiples of the scale's last bit, below 2^30 of it) and rounded once to float32.

May import: nothing of bluelm_cli above modeling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "AWQ_PACK_ORDER",
    "PackedInt4Linear",
    "QuantizedLayout",
    "QuantizedTensors",
    "UnsupportedQuantization",
    "dequantize",
    "dequantize_awq_gemm",
    "dequantize_gptq",
    "dequantize_gptq_for_llama",
    "detect_layout",
    "unpack_columns",
    "unpack_rows",
]

# AutoAWQ's WQLinear_GEMM packs output column 8c + AWQ_PACK_ORDER[j] into bits 4j..4j+3 of word c.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNPACK_ORDER = tuple(AWQ_PACK_ORDER.index(column) for column in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
_QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


class UnsupportedQuantization(ValueError):
    """A quantized checkpoint in a layout (or with a value) that bluelm-cli can't read faithfully."""


@dataclass(frozen=True)
class QuantizedLayout:
    """How a checkpoint's linear weights are stored: one of the three published layouts."""

    kind: str  # "gptq-for-llama" (Chat-4bits), "awq-gemm" (Chat-32K-AWQ), "gptq" (Chat-32K-GPTQ)
    bits: int
    group_size: int | None  # None: read from the tensors' shapes (Chat-4bits' config does not say)
    zero_offset: int = 0  # what is added to a stored zero: 1 for the GPTQ v1 formats
    symmetric: bool | None = None

    @property
    def name(self) -> str:
        return {
            "gptq-for-llama": "GPTQ-for-LLaMa v1 (BlueLM-7B-Chat-4bits)",
            "awq-gemm": "AWQ GEMM",
            "gptq": "GPTQ v1" + (" symmetric" if self.symmetric else "") if self.zero_offset else "GPTQ v2",
        }[self.kind]

    def describe(self, group_size: int | None = None) -> str:
        """'AWQ GEMM, 4-bit, group 128': what /show info and the loaded line say."""
        group = self.group_size or group_size
        return f"{self.name}, {self.bits}-bit" + (f", group {group}" if group else "")


def detect_layout(config: dict[str, Any], folder: Path | None = None) -> QuantizedLayout | None:
    """The quantized layout config.json (or quantize_config.json beside it) declares; None for plain weights.

    Raises UnsupportedQuantization for a quantization the loader does not read (another method, bits, AWQ GEMV)."""
    quantization = config.get("quantization_config")
    if quantization is None and folder is not None and (folder / "quantize_config.json").is_file():
        quantization = dict(json.loads((folder / "quantize_config.json").read_text(encoding="utf-8")))
        quantization.setdefault("quant_method", "gptq")
    if isinstance(quantization, dict):
        method = str(quantization.get("quant_method", "")).lower()
        bits = int(quantization.get("bits", quantization.get("w_bit", 0)) or 0)
        group = quantization.get("group_size", quantization.get("q_group_size"))
        group_size = int(group) if group is not None else None
        if bits != 4:
            raise UnsupportedQuantization(f"{method or 'quantized'} weights of {bits} bits; bluelm-cli reads 4-bit AWQ and GPTQ")
        if group_size is not None and group_size <= 0:
            raise UnsupportedQuantization("per-channel quantization (group_size -1); bluelm-cli reads grouped 4-bit weights")
        if method == "awq":
            version = str(quantization.get("version", "gemm")).lower()
            if version != "gemm":
                raise UnsupportedQuantization(f"AWQ version {version!r}; bluelm-cli reads AutoAWQ's GEMM layout")
            if not quantization.get("zero_point", True):
                raise UnsupportedQuantization("AWQ without zero points; bluelm-cli reads AutoAWQ's GEMM layout with zero points")
            return QuantizedLayout("awq-gemm", bits, group_size)
        if method == "gptq":
            checkpoint_format = str(quantization.get("checkpoint_format", "gptq")).lower()
            if checkpoint_format not in ("gptq", "gptq_v2"):
                raise UnsupportedQuantization(f"GPTQ checkpoint format {checkpoint_format!r}; bluelm-cli reads gptq (v1) and gptq_v2")
            offset = 1 if checkpoint_format == "gptq" else 0
            return QuantizedLayout("gptq", bits, group_size, zero_offset=offset, symmetric=bool(quantization.get("sym", True)))
        raise UnsupportedQuantization(f"quant_method {method!r}; bluelm-cli reads AWQ (GEMM) and GPTQ checkpoints")
    bits = config.get("quantization_bit")
    if bits is not None:
        if int(bits) != 4:
            raise UnsupportedQuantization(f"quantization_bit {bits}; bluelm-cli reads the 4-bit release (BlueLM-7B-Chat-4bits)")
        return QuantizedLayout("gptq-for-llama", 4, None, zero_offset=1)
    return None


# ------------------------------------------------------------------------------------------------ unpacking
def _shifts(device: torch.device) -> torch.Tensor:
    # Made on the device (a kernel), not copied from the host: a CUDA graph can capture it.
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[n/8, m] int32 → [n, m] nibbles: row 8r+j from bits 4j..4j+3 of row r (GPTQ's qweight)."""
    words = packed.to(torch.int32)
    # An arithmetic shift of a negative word only changes bits above the nibble, which the mask drops.
    nibbles = (words.unsqueeze(1) >> _shifts(words.device).view(1, 8, 1)) & 0xF
    return nibbles.reshape(words.shape[0] * 8, words.shape[1])


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """[n, m/8] int32 → [n, m] nibbles: column 8c+j from bits 4j..4j+3 of column c (qzeros, AWQ's qweight)."""
    words = packed.to(torch.int32)
    nibbles = (words.unsqueeze(-1) >> _shifts(words.device)) & 0xF
    return nibbles.reshape(words.shape[0], words.shape[1] * 8)


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    nibbles = unpack_columns(packed)
    rows, columns = nibbles.shape
    return nibbles.view(rows, columns // 8, 8)[:, :, list(_AWQ_UNPACK_ORDER)].reshape(rows, columns)


def _groups(in_features: int, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int | None) -> int | torch.Tensor:
    """The size of the contiguous groups of input rows, or (for a g_idx that is not `row // size`) each row's group."""
    groups = scales.shape[0]
    size = group_size or in_features // max(groups, 1)
    if size <= 0 or -(-in_features // size) != groups:
        raise UnsupportedQuantization(f"{in_features} input features do not split into {groups} groups of {size}")
    if g_idx is not None:
        index = g_idx.to(torch.int64)
        if index.shape != (in_features,) or index.min() < 0 or index.max() >= groups:
            raise UnsupportedQuantization(f"g_idx of shape {tuple(g_idx.shape)} does not index {groups} groups")
        if not torch.equal(index, torch.arange(in_features, device=index.device) // size):
            return index  # act-order: each row names its group
    if in_features % size:
        return torch.arange(in_features, device=scales.device) // size
    return size


def _dequantize(q: torch.Tensor, zero: torch.Tensor, scales: torch.Tensor, groups: int | torch.Tensor, *, fused: bool) -> torch.Tensor:
    """[out, in] float32 from q [in, out], zero and scale [groups, out]; contiguous groups broadcast, without copies.

    fused: `scale * q - fp32(scale * zero)` with the product unrounded (Chat-4bits' kernel); else `(q - zero) * scale`."""
    in_features, out_features = q.shape
    scale = scales.to(torch.float32)
    if isinstance(groups, int):
        q = q.view(-1, groups, out_features)
        zero, scale = zero.unsqueeze(1), scale.unsqueeze(1)
    else:
        zero, scale = zero[groups], scale[groups]
    if fused:
        rounded_zero = scale * zero.to(torch.float32)  # rounded to float32, as the kernel's
        # exact in float64 (see the module doc), then rounded once: the fused multiply-add's result
        weight = torch.addcmul(-rounded_zero.to(torch.float64), scale.to(torch.float64), q.to(torch.float64)).to(torch.float32)
    else:
        weight = (q - zero).to(torch.float32) * scale
    return weight.reshape(in_features, out_features).t().contiguous()


# ------------------------------------------------------------------------------------------- dequantising
def dequantize_gptq_for_llama(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                              g_idx: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """Chat-4bits: the float32 [out, in] weight `VecQuant4MatMulKernel` computes, bit for bit.

    zero = fp32(scale * (nibble + 1)); w = fp32(scale * q - zero) with the product unrounded (nvcc's FMA)."""
    q = unpack_rows(qweight)
    groups = _groups(q.shape[0], scales, g_idx, group_size)
    return _dequantize(q, unpack_columns(qzeros) + 1, scales, groups, fused=True)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    group_size: int | None, zero_offset: int = 1) -> torch.Tensor:
    """AutoGPTQ v1 (`zero_offset` 1) or v2 (0): float32 [out, in] = (q - (nibble + offset)) * scale."""
    q = unpack_rows(qweight)
    groups = _groups(q.shape[0], scales, g_idx, group_size)
    return _dequantize(q, unpack_columns(qzeros) + zero_offset, scales, groups, fused=False)


def dequantize_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        group_size: int | None) -> torch.Tensor:
    """AutoAWQ GEMM: float32 [out, in] = (q - zero) * scale (fp16 scales: exact in float32)."""
    q = _awq_columns(qweight)
    groups = _groups(q.shape[0], scales, None, group_size)
    return _dequantize(q, _awq_columns(qzeros), scales, groups, fused=False)


def dequantize(layout: QuantizedLayout, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 [out, in] weight of one linear stored in `layout`, as its publisher's kernel computes it."""
    if layout.kind == "awq-gemm":
        return dequantize_awq_gemm(qweight, qzeros, scales, layout.group_size)
    if layout.kind == "gptq-for-llama":
        return dequantize_gptq_for_llama(qweight, qzeros, scales, g_idx, layout.group_size)
    return dequantize_gptq(qweight, qzeros, scales, g_idx, layout.group_size, layout.zero_offset)


class PackedInt4Linear(torch.nn.Module):
    """A linear layer that keeps its release's 4-bit tensors and dequantises them at every forward.

    The weight it multiplies by is the one `dequantize` gives (cast to the input's dtype), so a model of these
    computes what the dequantised-at-load model computes, bit for bit, in a quarter of the weight memory, at the
    price of unpacking each layer's weight at each step (plain PyTorch, any device). The forward makes no host
    round trip (groups worked out here, AWQ's column order undone here), so a CUDA graph can capture it."""

    def __init__(self, layout: QuantizedLayout, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, out_features: int, in_features: int) -> None:
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = in_features, out_features
        self.columns_packed = layout.kind == "awq-gemm"  # AWQ packs output columns; GPTQ packs input rows
        if self.columns_packed:  # the same nibbles in plain column order: a lossless permutation
            qweight, qzeros = _pack_plain_columns(_awq_columns(qweight)), _pack_plain_columns(_awq_columns(qzeros))
        self.zero_offset = 1 if layout.kind == "gptq-for-llama" else layout.zero_offset
        self.fused = layout.kind == "gptq-for-llama"
        groups = _groups(in_features, scales, g_idx, layout.group_size)
        self.group_size = groups if isinstance(groups, int) else None
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("group_index", None if isinstance(groups, int) else groups)

    def weight_float32(self) -> torch.Tensor:
        q = unpack_columns(self.qweight) if self.columns_packed else unpack_rows(self.qweight)
        zero = unpack_columns(self.qzeros) + self.zero_offset
        groups = self.group_size if self.group_size is not None else self.group_index
        return _dequantize(q, zero, self.scales, groups, fused=self.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight_float32().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout.describe()}"


def _pack_plain_columns(nibbles: torch.Tensor) -> torch.Tensor:
    """[n, m] nibbles → int32 [n, m/8], column 8c+j in bits 4j..4j+3 (the inverse of unpack_columns)."""
    words = torch.zeros(nibbles.shape[0], nibbles.shape[1] // 8, dtype=torch.int64, device=nibbles.device)
    for j in range(8):
        words |= nibbles[:, j::8].to(torch.int64) << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# -------------------------------------------------------------------------------------- the checkpoint view
class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


class QuantizedTensors:
    """A quantized checkpoint's tensors as a plain BlueLM's: `X.weight` (float32, dequantised) in place of
    `X.qweight/.qzeros/.scales/.g_idx/.bias`, every other tensor as stored. Same interface as SourceTensors."""

    def __init__(self, source: TensorSource, layout: QuantizedLayout, device: torch.device | str = "cpu") -> None:
        self.source = source
        self.layout = layout
        # Where the arithmetic runs: the loader passes its GPU, where unpacking 6.5 B weights takes a moment, not
        # minutes. The result is the same on any device: integer ops, float64 sums that are exact, single roundings.
        self.device = torch.device(device)
        stored = source.names()
        self.modules = [name.removesuffix(".qweight") for name in stored if name.endswith(".qweight")]
        if not self.modules:
            raise UnsupportedQuantization("config.json declares quantized weights but the files hold no qweight tensors")
        quantized = set(self.modules)
        self._names: list[str] = []
        for name in stored:
            module, _, part = name.rpartition(".")
            if module in quantized:
                if part == "qweight":
                    self._names.append(module + ".weight")
                elif part not in _QUANT_PARTS:
                    self._names.append(name)  # not ours to interpret: the shape check names it
                continue
            self._names.append(name)
        self._stored = set(stored)

    def names(self) -> list[str]:
        return list(self._names)

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in set(self.modules)

    def shape(self, name: str) -> tuple[int, ...]:
        if not self.is_quantized(name):
            return self.source.shape(name)
        module = name.removesuffix(".weight")
        scales = self.source.shape(module + ".scales")
        packed = self.source.shape(module + ".qweight")
        in_features = packed[0] if self.layout.kind == "awq-gemm" else packed[0] * 8
        return (scales[1], in_features)

    @property
    def group_size(self) -> int | None:
        """The group size (from the config, or from the first quantized linear's shapes)."""
        if self.layout.group_size:
            return self.layout.group_size
        out_features, in_features = self.shape(self.modules[0] + ".weight")
        groups = self.source.shape(self.modules[0] + ".scales")[0]
        return in_features // groups if groups else None

    def describe(self) -> str:
        return self.layout.describe(self.group_size)

    def get(self, name: str) -> torch.Tensor:
        if not self.is_quantized(name):
            return self.source.get(name)
        module = name.removesuffix(".weight")
        part: Callable[[str], torch.Tensor | None] = (
            lambda suffix: self.source.get(module + suffix).to(self.device) if module + suffix in self._stored else None
        )
        qweight, qzeros, scales = part(".qweight"), part(".qzeros"), part(".scales")
        if qzeros is None or scales is None:
            raise UnsupportedQuantization(f"{module} has a qweight but no {'qzeros' if qzeros is None else 'scales'}")
        bias = part(".bias")
        if bias is not None and bool(bias.ne(0).any()):
            raise UnsupportedQuantization(f"{module}.bias is not zero; BlueLM's linear layers have no bias")
        try:
            return dequantize(self.layout, qweight, qzeros, scales, part(".g_idx"))
        except RuntimeError as error:  # shapes that do not fit one another
            raise UnsupportedQuantization(f"{module}: its qweight, qzeros and scales do not fit together ({error})") from None

    def packed_linear(self, name: str) -> PackedInt4Linear:
        """The quantized linear `name` (…proj.weight) as a PackedInt4Linear on this view's device, its parts checked
        by dequantising them once (shapes, bias)."""
        self.get(name)
        module = name.removesuffix(".weight")
        stored = lambda suffix: self.source.get(module + suffix).to(self.device).contiguous()  # noqa: E731
        g_idx = stored(".g_idx").to(torch.int32) if module + ".g_idx" in self._stored else None
        out_features, in_features = self.shape(name)
        return PackedInt4Linear(self.layout, stored(".qweight"), stored(".qzeros"), stored(".scales"), g_idx,
                                out_features, in_features)
