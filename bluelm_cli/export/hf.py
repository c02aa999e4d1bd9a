"""BlueLM checkpoint → a plain Llama folder (config.json, safetensors, an exact tokenizer.json) any engine loads.

BlueLM is Llama plus a LayerNorm on the token embeddings. That LayerNorm acts on each embedding row alone,
so folding it into the table (in float32) gives a `LlamaForCausalLM` with BlueLM's logits. Rows beyond the
tokenizer's pieces are padding that our model masks; the export drops them. Tensors are read and written
one shard at a time, so host memory stays near one shard, not the model.
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.export.chat_template import HF_CHAT_TEMPLATE
from bluelm_cli.export.tokenizer_json import build_tokenizer
from bluelm_cli.modeling.weights import SourceTensors

__all__ = [
    "DTYPES",
    "SourceTensors",
    "export_hf",
    "folded_embedding",
    "llama_config",
    "llama_tensors",
    "ntkmixed_factors",
    "piece_count",
]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_BYTES = 2 * 1024**3
_EMBED, _LN_WEIGHT, _LN_BIAS, _LM_HEAD = (
    "model.embed_tokens.weight",
    "model.embed_layer_norm.weight",
    "model.embed_layer_norm.bias",
    "lm_head.weight",
)


def piece_count(tokenizer_model: Path) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()


def ntkmixed_factors(head_dim: int, factor: float, power: float) -> list[float]:
    """BlueLM's ntkmixed divisor of each RoPE frequency, exp(a·(i+1)^b) with a = ln(k)/(d/2)^b: longrope's factors."""
    a = math.log(factor) / (head_dim / 2) ** power
    return [math.exp(a * (i + 1) ** power) for i in range(head_dim // 2)]


def llama_config(source: dict[str, Any], pieces: int, dtype: str) -> dict[str, Any]:
    """config.json of the exported LlamaForCausalLM, with the rope keys each engine reads for 32K."""
    heads = int(source["num_attention_heads"])
    head_dim = int(source.get("head_dim") or int(source["hidden_size"]) // heads)
    # Published configs carry `rope_scaling`; one saved by transformers 5 (a fine-tune) carries `rope_parameters`,
    # with rope_theta inside it.
    scaling = source.get("rope_scaling") or source.get("rope_parameters") or {}
    rope_theta = float(source.get("rope_theta") or scaling.get("rope_theta") or 10000.0)
    original_positions = int(source.get("max_position_embeddings", 2048))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(source.get("bos_token_id", 1)),
        "eos_token_id": int(source.get("eos_token_id", 2)),
        "pad_token_id": int(source.get("pad_token_id", 3)),
        "head_dim": head_dim,
        "hidden_act": source.get("hidden_act", "silu"),
        "hidden_size": int(source["hidden_size"]),
        "initializer_range": float(source.get("initializer_range", 0.02)),
        "intermediate_size": int(source["intermediate_size"]),
        "max_position_embeddings": original_positions,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": int(source["num_hidden_layers"]),
        "num_key_value_heads": int(source.get("num_key_value_heads") or heads),
        "rms_norm_eps": float(source.get("rms_norm_eps", 1e-6)),
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": pieces,
    }
    scaling_type = scaling.get("type") or scaling.get("rope_type")
    if scaling_type == "ntkmixed":
        factor, power = float(scaling["factor"]), float(scaling["power"])
        factors = ntkmixed_factors(head_dim, factor, power)
        full_positions = int(original_positions * factor)
        config["rope_scaling"] = {
            "rope_type": "longrope",
            "type": "longrope",  # older readers (vLLM < 0.6, TGI) look for "type"
            "short_factor": factors,
            "long_factor": factors,
            "factor": factor,
            # transformers: no attention scaling (it would default to sqrt(1 + ln k / ln 2048)).
            "attention_factor": 1.0,
            # vLLM and SGLang ignore attention_factor and scale cos/sin by these (default 1.1677 at 16×).
            "short_mscale": 1.0,
            "long_mscale": 1.0,
            "original_max_position_embeddings": original_positions,
            "rope_theta": rope_theta,
        }
        # TGI reads the original length at the top level; vLLM sizes its cache by the full length.
        config["original_max_position_embeddings"] = original_positions
        config["max_position_embeddings"] = full_positions
    elif scaling_type not in (None, "default"):
        config["rope_scaling"] = llama_rope_scaling(scaling, rope_theta)
    return config


def llama_rope_scaling(scaling: dict[str, Any], rope_theta: float) -> dict[str, Any]:
    """A transformers RoPE type (linear, dynamic, yarn, longrope, llama3, ...) as Llama's config carries it.

    BlueLM computes these with transformers' own `ROPE_INIT_FUNCTIONS` from the same fields and the same
    `max_position_embeddings`, so they are copied unchanged; both spellings of the type are written for readers
    that look for either (vLLM and TGI read "type" or "rope_type"). A type transformers lacks is refused.
    """
    from bluelm_cli.modeling.configuration import IMPLEMENTED_ROPE_TYPES

    scaling_type = scaling.get("type") or scaling.get("rope_type")
    if scaling_type not in IMPLEMENTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {scaling_type!r}")
    rope = {key: value for key, value in scaling.items() if key not in ("type", "rope_type")}
    rope.setdefault("rope_theta", rope_theta)
    return {"rope_type": scaling_type, "type": scaling_type, **rope}


def folded_embedding(embed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(embed) row by row in float32: what BlueLM feeds layer 0, as a plain embedding table."""
    return torch.nn.functional.layer_norm(embed.float(), (embed.shape[-1],), weight.float(), bias.float(), eps)


def check_shapes(source: SourceTensors, config: dict[str, Any], folder: Path) -> None:
    """Refuse weights whose sizes or tensors are not the ones config.json describes (as loading the model does).

    The shapes expected are those of BlueLM built from the config on the meta device: the modeling code is the
    one source of what a config means."""
    from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in BlueLMForCausalLM(BlueLMConfig(**config)).state_dict().items()}
    names = source.names()
    wrong = [name for name in names if name in expected and source.shape(name) != expected[name]]
    missing = [name for name in expected if name not in names]
    # Layers past the config's count, say: a rotary table some checkpoints store is the only other thing allowed.
    extra = [name for name in names if name not in expected and not name.endswith("rotary_emb.inv_freq")]
    if wrong or missing or extra:
        if wrong:
            what = f"{wrong[0]} is {list(source.shape(wrong[0]))}, the config says {list(expected[wrong[0]])}"
        else:
            what = f"{missing[0]} is missing" if missing else f"{extra[0]} is not in a model of that config"
        raise BlueLMError(
            f"the weights in {folder} do not have the sizes its config.json describes ({what}); "
            "export a checkpoint whose config.json came with its weights"
        )


def open_weights(folder: Path, source_config: dict[str, Any]) -> Any:
    """The checkpoint's tensors as a plain BlueLM's: a quantized release's linears dequantised (exactly, in float32,
    as its publisher's kernel computes them), everything else as stored."""
    from bluelm_cli.modeling.quantized import QuantizedTensors, UnsupportedQuantization, detect_layout

    try:
        layout = detect_layout(source_config, folder)
        return QuantizedTensors(SourceTensors(folder), layout) if layout is not None else SourceTensors(folder)
    except UnsupportedQuantization as error:
        raise BlueLMError(f"{folder} has a quantization bluelm-cli cannot read: {error}") from None


def repack_problem(tensors: Any) -> str | None:
    """Why a quantized release's 4-bit tensors can't go to the Llama export as they are (None: they can, exactly).

    AWQ GEMM is read by vLLM's AWQ kernels exactly as AutoAWQ wrote it. AutoGPTQ v1 is read with the same +1 per
    nibble; vLLM's Marlin kernels take a symmetric checkpoint's zero as 8, so every stored nibble must be 7.
    Chat-4bits' float32 scales would be rounded to fp16 by vLLM, and its kernel's fused arithmetic is its own."""
    layout = tensors.layout
    if layout.kind == "gptq-for-llama":
        return ("BlueLM-7B-Chat-4bits keeps float32 scales, which vLLM's GPTQ kernels would round to fp16, "
                "so its linears are written dequantised")
    if layout.kind == "gptq":
        if not layout.zero_offset:
            return "GPTQ v2 checkpoints are not what vLLM's GPTQ loader reads, so the linears are written dequantised"
        for module in tensors.modules:
            source = tensors.source
            if module + ".bias" in source.names() and bool(source.get(module + ".bias").ne(0).any()):
                return f"{module} has a non-zero bias, which a Llama layer has no place for"
            if layout.symmetric and not bool((source.get(module + ".qzeros") == 0x77777777).all()):
                return (f"{module} has zero points other than 8 in a symmetric GPTQ checkpoint, which vLLM would read as 8, "
                        "so the linears are written dequantised")
    return None


def quantized_tensors(
    tensors: Any, config: dict[str, Any], pieces: int, dtype: torch.dtype
) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """As llama_tensors, but each quantized linear as its stored 4-bit parts (qweight, qzeros, scales, g_idx), unchanged."""
    source = tensors.source
    stored = set(source.names())
    for name, make, shape in llama_tensors(tensors, config, pieces, dtype):
        if not tensors.is_quantized(name):
            yield name, make, shape
            continue
        module = name.removesuffix(".weight")
        for part in ("qweight", "qzeros", "scales", "g_idx"):  # a bias (checked zero) has no place in Llama
            if f"{module}.{part}" in stored:
                yield f"{module}.{part}", (lambda part_name=f"{module}.{part}": source.get(part_name).contiguous()), source.shape(f"{module}.{part}")


def llama_tensors(
    source: SourceTensors, config: dict[str, Any], pieces: int, dtype: torch.dtype
) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(Llama name, a function producing the tensor, its shape) in checkpoint order, without loading any yet."""
    eps = float(config.get("rms_norm_eps", 1e-6))
    has_layer_norm = config.get("use_stable_embedding", True) and _LN_WEIGHT in source.names()
    for name in source.names():
        if name in (_LN_WEIGHT, _LN_BIAS):
            continue
        shape = source.shape(name)
        if name == _EMBED:
            def make(name: str = name) -> torch.Tensor:
                table = source.get(name)[:pieces]
                if has_layer_norm:
                    table = folded_embedding(table, source.get(_LN_WEIGHT), source.get(_LN_BIAS), eps)
                return table.to(dtype).contiguous()
            yield name, make, (pieces, *shape[1:])
        elif name == _LM_HEAD:
            yield name, (lambda name=name: source.get(name)[:pieces].to(dtype).contiguous()), (pieces, *shape[1:])
        else:
            yield name, (lambda name=name: source.get(name).to(dtype).contiguous()), shape


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    files: list[str]
    tensors: int
    total_bytes: int


def export_hf(
    folder: Path,
    out: Path,
    *,
    dtype: str = "auto",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_status: Callable[[str], None] | None = None,
    dequantize: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Write the Llama folder for the BlueLM checkpoint in `folder` into `out` (which must be empty or absent).

    A quantized release keeps its 4-bit linears (AWQ or GPTQ, for vLLM's kernels) where that is exact, unless
    `dequantize`; otherwise they are written dequantised in `dtype`, and `on_note` says so."""
    from safetensors.torch import save_file

    source_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype_name = resolve_dtype(dtype, source_config)
    torch_dtype = DTYPES[dtype_name]
    pieces = piece_count(folder / "tokenizer.model")
    config = llama_config(source_config, pieces, dtype_name)
    out.mkdir(parents=True, exist_ok=True)

    tensors_in = open_weights(folder, source_config)
    check_shapes(tensors_in, source_config, folder)
    layout = getattr(tensors_in, "layout", None)
    quantization: dict[str, Any] | None = None
    if layout is not None:
        problem = "--dequantize was given" if dequantize else repack_problem(tensors_in)
        if problem is None:
            quantization = _quantization_config(folder, source_config)
            config["quantization_config"] = quantization
            plan = list(quantized_tensors(tensors_in, source_config, pieces, torch_dtype))
        else:
            plan = list(llama_tensors(tensors_in, source_config, pieces, torch_dtype))
            if on_note:
                on_note(f"{problem}: the {tensors_in.describe()} weights are dequantised as its kernel computes them "
                        f"and written as {dtype_name}" + ("" if dtype_name == "float32" else " (--dtype float32 keeps them exact)"))
    else:
        plan = list(llama_tensors(tensors_in, source_config, pieces, torch_dtype))
    element = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for name, make, shape in plan:
        nbytes = math.prod(shape) * (4 if name.endswith((".qweight", ".qzeros", ".g_idx")) else element)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
    total = len(shards)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    files: list[str] = []
    for number, shard in enumerate(shards, start=1):
        file_name = "model.safetensors" if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
        if on_status:
            on_status(f"Writing {file_name}")
        tensors = {name: make() for name, make in shard}
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: file_name for name, _ in shard})
        files.append(file_name)
    if total > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
        files.append("model.safetensors.index.json")
    files += _write_side_files(folder, out, config, source_config)
    if quantization is not None and quantization.get("quant_method") == "gptq":
        _write_json(out / "quantize_config.json", {k: v for k, v in quantization.items() if k != "quant_method"})
        files.append("quantize_config.json")
    # safetensors creates its files 0600; servers often read the weights as another user, so they get the mode
    # every other file got from the umask.
    mode = stat.S_IMODE((out / "config.json").stat().st_mode)
    for file_name in files:
        if file_name.endswith(".safetensors"):
            (out / file_name).chmod(mode)
    return ExportSummary(out=out, files=sorted(files), tensors=len(plan), total_bytes=total_bytes)


def _quantization_config(folder: Path, source_config: dict[str, Any]) -> dict[str, Any]:
    """The release's quantization_config as vLLM and transformers read it (GPTQ: from quantize_config.json if need be)."""
    quantization = source_config.get("quantization_config")
    if not isinstance(quantization, dict):
        quantization = {**json.loads((folder / "quantize_config.json").read_text(encoding="utf-8")), "quant_method": "gptq"}
    return dict(quantization)


def resolve_dtype(dtype: str, source_config: dict[str, Any]) -> str:
    if dtype == "auto":
        dtype = str(source_config.get("torch_dtype") or source_config.get("dtype") or "bfloat16")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use auto, bfloat16, float16 or float32")
    return dtype


def _write_side_files(folder: Path, out: Path, config: dict[str, Any], source_config: dict[str, Any]) -> list[str]:
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(folder, config))
    build_tokenizer(folder / "tokenizer.model").save(str(out / "tokenizer.json"))
    (out / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    context = int(config["max_position_embeddings"])
    _write_json(out / "tokenizer_config.json", tokenizer_config(context))
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    )
    (out / "README.md").write_text(_readme(folder, source_config, config), encoding="utf-8")
    return [
        "README.md", "config.json", "generation_config.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    ]


def tokenizer_config(context: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": HF_CHAT_TEMPLATE,
    }


def _generation_config(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    path = folder / "generation_config.json"
    source = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = {k: v for k, v in source.items() if not k.startswith("_") and k != "transformers_version"}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kept.setdefault(key, config[key])
    return dict(sorted(kept.items()))


def _readme(folder: Path, source_config: dict[str, Any], config: dict[str, Any]) -> str:
    from bluelm_cli import __version__

    rope = "longrope parameters reproducing BlueLM's ntkmixed RoPE" if "rope_scaling" in config else "plain RoPE"
    quantization = config.get("quantization_config")
    if quantization:
        weights = (f"- The linear layers keep the release's 4-bit {str(quantization.get('quant_method')).upper()} tensors "
                   "bit for bit (vLLM serves them with its own kernels).\n")
    elif "quantization_config" in source_config or "quantization_bit" in source_config:
        weights = (f"- The release's 4-bit linear layers are dequantised (as its publisher's kernel computes them) "
                   f"to {config['torch_dtype']}.\n")
    else:
        weights = ""
    return (
        f"# {folder.name} as plain Llama\n\n"
        f"Exported by bluelm-cli {__version__} (`bluelm export`) from the BlueLM checkpoint `{folder.name}`.\n\n"
        "- `LlamaForCausalLM`, no remote code: BlueLM's embedding LayerNorm is folded into `embed_tokens` "
        "(computed in float32), and the padding rows beyond the tokenizer's "
        f"{config['vocab_size']} pieces are dropped (the checkpoint had {source_config.get('vocab_size')}).\n"
        f"- {rope}; context {config['max_position_embeddings']} tokens.\n"
        f"{weights}"
        "- `tokenizer.json` gives SentencePiece's ids (`[|Human|]:`/`[|AI|]:` single pieces); the chat template "
        "builds `<s>{system}[|Human|]:{user}[|AI|]:{answer}</s>[|Human|]:…[|AI|]:`.\n\n"
        "The weights and their license are the original checkpoint's (vivo-ai BlueLM).\n"
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
