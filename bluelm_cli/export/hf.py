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
    rope_theta = float(source.get("rope_theta", 10000.0))
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
    scaling = source.get("rope_scaling") or {}
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
        raise ValueError(f"unsupported rope scaling type {scaling_type!r} (BlueLM uses 'ntkmixed')")
    return config


class SourceTensors:
    """The checkpoint's tensors by name, read lazily: safetensors through safe_open, .bin through mmap,
    keeping at most one .bin shard mapped at a time."""

    def __init__(self, folder: Path) -> None:
        from bluelm_cli.local.loading import WEIGHT_FILES, WEIGHT_INDEXES

        self._open_path: Path | None = None
        self._open: Any = None
        self._file_of: dict[str, Path] = {}
        for index_name in WEIGHT_INDEXES:
            index = folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._file_of.update({name: folder / file for name, file in weight_map.items()})
                break
        else:
            single = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
            if single is None:
                raise FileNotFoundError(f"no weights in {folder}")
            for name in self._names_in(single):
                self._file_of[name] = single

    def _names_in(self, path: Path) -> list[str]:
        return list(self._load(path).keys())

    def _load(self, path: Path) -> Any:
        if path != self._open_path:
            self._open = None  # drop the previous shard's mapping first
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open = safe_open(str(path), framework="pt")
            else:
                self._open = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._open_path = path
        return self._open

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        opened = self._load(self._file_of[name])
        return opened.get_tensor(name) if hasattr(opened, "get_tensor") else opened[name]

    def shape(self, name: str) -> tuple[int, ...]:
        opened = self._load(self._file_of[name])
        if hasattr(opened, "get_slice"):
            return tuple(opened.get_slice(name).get_shape())
        return tuple(opened[name].shape)


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
) -> ExportSummary:
    """Write the Llama folder for the BlueLM checkpoint in `folder` into `out` (which must be empty or absent)."""
    from safetensors.torch import save_file

    source_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype_name = resolve_dtype(dtype, source_config)
    torch_dtype = DTYPES[dtype_name]
    pieces = piece_count(folder / "tokenizer.model")
    config = llama_config(source_config, pieces, dtype_name)
    out.mkdir(parents=True, exist_ok=True)

    tensors_in = SourceTensors(folder)
    check_shapes(tensors_in, source_config, folder)
    plan = list(llama_tensors(tensors_in, source_config, pieces, torch_dtype))
    element = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for name, make, shape in plan:
        nbytes = math.prod(shape) * element
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
    # safetensors creates its files 0600; servers often read the weights as another user, so they get the mode
    # every other file got from the umask.
    mode = stat.S_IMODE((out / "config.json").stat().st_mode)
    for file_name in files:
        if file_name.endswith(".safetensors"):
            (out / file_name).chmod(mode)
    return ExportSummary(out=out, files=sorted(files), tensors=len(plan), total_bytes=total_bytes)


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
    return (
        f"# {folder.name} as plain Llama\n\n"
        f"Exported by bluelm-cli {__version__} (`bluelm export`) from the BlueLM checkpoint `{folder.name}`.\n\n"
        "- `LlamaForCausalLM`, no remote code: BlueLM's embedding LayerNorm is folded into `embed_tokens` "
        "(computed in float32), and the padding rows beyond the tokenizer's "
        f"{config['vocab_size']} pieces are dropped (the checkpoint had {source_config.get('vocab_size')}).\n"
        f"- {rope}; context {config['max_position_embeddings']} tokens.\n"
        "- `tokenizer.json` gives SentencePiece's ids (`[|Human|]:`/`[|AI|]:` single pieces); the chat template "
        "builds `<s>{system}[|Human|]:{user}[|AI|]:{answer}</s>[|Human|]:…[|AI|]:`.\n\n"
        "The weights and their license are the original checkpoint's (vivo-ai BlueLM).\n"
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
