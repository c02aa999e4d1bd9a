"""`bluelm export`: the exported Llama folder and GGUF reproduce BlueLM (logits, greedy text, token ids, chat prompts)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import NTK
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.export.chat_template import GGUF_CHAT_TEMPLATE
from bluelm_cli.export.gguf_file import interleave_rope_rows
from bluelm_cli.export.hf import export_hf, folded_embedding, ntkmixed_factors
from bluelm_cli.export.tokenizer_json import unreachable_pieces
from bluelm_cli.local.loading import load_model
from bluelm_cli.local.engine import TokenizerEncoder
from bluelm_cli.core.prompt import HistoryTurn, build_prompt_ids
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint
from bluelm_cli.core.prompt import AI_TAG, HUMAN_TAG

# llama.cpp (llama-cpp-python 0.3.36) with a float32 KV cache: measured ≤ 1.0e-5 (scripts/verify_gguf_llamacpp.py).
LLAMA_CPP_LOGIT_TOLERANCE = 5e-5
SPECS = {
    "2k": TinySpec(weights_format="bin-sharded", seed=5),
    "32k": TinySpec(rope_scaling=NTK, num_attention_heads=8, num_key_value_heads=2, weights_format="safetensors", seed=6),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(BlueLM checkpoint, its float32 HF export; sharded small to exercise the index) per spec."""
    root = tmp_path_factory.mktemp("export")
    pairs = {}
    for name, spec in SPECS.items():
        source = build_checkpoint(root / f"src-{name}", spec)
        out = root / f"hf-{name}"
        export_hf(source, out, dtype="float32", shard_bytes=60_000)
        pairs[name] = (source, out)
    return pairs


def _sentencepiece(folder: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name", list(SPECS))
def test_llama_export_reproduces_bluelm_logits_and_greedy_text(exported, name: str) -> None:
    from transformers import LlamaForCausalLM

    source, out = exported[name]
    ours = load_model(str(source), device="cpu", dtype="float32").model
    llama = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    pieces = _sentencepiece(source).get_piece_size()
    assert llama.config.vocab_size == pieces
    ids = torch.randint(4, pieces, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids).logits[..., :pieces]
        got = llama(ids).logits
    assert (expected - got).abs().max().item() <= 1e-5
    prompt = ids[:1, :12]
    with torch.no_grad():
        ours_text = ours.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=3, eos_token_id=None)
        llama_text = llama.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=3, eos_token_id=None)
    assert ours_text.tolist() == llama_text.tolist()


def test_32k_longrope_matches_ntkmixed_past_position_32000(exported) -> None:
    from transformers import LlamaForCausalLM

    source, out = exported["32k"]
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_scaling"]
    assert config["max_position_embeddings"] == 32768 and config["original_max_position_embeddings"] == 2048
    assert rope["rope_type"] == "longrope" and rope["short_factor"] == rope["long_factor"]
    assert (rope["attention_factor"], rope["short_mscale"], rope["long_mscale"]) == (1.0, 1.0, 1.0)
    assert rope["original_max_position_embeddings"] == 2048
    ours = load_model(str(source), device="cpu", dtype="float32").model
    llama = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    pieces = llama.config.vocab_size
    # Positions 32,000…32,015 through position_ids: the frequencies that matter only at long range.
    ids = torch.randint(4, pieces, (1, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(32000, 32016)[None]
    with torch.no_grad():
        expected = ours(ids, position_ids=positions).logits[..., :pieces]
        got = llama(ids, position_ids=positions).logits
    # Measured 1.9e-5 (logits of magnitude ~3): the two compute each float32 inverse frequency in a
    # different order (ours base^-x / f, transformers' 1 / (f * base^x)), and at position 32,000 one ulp
    # of a frequency moves the angle visibly. Below position 48 the difference is within 1e-5.
    assert (expected - got).abs().max().item() <= 5e-5


def test_folding_is_the_embedding_layer_norm_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    embed, weight, bias = torch.randn(10, 16, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)
    norm = torch.nn.LayerNorm(16, eps=1e-6)
    norm.weight.data, norm.bias.data = weight, bias
    assert torch.equal(folded_embedding(embed, weight, bias, 1e-6), norm(embed))
    assert torch.equal(folded_embedding(embed[3:4], weight, bias, 1e-6)[0], norm(embed)[3])


def test_export_writes_a_plain_llama_folder_with_no_python(exported) -> None:
    source, out = exported["2k"]
    files = sorted(p.name for p in out.iterdir())
    assert not [f for f in files if f.endswith(".py")]
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
            "special_tokens_map.json", "README.md"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config and "rope_scaling" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.embed_layer_norm.weight" not in index["weight_map"]
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()


# ----------------------------------------------------------------------------------------- tokenizer
_ALPHABET = list("abcxyzABC 019 你好中国的是 \t\n.,，。!?[]|:<>/😀龘é\u3000") + [
    HUMAN_TAG, AI_TAG, "  ", "Hello", "the", "▁", "[|AI|", "Human", "春眠不觉晓", "def f(x):\n    return x",
]


def _random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("name", list(SPECS))
def test_auto_tokenizer_gives_sentencepiece_ids(exported, name: str) -> None:
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    source, out = exported[name]
    sp = _sentencepiece(source)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(tokenizer, TokenizersBackend)  # the fast tokenizer, which `transformers serve` needs to stream
    from bluelm_cli.testing.tiny_checkpoint import _CORPUS

    strings = _random_strings(3000, seed=len(name)) + list(_CORPUS) + ["", " ", "  lead", "trail  ", "\n\n"]
    mismatches = [s for s in strings if tokenizer(s).input_ids != [1] + sp.encode(s)]
    assert mismatches == []
    decoded = [s for s in strings if tokenizer.decode(tokenizer(s).input_ids, skip_special_tokens=True) != sp.decode(sp.encode(s))]
    assert decoded == []


def test_no_piece_is_looked_up_differently_than_sentencepiece_merges_it(exported) -> None:
    source, _ = exported["2k"]
    assert unreachable_pieces(source / "tokenizer.model") == []


def _conversations(rng: random.Random) -> list[tuple[str | None, list[tuple[str, str]], str]]:
    texts = ["你好", "Hello, who are you?", " leading space", "两个  空格", "[|AI|]: inside", "emoji 😀", "code:\n    x = 1"]
    conversations = []
    for _ in range(60):
        system = rng.choice([None, "你是一个简洁的助手。", "Be brief."])
        history = [(rng.choice(texts), rng.choice(texts)) for _ in range(rng.randint(0, 3))]
        conversations.append((system, history, rng.choice(texts)))
    return conversations


@pytest.mark.parametrize("name", list(SPECS))
def test_chat_template_gives_the_ids_our_engine_builds(exported, name: str) -> None:
    from transformers import AutoTokenizer

    source, out = exported[name]
    sp = _sentencepiece(source)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for system, history, message in _conversations(random.Random(0)):
        # An answer's ids as the model generates them after "[|AI|]:" (the tag is atomic, so this is the
        # answer tokenized in place, with no dummy prefix of its own).
        turns = [HistoryTurn(user=u, answer_ids=sp.encode(AI_TAG + a)[2:]) for u, a in history]
        engine_ids = build_prompt_ids(TokenizerEncoder(sp.encode, 1, 2, sp.decode, sp.get_piece_size()), system, turns, message).ids
        messages = ([{"role": "system", "content": system}] if system else [])
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": message})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<s>") and rendered.endswith(AI_TAG)
        template_ids = tokenizer(rendered, add_special_tokens=False).input_ids
        assert template_ids == engine_ids, (system, history, message)


# ----------------------------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("name", list(SPECS))
def test_gguf_reads_back_with_expected_tensors_and_metadata(exported, tmp_path: Path, name: str) -> None:
    import gguf

    source, hf_out = exported[name]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.gguf"), "-m", str(source), "--format", "gguf", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}
    spec = SPECS[name]
    sp = _sentencepiece(source)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == spec.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == spec.kv_heads
    assert fields["llama.context_length"] == (32768 if spec.rope_scaling else 2048)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = fields["tokenizer.ggml.token_type"]
    assert [types[sp.piece_to_id(t)] for t in (HUMAN_TAG, AI_TAG)] == [4, 4]  # USER_DEFINED: cut out whole
    assert types[1] == types[2] == 3 and types[sp.piece_to_id("<0xE4>")] == 6
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.chat_template"] == GGUF_CHAT_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{n}.{p}.weight" for n in range(spec.num_hidden_layers)
        for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")
    }
    if spec.rope_scaling:
        expected.add("rope_freqs.weight")
        freqs = np.asarray(tensors["rope_freqs.weight"].data)
        assert np.allclose(freqs, ntkmixed_factors(spec.head_dim, NTK["factor"], NTK["power"]), rtol=1e-6)
    assert set(tensors) == expected
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in hf_out.glob("model*.safetensors"):
        weights.update(load_file(shard))
    embd = torch.from_numpy(np.array(tensors["token_embd.weight"].data))
    assert torch.equal(embd, weights["model.embed_tokens.weight"])
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data))
    k = torch.from_numpy(np.array(tensors["blk.0.attn_k.weight"].data))
    assert torch.equal(q, interleave_rope_rows(weights["model.layers.0.self_attn.q_proj.weight"], spec.num_attention_heads))
    assert torch.equal(k, interleave_rope_rows(weights["model.layers.0.self_attn.k_proj.weight"], spec.kv_heads))


def test_gguf_bfloat16_holds_the_rounded_weights(exported, tmp_path: Path) -> None:
    import gguf

    source, hf_out = exported["2k"]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "b.gguf"), "-m", str(source), "--format", "gguf", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in hf_out.glob("model*.safetensors"):
        weights.update(load_file(shard))
    raw = torch.from_numpy(np.array(tensors["output.weight"].data).view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(raw.reshape(weights["lm_head.weight"].shape), weights["lm_head.weight"].to(torch.bfloat16))


# ------------------------------------------------------------------------------ llama.cpp (optional)
@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(SPECS))
def test_llama_cpp_gives_bluelm_logits_and_chat_prompt_ids(exported, tmp_path: Path, name: str) -> None:
    """llama.cpp itself on the GGUF; needs llama-cpp-python, which compiles from source and is no test
    dependency: skipped without it (scripts/verify_gguf_llamacpp.py prints the full comparison)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source, _ = exported[name]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.gguf"), "-m", str(source), "--format", "gguf", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    sp = _sentencepiece(source)
    pieces = sp.get_piece_size()
    # A float32 KV cache (GGML_TYPE_F32 = 0) without flash attention: llama.cpp's default float16 cache alone
    # moves logits by up to 1.6e-3, which would hide what the export does.
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=512, logits_all=True, verbose=False,
                          type_k=0, type_v=0, flash_attn=False)
    ids = [1] + torch.randint(4, pieces, (255,), generator=torch.Generator().manual_seed(3)).tolist()
    llm.eval(ids)
    ours = load_model(str(source), device="cpu", dtype="float32").model
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0, :, :pieces].numpy()
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - expected).max() <= LLAMA_CPP_LOGIT_TOLERANCE

    template = llm.metadata["tokenizer.chat_template"]
    for system, history, message in _conversations(random.Random(1)):
        turns = [HistoryTurn(user=u, answer_ids=sp.encode(AI_TAG + a)[2:]) for u, a in history]
        engine_ids = build_prompt_ids(TokenizerEncoder(sp.encode, 1, 2, sp.decode, pieces), system, turns, message).ids
        messages = ([{"role": "system", "content": system}] if system else [])
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": message})
        text = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
        # llama-cpp-python's chat handler adds no BOS to a template's prompt; llama-server strips the
        # template's BOS text and adds the token (common/chat.cpp). Both parse special tokens.
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == engine_ids, (system, history, message)
        assert llm.tokenize(text.removeprefix("<s>").encode(), add_bos=True, special=True) == engine_ids


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_export_hf_output_and_default_dtype(exported, tmp_path: Path) -> None:
    source, _ = exported["2k"]
    out = tmp_path / "BlueLM-llama"
    result = CliRunner().invoke(app, ["export", str(out), "--model", str(source)])
    assert result.exit_code == 0
    assert result.stdout == f"Exported {source} to {out} (hf)\n"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # the checkpoint's


def test_cli_export_errors_are_one_line(exported, tmp_path: Path) -> None:
    source, hf_out = exported["2k"]
    runner = CliRunner()
    missing = tmp_path / "nope"
    cases = [
        (["export", str(tmp_path / "o"), "-m", str(missing)], 1,
         f"Error: model folder {missing} does not exist; pass an existing folder or a hub id such as vivo-ai/BlueLM-7B-Chat\n"),
        (["export", str(hf_out), "-m", str(source)], 1,
         f"Error: {hf_out} already exists and is not an empty folder; choose a new OUT folder\n"),
        (["export", str(tmp_path / "o"), "-m", str(source), "--format", "onnx"], 2,
         "Error: unknown format 'onnx'; use hf or gguf\n"),
        (["export", str(tmp_path / "o"), "-m", str(source), "--dtype", "int8"], 2,
         "Error: unknown dtype 'int8'; use auto, bfloat16, float16 or float32\n"),
        (["export", str(hf_out / "config.json"), "-m", str(source), "--format", "gguf"], 1,
         f"Error: {hf_out / 'config.json'} already exists; choose a new OUT file name (e.g. BlueLM-7B-Chat.gguf)\n"),
    ]
    for args, status, message in cases:
        result = runner.invoke(app, args)
        assert (result.exit_code, result.stdout, result.stderr) == (status, "", message)
    assert not (tmp_path / "o").exists()


def test_export_into_an_existing_empty_folder(exported, tmp_path: Path) -> None:
    source, _ = exported["2k"]
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "empty"), "-m", str(source)])
    assert result.exit_code == 0 and (tmp_path / "empty" / "tokenizer.json").is_file()


@pytest.mark.parametrize(("weights_format", "out_name"), [("safetensors-sharded", "out.gguf"), ("bin-sharded", "out")])
def test_a_damaged_weight_file_is_named_not_blamed_on_the_disk(tmp_path: Path, weights_format: str, out_name: str) -> None:
    # A truncated shard said "cannot write OUT (Error while deserializing header…); free some space", or
    # "RuntimeError: PytorchStreamReader failed…": as `bluelm ask` does, name the file and what to do.
    folder = build_checkpoint(tmp_path / "ckpt", TinySpec(weights_format=weights_format))
    shard = sorted(path for path in folder.iterdir() if path.name.endswith((".safetensors", ".bin")))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = CliRunner().invoke(app, ["export", str(tmp_path / out_name), "--model", str(folder)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {shard} is damaged (truncated or not a weights file); download the checkpoint again\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]  # nothing half-written is left

