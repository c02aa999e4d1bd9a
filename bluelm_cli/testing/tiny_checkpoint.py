"""Build tiny BlueLM checkpoints in the published on-disk layout.

Real BlueLM weights can't be downloaded in tests or benchmarks, so this module writes small
checkpoint folders that look exactly like the published `vivo-ai/BlueLM-7B-*` repositories:
`config.json`, `generation_config.json`, a SentencePiece `tokenizer.model`, `tokenizer_config.json`,
`special_tokens_map.json`, the weights (sharded `.bin` like the 2023 releases, or safetensors) and
the shipped remote-code files. Those remote-code files are traps here: executing any of them
raises and leaves a `REMOTE_CODE_WAS_EXECUTED` marker in the folder.

The state dict is written by name (this module never imports `bluelm_cli.modeling`), so loading a
tiny checkpoint with no missing or unexpected keys proves the loader accepts the published names.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PUBLISHED_7B",
    "REMOTE_CODE_FILES",
    "REMOTE_CODE_MARKER",
    "TinySpec",
    "build_checkpoint",
    "expected_weight_names",
    "random_config",
    "random_state_dict",
    "remote_code_was_executed",
    "tokenizer_model_bytes",
    "train_tokenizer",
]

# The published BlueLM-7B shapes, for `bench --random-weights`.
PUBLISHED_7B: dict[str, int] = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=100096,
    max_position_embeddings=2048,
)

REMOTE_CODE_MARKER = "REMOTE_CODE_WAS_EXECUTED"
REMOTE_CODE_FILES = ("configuration_bluelm.py", "modeling_bluelm.py", "tokenization_bluelm.py")

HUMAN_TAG = "[|Human|]:"
AI_TAG = "[|AI|]:"

_TRANSFORMERS_VERSION = "4.34.0"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FORMATS = ("bin-sharded", "safetensors", "safetensors-sharded", "bin")


@dataclass(frozen=True)
class TinySpec:
    """Shape and file format of a tiny checkpoint. The defaults give a ~0.2M-parameter model."""

    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # None -> same as num_attention_heads (the published checkpoints); set it to exercise GQA.
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    # config vocab_size = tokenizer size rounded UP to a multiple of this, +vocab_pad_to when it
    # already is one, so the config always has padding rows like the published 100096 vs 100008.
    vocab_pad_to: int = 64
    # e.g. {"type": "ntkmixed", "factor": 4.0, "power": 0.25} for the 32K variants.
    rope_scaling: dict | None = None
    weights_format: str = "bin-sharded"  # "bin-sharded" | "safetensors" | "safetensors-sharded" | "bin"
    seed: int = 0
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    # True: the model never ends an answer by itself (the </s> and [|Human|]: rows of lm_head are zero),
    # for tests that need an answer to run on until max_new_tokens or an interruption, on any torch's numerics.
    endless: bool = False
    # True: every answer repeats the last token it was given, forever (the layers add nothing to the residual
    # stream and lm_head is the embedding matrix), for tests that need a repetitive answer, such as prompt
    # lookup's, on any torch and sentencepiece: a random model's loops depend on the trained vocabulary.
    echo: bool = False

    def __hash__(self) -> int:  # rope_scaling is a dict, so hash its JSON form
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# --------------------------------------------------------------------------------------------
# Tokenizer

# A few dozen lines of mixed Chinese / English chat, code and punctuation. Deliberately free of
# emoji and rare CJK characters (e.g. "龘") so that those fall back to <0x..> byte pieces.
_CORPUS: tuple[str, ...] = (
    "[|Human|]:你好[|AI|]:你好，有什么可以帮助你吗？",
    "[|Human|]:Hello, who are you?[|AI|]:I am BlueLM, a large language model developed by vivo AI Lab.",
    "[|Human|]:请介绍一下你自己。[|AI|]:我是蓝心大模型，由vivo AI全球研究院开发的语言模型。",
    "[|Human|]:What is the capital of France?[|AI|]:The capital of France is Paris.",
    "[|Human|]:中国的首都是哪里？[|AI|]:中国的首都是北京。",
    "[|Human|]:写一首关于春天的诗。[|AI|]:春风吹绿了江南岸，花开满山红似火。",
    "[|Human|]:Translate 'good morning' into Chinese.[|AI|]:早上好！",
    "[|Human|]:1 + 2 = ?[|AI|]:1 + 2 = 3。",
    "[|Human|]:Compute 12345 * 678.[|AI|]:12345 * 678 = 8369910.",
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们一起去公园散步吧。",
    "人工智能正在改变我们的生活和工作方式。",
    "Large language models generate text one token at a time.",
    "The key-value cache keeps attention states across turns, so each new turn is fast.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(f\"step {i}: loss={loss:.4f}\")\n",
    "import torch\nx = torch.zeros(2, 3)\nprint(x.shape)  # torch.Size([2, 3])\n",
    "if __name__ == \"__main__\":\n    main()\n",
    "class Model(nn.Module):\n    def forward(self, x):\n        return self.proj(x)\n",
    "{\"name\": \"BlueLM\", \"version\": 7, \"tags\": [\"chat\", \"base\"]}",
    "$ pip install bluelm-cli && bluelm chat --max-new-tokens 512",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `",
    "中文标点：，。；：！？“”‘’（）【】《》、……——",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2048 32768 3.14159",
    "我喜欢读书、听音乐和看电影。你呢？",
    "学习编程需要耐心和练习，不要害怕犯错。",
    "Please answer in English: 北京有哪些好玩的地方？",
    "The model runs on CPU or GPU; bf16 weights need about 14 GB of memory.",
    "上海是中国最大的城市之一，也是重要的经济中心。",
    "Thank you very much! 谢谢你的帮助。",
    "Once upon a time, there was a little robot who wanted to learn how to write poems.",
    "从前有一座山，山里有一座庙，庙里有一个老和尚在给小和尚讲故事。",
    "    indented line with  two  spaces\tand a tab",
    "Error: model folder not found. Run `bluelm download` first.",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "User: How do I reverse a list in Python?\nAssistant: Use my_list[::-1] or my_list.reverse().",
)


@functools.lru_cache(maxsize=8)
def tokenizer_model_bytes(
    vocab_size: int = 600, *, normalization_rule_name: str = "identity", remove_extra_whitespaces: bool = False
) -> bytes:
    """The serialized SentencePiece BPE model (deterministic; trained once per process).

    The default normalizer spec is the identity with spaces kept. `normalization_rule_name="nmt_nfkc"` (with
    `remove_extra_whitespaces=True`: SentencePiece's own defaults) gives a tokenizer that normalizes, for the
    tests of what a normalizing `tokenizer.model` means for the exports."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        user_defined_symbols=[HUMAN_TAG, AI_TAG],
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=remove_extra_whitespaces,
        normalization_rule_name=normalization_rule_name,
        max_sentence_length=4096,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def train_tokenizer(path: Path, vocab_size: int = 600) -> Path:
    """Write the tiny SentencePiece model to `path` (or to `path/tokenizer.model` if `path` is a
    folder) and return the file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tokenizer_model_bytes(vocab_size))
    return path


def _piece_count(model_bytes: bytes) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    return sp.get_piece_size()


def _padded_vocab(pieces: int, pad_to: int) -> int:
    if pad_to <= 0:
        return pieces
    return (pieces // pad_to + 1) * pad_to  # rounds up, and adds a full block when already a multiple


# --------------------------------------------------------------------------------------------
# Config and weights


def random_config(spec: TinySpec = TinySpec(), *, tokenizer_pieces: int | None = None) -> dict[str, Any]:
    """The `config.json` content for `spec` (vocab size derived from the tiny tokenizer unless
    `tokenizer_pieces` is given)."""
    if spec.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {spec.dtype!r}")
    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if spec.num_attention_heads % spec.kv_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if tokenizer_pieces is None:
        tokenizer_pieces = _piece_count(tokenizer_model_bytes())
    config: dict[str, Any] = {
        "architectures": ["BlueLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_bluelm.BlueLMConfig",
            "AutoModelForCausalLM": "modeling_bluelm.BlueLMForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": "BlueLM",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": spec.dtype,
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_stable_embedding": True,
        "vocab_size": _padded_vocab(tokenizer_pieces, spec.vocab_pad_to),
    }
    if spec.rope_scaling is not None:
        config["rope_scaling"] = dict(spec.rope_scaling)
    return dict(sorted(config.items()))


def expected_weight_names(num_hidden_layers: int) -> list[str]:
    """Every tensor name of a published BlueLM checkpoint, in file order."""
    names = ["model.embed_tokens.weight", "model.embed_layer_norm.weight", "model.embed_layer_norm.bias"]
    for n in range(num_hidden_layers):
        p = f"model.layers.{n}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def random_state_dict(spec: TinySpec, vocab_size: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights with non-trivial norms, in the checkpoint's dtype."""
    g = torch.Generator().manual_seed(spec.seed)
    h, ffn, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    kv = spec.kv_heads * d

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(h, std=0.1)

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(vocab_size, h, std=1.0),
        "model.embed_layer_norm.weight": norm_weight(),
        "model.embed_layer_norm.bias": normal(h, std=0.1),
    }
    for n in range(spec.num_hidden_layers):
        p = f"model.layers.{n}."
        sd[p + "self_attn.q_proj.weight"] = linear(h, h)
        sd[p + "self_attn.k_proj.weight"] = linear(kv, h)
        sd[p + "self_attn.v_proj.weight"] = linear(kv, h)
        sd[p + "self_attn.o_proj.weight"] = linear(h, h) * 0.5
        sd[p + "mlp.gate_proj.weight"] = linear(ffn, h)
        sd[p + "mlp.up_proj.weight"] = linear(ffn, h)
        sd[p + "mlp.down_proj.weight"] = linear(h, ffn) * 0.5
        sd[p + "input_layernorm.weight"] = norm_weight()
        sd[p + "post_attention_layernorm.weight"] = norm_weight()
    sd["model.norm.weight"] = norm_weight()
    # Logit std ≈ 2: a peaked but not one-hot distribution, so greedy output varies.
    sd["lm_head.weight"] = normal(vocab_size, h, std=2.0 / math.sqrt(h))
    assert list(sd) == expected_weight_names(spec.num_hidden_layers)
    dtype = _DTYPES[spec.dtype]
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _echo_last_token(weights: dict[str, torch.Tensor]) -> None:
    """Make greedy decoding repeat the last input token: zero what attention and the MLP add to the residual
    stream, so the final hidden state is the normalised embedding of the current token, and score every token
    by its embedding. A token's own score (~hidden_size) then beats any other's (~3 sqrt(hidden_size) at most
    over a few hundred Gaussian rows) by a margin no rounding can close."""
    for name, tensor in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor.zero_()
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()


def _silence_stop_tokens(weights: dict[str, torch.Tensor], model_bytes: bytes) -> None:
    """Zero the lm_head rows of the tokens that end an answer, </s> and [|Human|]:.

    Their logits are then exactly 0 whatever the hidden state, so greedy decoding could pick one only if
    every other logit were <= 0 too: all ~600 random rows inside one half-space of the hidden space, which
    for Gaussian rows in 64 dimensions has odds below 2^-300 (Wendel). The repetition penalty keeps signs.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    for token_id in (sp.eos_id(), sp.piece_to_id(HUMAN_TAG)):
        weights["lm_head.weight"][token_id] = 0


def _split_shards(names: list[str], num_layers: int) -> tuple[list[str], list[str]]:
    """Two shards like the published split: embeddings + first half of the layers, then the rest."""
    cut = (num_layers + 1) // 2
    first = [
        n for n in names
        if not n.startswith(("model.layers.", "model.norm.", "lm_head."))
        or (n.startswith("model.layers.") and int(n.split(".")[2]) < cut)
    ]
    return first, [n for n in names if n not in set(first)]


def _write_weights(folder: Path, sd: dict[str, torch.Tensor], spec: TinySpec) -> None:
    fmt = spec.weights_format
    if fmt not in _FORMATS:
        raise ValueError(f"weights_format must be one of {_FORMATS}, not {fmt!r}")
    names = list(sd)
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
        return
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards = _split_shards(names, spec.num_hidden_layers)
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard_names in enumerate(shards, start=1):
        part = {n: sd[n] for n in shard_names}
        if fmt == "bin-sharded":
            fname = f"pytorch_model-{i:05d}-of-{total:05d}.bin"
            torch.save(part, folder / fname)
        else:
            from safetensors.torch import save_file

            fname = f"model-{i:05d}-of-{total:05d}.safetensors"
            save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard_names})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    index_name = "pytorch_model.bin.index.json" if fmt == "bin-sharded" else "model.safetensors.index.json"
    _write_json(folder / index_name, index)


# --------------------------------------------------------------------------------------------
# Remote-code traps

_TRAP_TEMPLATE = '''\
# Trap written by bluelm_cli.testing.tiny_checkpoint: the published checkpoints ship this file for
# transformers' trust_remote_code. bluelm-cli must never import or execute it.
from pathlib import Path as _Path

_MARKER = {marker!r}
_FOLDERS = [_Path({folder!r})]
try:
    _FOLDERS.append(_Path(__file__).resolve().parent)
except NameError:
    pass
for _folder in _FOLDERS:
    try:
        (_folder / _MARKER).write_text({filename!r} + "\\n", encoding="utf-8")
    except OSError:
        pass
raise RuntimeError("bluelm-cli must never execute remote code from a checkpoint: {filename}")
'''


def _write_traps(folder: Path) -> None:
    for name in REMOTE_CODE_FILES:
        text = _TRAP_TEMPLATE.format(marker=REMOTE_CODE_MARKER, folder=str(folder.resolve()), filename=name)
        (folder / name).write_text(text, encoding="utf-8")


def remote_code_was_executed(folder: Path) -> bool:
    """True if one of the folder's trap files has been executed (it leaves a marker file)."""
    return (Path(folder) / REMOTE_CODE_MARKER).exists()


# --------------------------------------------------------------------------------------------
# The folder


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def build_checkpoint(folder: Path, spec: TinySpec = TinySpec(), *, tokenizer_model: Path | None = None) -> Path:
    """Write a complete tiny checkpoint into `folder` (created if needed) and return it.

    `tokenizer_model` substitutes another SentencePiece model for the built-in tiny one (the
    config's vocab_size follows its piece count)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = Path(tokenizer_model).read_bytes() if tokenizer_model is not None else tokenizer_model_bytes()
    config = random_config(spec, tokenizer_pieces=_piece_count(model_bytes))

    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
            "transformers_version": _TRANSFORMERS_VERSION,
        },
    )
    (folder / "tokenizer.model").write_bytes(model_bytes)
    factor = float((spec.rope_scaling or {}).get("factor", 1.0))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "auto_map": {"AutoTokenizer": ["tokenization_bluelm.BlueLMTokenizer", None]},
            "bos_token": _added_token("<s>"),
            "clean_up_tokenization_spaces": False,
            "eos_token": _added_token("</s>"),
            "legacy": True,
            "model_max_length": int(spec.max_position_embeddings * factor),
            "pad_token": _added_token("<pad>"),
            "sp_model_kwargs": {},
            "tokenizer_class": "BlueLMTokenizer",
            "unk_token": _added_token("<unk>"),
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    )
    weights = random_state_dict(spec, config["vocab_size"])
    if spec.echo:
        _echo_last_token(weights)
    if spec.endless:
        _silence_stop_tokens(weights, model_bytes)
    _write_weights(folder, weights, spec)
    _write_traps(folder)
    return folder
