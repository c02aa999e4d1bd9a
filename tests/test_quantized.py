"""The three published 4-bit releases (Chat-4bits, Chat-32K-AWQ, Chat-32K-GPTQ) on tiny checkpoints in their exact layouts.

Fidelity is checked against references written here from each publisher's kernel, not from our loader:
- Chat-4bits: vivo-ai-lab/BlueLM quant_cuda/quant_cuda_kernel.cu, VecQuant4MatMulKernel (float32):
  `zero = scale * (((zeros[g*zero_width + w/8] as unsigned) >> (w%8)*4) & 0xF) + 1)`,
  `scale * ((mat[k/8 row] >> (k%8)*4) & 0xF) - zero`, which nvcc (default --fmad=true) fuses into one FMA.
- Chat-32K-AWQ: AutoAWQ's GEMM (pack order 0,2,4,6,1,3,5,7; `(q - zero) * scale`).
- Chat-32K-GPTQ: AutoGPTQ v1 (`zeros + 1`, `scale * (q - zero)`, groups from g_idx).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.prompt import HistoryTurn
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.export.hf import export_hf
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.modeling.quantized import QuantizedTensors, detect_layout
from bluelm_cli.modeling.weights import SourceTensors
from bluelm_cli.testing.quantized_checkpoint import (
    LAYOUTS,
    QUANTIZED_SPEC,
    ZERO_POINT_ZERO_COLUMNS,
    build_quantized_checkpoint,
)
from bluelm_cli.testing.tiny_checkpoint import remote_code_was_executed
from helpers import start

GREEDY = SamplingSettings(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)
LINEARS = [f"model.layers.{n}.{part}" for n in range(QUANTIZED_SPEC.num_hidden_layers) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {layout: build_quantized_checkpoint(root / f"BlueLM-tiny-{layout}", layout) for layout in LAYOUTS}


def stored(folder: Path) -> dict[str, torch.Tensor]:
    source = SourceTensors(folder)
    return {name: source.get(name) for name in source.names()}


# ------------------------------------------------------------------------------- the publishers' arithmetic
def _unsigned(array: torch.Tensor) -> np.ndarray:
    return array.numpy().view(np.uint32).astype(np.uint64)


def reference_old_cuda(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """VecQuant4MatMulKernel's weight for input k, output w, in float32, as [out, in]."""
    mat, zeros = _unsigned(qweight), _unsigned(qzeros)
    scale_table = scales.numpy().astype(np.float32)
    k = np.arange(mat.shape[0] * 8)[:, None]
    w = np.arange(mat.shape[1])[None, :]
    g = k // groupsize
    scale = scale_table[g, w]
    nibble = (zeros[g, w // 8] >> ((w % 8) * 4).astype(np.uint64)) & 0xF
    zero = (scale * (nibble + 1).astype(np.float32)).astype(np.float32)  # float32 product, rounded
    q = (mat[k // 8, w] >> ((k % 8) * 4).astype(np.uint64)) & 0xF
    # fma(scale, q, -zero): the exact value fits a double (multiples of scale's last bit below 2^30), one rounding.
    fused = scale.astype(np.float64) * q.astype(np.float64) - zero.astype(np.float64)
    return torch.from_numpy(fused.astype(np.float32).T.copy())


def reference_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """AutoAWQ GEMM: output column n sits in word n/8 at position j with AWQ_ORDER[j] == n % 8."""
    mat, zeros = _unsigned(qweight), _unsigned(qzeros)
    position = np.array([AWQ_ORDER.index(c) for c in range(8)], dtype=np.uint64)
    k = np.arange(mat.shape[0])[:, None]
    n = np.arange(mat.shape[1] * 8)[None, :]
    g = k // groupsize
    shift = position[n % 8] * 4
    q = ((mat[k, n // 8] >> shift) & 0xF).astype(np.int64)
    zero = ((zeros[g, n // 8] >> shift) & 0xF).astype(np.int64)
    weight = (q - zero).astype(np.float32) * scales.numpy().astype(np.float32)[g, n]
    return torch.from_numpy(weight.astype(np.float32).T.copy())


def reference_gptq_v1(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ v1: zero = nibble + 1, w = scale * (q - zero), the group of input k is g_idx[k]."""
    mat, zeros = _unsigned(qweight), _unsigned(qzeros)
    k = np.arange(mat.shape[0] * 8)[:, None]
    w = np.arange(mat.shape[1])[None, :]
    g = g_idx.numpy().astype(np.int64)[:, None]
    q = ((mat[k // 8, w] >> ((k % 8) * 4).astype(np.uint64)) & 0xF).astype(np.int64)
    zero = (((zeros[g, w // 8] >> ((w % 8) * 4).astype(np.uint64)) & 0xF) + 1).astype(np.int64)
    weight = scales.numpy().astype(np.float32)[g, w] * (q - zero).astype(np.float32)
    return torch.from_numpy(weight.astype(np.float32).T.copy())


def reference_weights(layout: str, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    qweight, qzeros, scales = (tensors[f"{module}.{part}"] for part in ("qweight", "qzeros", "scales"))
    if layout == "chat-4bits":
        return reference_old_cuda(qweight, qzeros, scales, 128)
    if layout == "chat-32k-awq":
        return reference_awq_gemm(qweight, qzeros, scales, 128)
    return reference_gptq_v1(qweight, qzeros, scales, tensors[f"{module}.g_idx"])


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


# --------------------------------------------------------------------------------------------- the layouts
def test_chat_4bits_layout(releases: dict[str, Path]) -> None:
    folder = releases["chat-4bits"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_bit"] == 4 and "quantization_config" not in config
    assert not (folder / "quantize_config.json").exists()
    assert sorted(p.name for p in folder.glob("pytorch_model*")) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    tensors = stored(folder)
    hidden, mlp = QUANTIZED_SPEC.hidden_size, QUANTIZED_SPEC.intermediate_size
    q_proj, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    assert tensors[q_proj + ".qweight"].dtype == torch.int32 and tensors[q_proj + ".qweight"].shape == (hidden // 8, hidden)
    assert tensors[down + ".qweight"].shape == (mlp // 8, hidden)
    assert tensors[down + ".qzeros"].dtype == torch.int32 and tensors[down + ".qzeros"].shape == (mlp // 128, hidden // 8)
    assert tensors[down + ".scales"].dtype == torch.float32 and tensors[down + ".scales"].shape == (mlp // 128, hidden)
    parts = {name.rpartition(".")[2] for name in tensors if name.rpartition(".")[0] in LINEARS}
    assert parts == {"qweight", "qzeros", "scales"}  # no g_idx, no bias, no plain weight
    for name in ("model.embed_tokens.weight", "model.embed_layer_norm.bias", "model.norm.weight", "lm_head.weight"):
        assert tensors[name].dtype == torch.bfloat16


def test_chat_4bits_holds_the_uint32_trap_above_a_zero_point_of_zero(releases: dict[str, Path]) -> None:
    """Columns 2, 7 and 13 of the first group have a zero point of 0: stored -1 as uint32 OR-ed in."""
    words = _unsigned(stored(releases["chat-4bits"])["model.layers.0.self_attn.q_proj.qzeros"])[0]
    nibbles = [[int(words[c] >> (4 * j)) & 0xF for j in range(8)] for c in range(2)]
    assert ZERO_POINT_ZERO_COLUMNS == (2, 7, 13)
    assert nibbles[0][2:] == [0xF] * 6  # column 2's zero of 0 set its nibble and all above it
    assert nibbles[1][5:] == [0xF] * 3  # column 13 = word 1, nibble 5
    assert nibbles[0][:2] != [0xF, 0xF] and nibbles[1][:5] != [0xF] * 5  # the nibbles below are the real zeros - 1
    assert int(words[0]) >= 2**31  # the int32 is negative, as np.int32 of the uint32 word


def test_awq_layout(releases: dict[str, Path]) -> None:
    folder = releases["chat-32k-awq"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"] == {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm",
                                             "zero_point": True}
    assert config["rope_scaling"] == {"type": "ntkmixed", "factor": 16.0, "power": 0.3}
    assert (folder / "pytorch_model.bin.index.json").is_file()
    tensors = stored(folder)
    hidden, mlp = QUANTIZED_SPEC.hidden_size, QUANTIZED_SPEC.intermediate_size
    down = "model.layers.1.mlp.down_proj"
    assert tensors[down + ".qweight"].dtype == torch.int32 and tensors[down + ".qweight"].shape == (mlp, hidden // 8)
    assert tensors[down + ".qzeros"].shape == (mlp // 128, hidden // 8)
    assert tensors[down + ".scales"].dtype == torch.float16 and tensors[down + ".scales"].shape == (mlp // 128, hidden)
    assert tensors["lm_head.weight"].dtype == torch.float16


def test_gptq_layout(releases: dict[str, Path]) -> None:
    folder = releases["chat-32k-gptq"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantize_config = json.loads((folder / "quantize_config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"] == {**quantize_config, "quant_method": "gptq"}
    assert (quantize_config["bits"], quantize_config["group_size"], quantize_config["desc_act"], quantize_config["sym"]) == (4, 128, False, True)
    assert (folder / "model.safetensors.index.json").is_file()
    tensors = stored(folder)
    hidden, mlp = QUANTIZED_SPEC.hidden_size, QUANTIZED_SPEC.intermediate_size
    down = "model.layers.1.mlp.down_proj"
    assert tensors[down + ".qweight"].shape == (mlp // 8, hidden)
    assert tensors[down + ".g_idx"].tolist() == [k // 128 for k in range(mlp)]
    assert tensors[down + ".bias"].dtype == torch.float16 and not tensors[down + ".bias"].any()
    assert (tensors[down + ".qzeros"] == 0x77777777).all()  # symmetric: 8 - 1 in every nibble
    assert tensors[down + ".scales"].dtype == torch.float16


# ----------------------------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dequantised_weights_equal_the_publishers_kernel_bit_for_bit(releases: dict[str, Path], layout: str) -> None:
    folder = releases[layout]
    tensors = stored(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    view = QuantizedTensors(SourceTensors(folder), detect_layout(config, folder))
    assert sorted(view.modules) == sorted(LINEARS)
    for module in LINEARS:
        expected = reference_weights(layout, tensors, module)
        assert view.shape(module + ".weight") == tuple(expected.shape)
        got = view.get(module + ".weight")
        assert got.dtype == torch.float32
        assert torch.equal(bits(got), bits(expected)), module


def test_an_act_order_g_idx_is_honoured(releases: dict[str, Path]) -> None:
    """desc_act checkpoints name each input row's group in g_idx; the published one is row // 128, others must work."""
    from bluelm_cli.modeling.quantized import dequantize_gptq

    tensors = stored(releases["chat-32k-gptq"])
    module = "model.layers.1.mlp.down_proj"
    qweight, qzeros, scales = (tensors[f"{module}.{part}"] for part in ("qweight", "qzeros", "scales"))
    scales = scales * torch.linspace(0.5, 2.0, scales.shape[0], dtype=torch.float16)[:, None]  # groups told apart
    shuffled = tensors[f"{module}.g_idx"][torch.randperm(qweight.shape[0] * 8, generator=torch.Generator().manual_seed(0))]
    got = dequantize_gptq(qweight, qzeros, scales, shuffled, 128)
    assert torch.equal(bits(got), bits(reference_gptq_v1(qweight, qzeros, scales, shuffled)))
    assert not torch.equal(got, dequantize_gptq(qweight, qzeros, scales, tensors[f"{module}.g_idx"], 128))
    from bluelm_cli.modeling.quantized import PackedInt4Linear, QuantizedLayout

    layout = QuantizedLayout("gptq", 4, 128, zero_offset=1, symmetric=True)
    linear = PackedInt4Linear(layout, qweight, qzeros, scales, shuffled, scales.shape[1], qweight.shape[0] * 8)
    assert linear.group_index is not None and torch.equal(bits(linear.weight_float32()), bits(got))


def test_chat_4bits_reading_differs_from_carrying_or_dropping_the_plus_one(releases: dict[str, Path]) -> None:
    """What the test above tells apart: gptqmodel's v1→v2 (+0x11111111, carrying) and a reader without the +1."""
    tensors = stored(releases["chat-4bits"])
    module = "model.layers.0.self_attn.q_proj"
    qweight, qzeros, scales = (tensors[f"{module}.{part}"] for part in ("qweight", "qzeros", "scales"))
    kernel = reference_old_cuda(qweight, qzeros, scales, 128)
    carried = torch.from_numpy(((_unsigned(qzeros) + 0x11111111) & 0xFFFFFFFF).astype(np.uint32).view(np.int32))
    # v2 zeros are read without +1: model that as v1 of (carried - 0x11111111 per nibble) is not possible, so
    # compute v2 directly: zero = nibble of the carried word.
    from bluelm_cli.modeling.quantized import dequantize_gptq

    assert not torch.equal(dequantize_gptq(qweight, carried, scales, None, 128, zero_offset=0), kernel)
    assert not torch.equal(dequantize_gptq(qweight, qzeros, scales, None, 128, zero_offset=0), kernel)
    # The columns with the trap read zeros of 16: far from what the float weights were.
    assert (kernel[3:8, :128] < 0).float().mean() > 0.9


def _dequantised_twin(folder: Path, out: Path, layout: str) -> Path:
    """A plain float32 checkpoint holding the reference-dequantised weights: the fp32 model the release means."""
    out.mkdir()
    for item in folder.iterdir():
        if item.name.endswith((".json", ".model")) and not item.name.endswith("index.json") and item.name != "quantize_config.json":
            shutil.copy(item, out / item.name)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for key in ("quantization_bit", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tensors = stored(folder)
    plain = {name: tensor.float() for name, tensor in tensors.items() if not name.rpartition(".")[0] in LINEARS}
    plain.update({module + ".weight": reference_weights(layout, tensors, module) for module in LINEARS})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in plain.items()}, str(out / "model.safetensors"))
    return out


def _three_turns(loaded: LoadedModel) -> list[tuple[list[int], int]]:
    engine = ChatEngine(loaded)
    history: list[HistoryTurn] = []
    turns = []
    for message in ("你好", "What is the capital of France?", "写一首关于春天的诗。"):
        stream = start(engine, None, history, message, GREEDY)
        "".join(stream)
        assert stream.result is not None
        turns.append((list(stream.result.answer_ids), stream.result.reused_tokens))
        history.append(HistoryTurn(message, stream.result.answer_ids))
    return turns


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_turns_equal_the_fp32_model_on_the_dequantised_weights(
    releases: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    folder = releases[layout]
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    assert not remote_code_was_executed(folder)
    twin = load_model(str(_dequantised_twin(folder, tmp_path / "twin", layout)), device="cpu", dtype="float32")
    for name, tensor in twin.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    ids = loaded.tokenizer("[|Human|]:你好[|AI|]:", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, twin.model(ids).logits)
    turns, expected = _three_turns(loaded), _three_turns(twin)
    assert [answer for answer, _ in turns] == [answer for answer, _ in expected]
    assert all(len(answer) > 0 for answer, _ in turns)
    assert turns[0][1] == 0 and turns[1][1] > 0 and turns[2][1] > turns[1][1]  # turns 2 and 3 reused the cache
    # The third turn is as right as the first: a fresh engine (no cache) on the whole conversation agrees.
    history = [HistoryTurn("你好", turns[0][0]), HistoryTurn("What is the capital of France?", turns[1][0])]
    stream = start(ChatEngine(loaded), None, history, "写一首关于春天的诗。", GREEDY)
    "".join(stream)
    assert list(stream.result.answer_ids) == turns[2][0]


@pytest.mark.parametrize(("layout", "context", "description"), [
    ("chat-4bits", 2048, "GPTQ-for-LLaMa v1 (BlueLM-7B-Chat-4bits), 4-bit, group 128"),
    ("chat-32k-awq", 32768, "AWQ GEMM, 4-bit, group 128"),
    ("chat-32k-gptq", 32768, "GPTQ v1 symmetric, 4-bit, group 128"),
])
def test_load_says_what_it_loaded(releases: dict[str, Path], layout: str, context: int, description: str) -> None:
    loaded = load_model(str(releases[layout]), device="cpu", dtype="bfloat16")
    assert loaded.weights_format == f"{description}, dequantised to bfloat16"
    assert loaded.quantization is None  # no bitsandbytes: the fast path runs plain linears
    assert loaded.context_length == context and loaded.model.dtype == torch.bfloat16
    assert not hasattr(loaded.model.config, "quantization_config")
    info = ChatEngine(loaded).info()
    assert info.quantization == loaded.weights_format
    from bluelm_cli.ui.show import info_rows

    assert ("quantization", f"{description}, dequantised to bfloat16") in info_rows(info)  # /show info


@pytest.mark.slow
def test_ask_prints_the_format_it_loaded(releases: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["ask", "--model", str(releases["chat-32k-awq"]), "--device", "cpu", "-t", "0",
                                      "-n", "3", "-v", "你好"])
    assert result.exit_code == 0, result.stderr
    assert "AWQ GEMM, 4-bit, group 128, dequantised to float32" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ask_load_in_4bit_keeps_a_release_4bit_on_the_cpu(releases: dict[str, Path]) -> None:
    args = ["ask", "--model", str(releases["chat-32k-gptq"]), "--device", "cpu", "-t", "0", "-n", "4", "-v", "你好"]
    kept = CliRunner().invoke(app, [*args, "--load-in-4bit"])
    dense = CliRunner().invoke(app, args)
    assert kept.exit_code == dense.exit_code == 0, kept.stderr
    assert "GPTQ v1 symmetric, 4-bit, group 128, kept 4-bit, computing in float32" in kept.stderr
    assert kept.stdout == dense.stdout and kept.stdout.strip()


def test_load_in_8bit_of_a_quantized_release_is_one_line(releases: dict[str, Path]) -> None:
    with pytest.raises(BlueLMError, match=r"already quantized \(AWQ GEMM, 4-bit, group 128\); drop --load-in-8bit"):
        load_model(str(releases["chat-32k-awq"]), device="cpu", quantization="8bit")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_load_in_4bit_keeps_a_release_4bit_and_computes_the_same(releases: dict[str, Path], layout: str) -> None:
    """--load-in-4bit on a 4-bit release: its own tensors stay packed (no bitsandbytes, CPU too), same answers."""
    from bluelm_cli.modeling.quantized import PackedInt4Linear

    packed = load_model(str(releases[layout]), device="cpu", dtype="float32", quantization="4bit")
    dense = load_model(str(releases[layout]), device="cpu", dtype="float32")
    assert packed.weights_format.endswith("4-bit, group 128, kept 4-bit, computing in float32")
    assert packed.quantization is None  # not bitsandbytes
    linears = [module for module in packed.model.modules() if isinstance(module, PackedInt4Linear)]
    assert len(linears) == len(LINEARS)
    assert not any(isinstance(module, torch.nn.Linear) and module is not packed.model.lm_head for module in packed.model.modules())
    packed_bytes = sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
    dense_bytes = sum(dense.model.get_submodule(name).weight.numel() * 4 for name in LINEARS)
    assert packed_bytes < dense_bytes / 6  # int4 against float32, plus scales and zeros
    ids = packed.tokenizer("[|Human|]:你好[|AI|]:", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(packed.model(ids).logits, dense.model(ids).logits)
    assert [answer for answer, _ in _three_turns(packed)] == [answer for answer, _ in _three_turns(dense)]
    info = ChatEngine(packed).info()
    assert info.parameters == ChatEngine(dense).info().parameters  # /show info counts the packed weights too


@pytest.mark.parametrize(("change", "message"), [
    ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}}, "AWQ version 'gemv'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": 128}}, "gptq weights of 8 bits"),
    ({"quantization_config": {"quant_method": "bitnet", "bits": 4}}, "quant_method 'bitnet'"),
    ({"quantization_bit": 8}, "quantization_bit 8"),
])
def test_unsupported_quantizations_are_refused_in_one_line(
    releases: dict[str, Path], tmp_path: Path, change: dict, message: str
) -> None:
    folder = shutil.copytree(releases["chat-32k-awq"], tmp_path / "other")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config")
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BlueLMError, match=message) as error:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(error.value)


def test_a_non_zero_gptq_bias_is_refused(releases: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(releases["chat-32k-gptq"], tmp_path / "biased")
    from safetensors.torch import load_file, save_file

    shard = next(folder.glob("model-00001-*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.layers.0.self_attn.k_proj.bias"][3] = 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(BlueLMError, match=r"model.layers.0.self_attn.k_proj.bias is not zero"):
        load_model(str(folder), device="cpu")


# ------------------------------------------------------------------------------------------------- export
def _ours_and_ids(folder: Path) -> tuple[torch.nn.Module, torch.Tensor, int]:
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    pieces = loaded.tokenizer.sp_model.get_piece_size()
    ids = torch.randint(4, pieces, (2, 40), generator=torch.Generator().manual_seed(3))
    return loaded.model, ids, pieces


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_dequantised_export_is_plain_llama_with_the_release_logits(releases: dict[str, Path], tmp_path: Path, layout: str) -> None:
    from transformers import LlamaForCausalLM

    notes: list[str] = []
    out = tmp_path / "llama"
    export_hf(releases[layout], out, dtype="float32", dequantize=layout != "chat-4bits", shard_bytes=400_000, on_note=notes.append)
    assert len(notes) == 1
    if layout == "chat-4bits":  # never repacked: its float32 scales and fused arithmetic are not vLLM's
        assert notes[0].startswith("BlueLM-7B-Chat-4bits keeps float32 scales")
    else:
        assert notes[0].startswith("--dequantize was given")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config and not (out / "quantize_config.json").exists()
    assert "dequantised" in (out / "README.md").read_text(encoding="utf-8")
    ours, ids, pieces = _ours_and_ids(releases[layout])
    llama = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = ours(ids).logits[..., :pieces], llama(ids).logits
        assert (expected - got).abs().max().item() <= 1e-5
        prompt = ids[:1, :10]
        assert (ours.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=3, eos_token_id=None).tolist()
                == llama.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=3, eos_token_id=None).tolist())


@pytest.mark.parametrize("layout", ["chat-32k-awq", "chat-32k-gptq"])
def test_awq_and_gptq_exports_keep_the_4bit_tensors_bit_for_bit(releases: dict[str, Path], tmp_path: Path, layout: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    source = releases[layout]
    out = tmp_path / "llama-4bit"
    result = CliRunner().invoke(app, ["export", str(out), "-m", str(source), "--dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    assert "Note:" not in result.stderr  # exact: nothing to say
    source_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"] == source_config["quantization_config"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_scaling"]["rope_type"] == "longrope"
    if layout == "chat-32k-gptq":
        assert json.loads((out / "quantize_config.json").read_text(encoding="utf-8")) == json.loads(
            (source / "quantize_config.json").read_text(encoding="utf-8"))
    before, after = stored(source), stored(out)
    for module in LINEARS:
        parts = {name.rpartition(".")[2] for name in after if name.rpartition(".")[0] == module}
        assert parts == ({"qweight", "qzeros", "scales", "g_idx"} if layout == "chat-32k-gptq" else {"qweight", "qzeros", "scales"})
        for part in parts:
            assert torch.equal(after[f"{module}.{part}"], before[f"{module}.{part}"]), f"{module}.{part}"
    # What an engine with these kernels computes: the exported 4-bit tensors, read by the publisher's arithmetic,
    # in a plain Llama with the exported embedding, norms and head, gives the release's logits.
    state = {name: tensor for name, tensor in after.items() if name.rpartition(".")[0] not in LINEARS}
    state.update({f"{module}.weight": reference_weights(layout, after, module) for module in LINEARS})
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    llama = LlamaForCausalLM(LlamaConfig(**plain)).eval()
    llama.load_state_dict(state, strict=True)
    ours, ids, pieces = _ours_and_ids(source)
    with torch.no_grad():
        assert (ours(ids).logits[..., :pieces] - llama(ids).logits).abs().max().item() <= 1e-5


def test_gguf_of_a_quantized_release_holds_the_dequantised_weights(releases: dict[str, Path], tmp_path: Path) -> None:
    import gguf

    source = releases["chat-4bits"]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "q.gguf"), "-m", str(source), "--format", "gguf", "--dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    assert "Note: GGUF holds plain tensors: the GPTQ-for-LLaMa v1 (BlueLM-7B-Chat-4bits), 4-bit, group 128 weights are dequantised" in result.stderr
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    module = "model.layers.1.mlp.down_proj"
    expected = reference_weights("chat-4bits", stored(source), module)
    assert torch.equal(bits(torch.from_numpy(np.array(tensors["blk.1.ffn_down.weight"].data))), bits(expected))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cached_hub_id_of_a_release_loads_the_same_way(
    releases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    from huggingface_hub import constants

    repo_id = {"chat-4bits": "vivo-ai/BlueLM-7B-Chat-4bits", "chat-32k-awq": "vivo-ai/BlueLM-7B-Chat-32K-AWQ",
               "chat-32k-gptq": "vivo-ai/BlueLM-7B-Chat-32K-GPTQ"}[layout]
    snapshot = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(releases[layout], snapshot, ignore=shutil.ignore_patterns("*.py"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_model(repo_id, device="cpu", dtype="float32")
    assert loaded.folder == snapshot and loaded.weights_format.endswith("4-bit, group 128, dequantised to float32")
    direct = load_model(str(releases[layout]), device="cpu", dtype="float32")
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
