"""The tiny-checkpoint builder and the reference implementation that the other tests trust."""

from __future__ import annotations

import ast
import json
import math
import runpy
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from bluelm_cli.testing import tiny_checkpoint as tc
from bluelm_cli.testing.tiny_checkpoint import (
    PUBLISHED_7B,
    REMOTE_CODE_FILES,
    REMOTE_CODE_MARKER,
    TinySpec,
    build_checkpoint,
    random_config,
    remote_code_was_executed,
    train_tokenizer,
)
from reference_bluelm import load_config, load_state_dict, reference_greedy, reference_inv_freq, reference_logits

NTK = {"type": "ntkmixed", "factor": 4.0, "power": 0.25}
FORMATS = ["bin-sharded", "safetensors", "safetensors-sharded", "bin"]
WEIGHT_FILES = {
    "bin-sharded": {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"},
    "safetensors": {"model.safetensors"},
    "safetensors-sharded": {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    },
    "bin": {"pytorch_model.bin"},
}
COMMON_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    *REMOTE_CODE_FILES,
}


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    path = train_tokenizer(tmp_path_factory.mktemp("tok"))
    assert path.name == "tokenizer.model"
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "BlueLM-tiny")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _expected_names(layers: int) -> set[str]:
    names = {"model.embed_tokens.weight", "model.embed_layer_norm.weight", "model.embed_layer_norm.bias"}
    names |= {"model.norm.weight", "lm_head.weight"}
    for n in range(layers):
        names |= {f"model.layers.{n}.self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {f"model.layers.{n}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {f"model.layers.{n}.input_layernorm.weight", f"model.layers.{n}.post_attention_layernorm.weight"}
    return names


# ---------------------------------------------------------------------------- tokenizer


def test_special_ids(sp: spm.SentencePieceProcessor) -> None:
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert 550 <= sp.get_piece_size() <= 600


@pytest.mark.parametrize("tag", ["[|Human|]:", "[|AI|]:"])
def test_chat_tags_are_single_pieces(sp: spm.SentencePieceProcessor, tag: str) -> None:
    tag_id = sp.piece_to_id(tag)
    assert tag_id not in (sp.unk_id(), 0) and sp.is_unknown(tag_id) is False
    # Mid-text, the tag is exactly one piece.
    pieces = sp.encode(f"你好{tag}hello", out_type=str)
    assert pieces.count(tag) == 1 and not any(tag in p and p != tag for p in pieces)
    # At the start of a text the dummy prefix adds a lone "▁" before it (Llama-like behaviour).
    assert [p for p in sp.encode(tag, out_type=str) if p != "▁"] == [tag]
    assert sp.decode(sp.encode(f"{tag}x")) == f"{tag}x"


@pytest.mark.parametrize("text", ["😀", "龘"])
def test_rare_characters_use_byte_fallback(sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = sp.encode(text)
    byte_ids = [i for i in ids if sp.is_byte(i)]
    assert len(byte_ids) == len(text.encode("utf-8"))
    assert [sp.id_to_piece(i) for i in byte_ids] == [f"<0x{b:02X}>" for b in text.encode("utf-8")]
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_tokenizer_round_trips_mixed_text(sp: spm.SentencePieceProcessor) -> None:
    text = "[|Human|]:写一个函数 def f(x):\n    return x  # 注释 😀[|AI|]:好的！"
    assert sp.decode(sp.encode(text)) == text
    assert sp.encode("12345", out_type=str)[-5:] == list("12345")  # split_digits


def test_tokenizer_is_deterministic() -> None:
    assert tc.tokenizer_model_bytes.__wrapped__(600) == tc.tokenizer_model_bytes(600)


# ---------------------------------------------------------------------------- files


def test_files_and_json(ckpt: Path, sp: spm.SentencePieceProcessor) -> None:
    assert {p.name for p in ckpt.iterdir()} == COMMON_FILES | WEIGHT_FILES["bin-sharded"]
    cfg = _json(ckpt / "config.json")
    assert cfg["model_type"] == "BlueLM"
    assert cfg["architectures"] == ["BlueLMForCausalLM"]
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_bluelm.BlueLMConfig",
        "AutoModelForCausalLM": "modeling_bluelm.BlueLMForCausalLM",
    }
    expected = dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=2048, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
        pad_token_id=3, bos_token_id=1, eos_token_id=2, use_stable_embedding=True, tie_word_embeddings=False,
        use_cache=True, torch_dtype="float32", transformers_version="4.34.0",
    )  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    assert "rope_scaling" not in cfg
    # Padding rows like the published 100096 vs 100008.
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] > sp.get_piece_size()
    assert cfg["vocab_size"] - sp.get_piece_size() <= 64
    assert random_config(TinySpec()) == cfg

    assert _json(ckpt / "generation_config.json") == {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "transformers_version": "4.34.0",
    }  # fmt: skip
    tok = _json(ckpt / "tokenizer_config.json")
    assert tok["tokenizer_class"] == "BlueLMTokenizer"
    assert tok["auto_map"] == {"AutoTokenizer": ["tokenization_bluelm.BlueLMTokenizer", None]}
    assert tok["add_bos_token"] is True and tok["add_eos_token"] is False and tok["legacy"] is True
    assert tok["model_max_length"] == 2048
    assert {k: tok[f"{k}_token"]["content"] for k in ("bos", "eos", "unk", "pad")} == {
        "bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>",
    }  # fmt: skip
    assert _json(ckpt / "special_tokens_map.json") == {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    }  # fmt: skip
    assert (ckpt / "tokenizer.model").read_bytes() == tc.tokenizer_model_bytes()


def test_vocab_padding_rule() -> None:
    assert random_config(TinySpec(), tokenizer_pieces=600)["vocab_size"] == 640
    assert random_config(TinySpec(), tokenizer_pieces=640)["vocab_size"] == 704  # already a multiple: +64
    assert random_config(TinySpec(vocab_pad_to=128), tokenizer_pieces=100008)["vocab_size"] == 100096


def test_rope_scaling_in_config(tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / "c", TinySpec(rope_scaling=NTK, weights_format="safetensors"))
    assert _json(folder / "config.json")["rope_scaling"] == NTK
    assert _json(folder / "tokenizer_config.json")["model_max_length"] == 4 * 2048


def test_published_shapes() -> None:
    assert PUBLISHED_7B["vocab_size"] == 100096 and PUBLISHED_7B["hidden_size"] == 4096
    assert PUBLISHED_7B["num_hidden_layers"] == 32 and PUBLISHED_7B["num_key_value_heads"] == 32


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_formats_and_names(tmp_path: Path, fmt: str) -> None:
    spec = TinySpec(weights_format=fmt, num_key_value_heads=2, num_hidden_layers=3)
    folder = build_checkpoint(tmp_path / fmt, spec)
    assert {p.name for p in folder.iterdir()} == COMMON_FILES | WEIGHT_FILES[fmt]
    sd = load_state_dict(folder)
    assert set(sd) == _expected_names(3)
    vocab = _json(folder / "config.json")["vocab_size"]
    assert sd["model.embed_tokens.weight"].shape == (vocab, 64)
    assert sd["lm_head.weight"].shape == (vocab, 64)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert sd["model.layers.2.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.1.self_attn.v_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (172, 64)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 172)
    assert sd["model.embed_layer_norm.bias"].shape == (64,)
    # Non-trivial norms and biases.
    for name in ("model.embed_layer_norm.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert 0.02 < (sd[name] - 1).std() < 0.3
    assert 0.02 < sd["model.embed_layer_norm.bias"].std() < 0.3
    assert sd["lm_head.weight"].abs().sum() > 0 and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


@pytest.mark.parametrize("fmt", ["bin-sharded", "safetensors-sharded"])
def test_sharded_index_covers_every_weight(tmp_path: Path, fmt: str) -> None:
    folder = build_checkpoint(tmp_path / fmt, TinySpec(weights_format=fmt))
    index_name = "pytorch_model.bin.index.json" if fmt == "bin-sharded" else "model.safetensors.index.json"
    index = _json(folder / index_name)
    weight_map = index["weight_map"]
    assert set(weight_map) == _expected_names(2)
    by_file: dict[str, set[str]] = {}
    total = 0
    for fname in sorted(set(weight_map.values())):
        if fname.endswith(".safetensors"):
            from safetensors.torch import load_file

            part = load_file(str(folder / fname))
        else:
            part = torch.load(folder / fname, map_location="cpu", weights_only=True)
        by_file[fname] = set(part)
        total += sum(t.numel() * t.element_size() for t in part.values())
    assert len(by_file) == 2
    assert {n: f for f, names in by_file.items() for n in names} == weight_map
    assert index["metadata"]["total_size"] == total
    assert "model.embed_tokens.weight" in by_file[weight_map["model.embed_tokens.weight"]]
    assert weight_map["model.embed_tokens.weight"] != weight_map["lm_head.weight"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype(tmp_path: Path, dtype: str) -> None:
    folder = build_checkpoint(tmp_path / dtype, TinySpec(dtype=dtype, weights_format="safetensors"))
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in sd.values()} == {getattr(torch, dtype)}
    assert _json(folder / "config.json")["torch_dtype"] == dtype


def test_building_twice_gives_identical_files(tmp_path: Path) -> None:
    for fmt in FORMATS:
        a = build_checkpoint(tmp_path / fmt / "a", TinySpec(weights_format=fmt, rope_scaling=NTK))
        b = build_checkpoint(tmp_path / fmt / "b", TinySpec(weights_format=fmt, rope_scaling=NTK))
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for name in names:
            da, db = (a / name).read_bytes(), (b / name).read_bytes()
            if name in REMOTE_CODE_FILES:  # these name their own folder
                da = da.replace(str(a.resolve()).encode(), b"<FOLDER>")
                db = db.replace(str(b.resolve()).encode(), b"<FOLDER>")
            assert da == db, f"{fmt}: {name} differs"
    # A different seed gives different weights.
    c = build_checkpoint(tmp_path / "seed1", TinySpec(weights_format="bin", seed=1))
    d = build_checkpoint(tmp_path / "seed0", TinySpec(weights_format="bin"))
    assert (c / "pytorch_model.bin").read_bytes() != (d / "pytorch_model.bin").read_bytes()


def test_endless_checkpoint_zeroes_only_the_stop_rows(tmp_path: Path, sp: spm.SentencePieceProcessor) -> None:
    plain = load_state_dict(build_checkpoint(tmp_path / "plain", TinySpec(weights_format="bin")))
    endless_folder = build_checkpoint(tmp_path / "endless", TinySpec(weights_format="bin", endless=True))
    endless = load_state_dict(endless_folder)
    stop_ids = [sp.eos_id(), sp.piece_to_id("[|Human|]:")]
    assert stop_ids == [2, sp.piece_to_id("[|Human|]:")] and stop_ids[1] != sp.unk_id()
    changed = (plain["lm_head.weight"] != endless["lm_head.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(stop_ids)
    assert not endless["lm_head.weight"][stop_ids].any()
    assert all(torch.equal(plain[name], endless[name]) for name in plain if name != "lm_head.weight")
    # So their logits are exactly 0 while the best other token's is positive: greedy never stops.
    logits = reference_logits(endless_folder, torch.tensor([[1, *sp.encode("[|Human|]:Tell me a story[|AI|]:")]]))
    assert not logits[0, :, stop_ids].any() and (logits[0].max(dim=-1).values > 0).all()


def test_custom_tokenizer_model(tmp_path: Path) -> None:
    other = train_tokenizer(tmp_path / "other.model", vocab_size=800)
    pieces = spm.SentencePieceProcessor(model_file=str(other)).get_piece_size()
    assert 600 < pieces <= 800
    folder = build_checkpoint(tmp_path / "c", TinySpec(weights_format="bin"), tokenizer_model=other)
    assert (folder / "tokenizer.model").read_bytes() == other.read_bytes()
    assert _json(folder / "config.json")["vocab_size"] == (pieces // 64 + 1) * 64


def test_builder_never_imports_the_model() -> None:
    tree = ast.parse(Path(tc.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not {m for m in imported if m.startswith(("bluelm_cli", "transformers"))}


# ---------------------------------------------------------------------------- remote-code traps


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_trap_files_raise_and_leave_a_marker(tmp_path: Path, name: str) -> None:
    folder = build_checkpoint(tmp_path / "c", TinySpec(weights_format="bin"))
    assert not remote_code_was_executed(folder)
    with pytest.raises(RuntimeError, match="must never execute remote code from a checkpoint: " + name):
        runpy.run_path(str(folder / name))
    assert remote_code_was_executed(folder)
    assert (folder / REMOTE_CODE_MARKER).read_text(encoding="utf-8").strip() == name


def test_trap_marker_lands_in_the_checkpoint_even_when_copied(tmp_path: Path) -> None:
    """transformers copies remote code into a module cache before importing it."""
    folder = build_checkpoint(tmp_path / "c", TinySpec(weights_format="bin"))
    cache = tmp_path / "modules_cache"
    cache.mkdir()
    (cache / "modeling_bluelm.py").write_bytes((folder / "modeling_bluelm.py").read_bytes())
    with pytest.raises(RuntimeError):
        runpy.run_path(str(cache / "modeling_bluelm.py"))
    assert remote_code_was_executed(folder)


# ---------------------------------------------------------------------------- reference


def test_reference_logits_are_finite_and_shaped(ckpt: Path, sp: spm.SentencePieceProcessor) -> None:
    ids = torch.tensor([[1, *sp.encode("[|Human|]:你好[|AI|]:")]])
    logits = reference_logits(ckpt, ids)
    vocab = _json(ckpt / "config.json")["vocab_size"]
    assert logits.shape == (1, ids.shape[1], vocab) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert 0.5 < logits.std() < 10
    # Causal: the logits of a prefix don't depend on what follows it.
    torch.testing.assert_close(reference_logits(ckpt, ids[:, :3]), logits[:, :3], rtol=1e-5, atol=1e-5)


def test_reference_random_model_output_is_varied(ckpt: Path) -> None:
    out = reference_greedy(ckpt, torch.tensor([[1, 4, 100, 200, 5]]), 24)
    assert len(set(out)) > 6


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_same_logits_for_every_format(tmp_path: Path, ckpt: Path, fmt: str) -> None:
    folder = build_checkpoint(tmp_path / fmt, TinySpec(weights_format=fmt))
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    torch.testing.assert_close(reference_logits(folder, ids), reference_logits(ckpt, ids), rtol=0, atol=0)


def test_reference_matches_transformers_llama_plus_embedding_layernorm(tmp_path: Path) -> None:
    """Cross-check the oracle: BlueLM = Llama + LayerNorm on the embeddings (GQA and ntkmixed too)."""
    transformers = pytest.importorskip("transformers")
    folder = build_checkpoint(tmp_path / "c", TinySpec(num_key_value_heads=2, rope_scaling=NTK, seed=5))
    cfg, sd = load_config(folder), load_state_dict(folder)
    llama_cfg = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(llama_cfg).eval()
    ln = torch.nn.LayerNorm(cfg["hidden_size"], eps=cfg["rms_norm_eps"])
    with torch.no_grad():
        ln.weight.copy_(sd.pop("model.embed_layer_norm.weight"))
        ln.bias.copy_(sd.pop("model.embed_layer_norm.bias"))
        result = model.load_state_dict(sd, strict=False)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if "rotary" not in k]
        model.model.embed_tokens.register_forward_hook(lambda _m, _i, out: ln(out))
        model.model.rotary_emb.inv_freq.copy_(reference_inv_freq(cfg).float())
        ids = torch.randint(0, 600, (1, 40), generator=torch.Generator().manual_seed(0))
        expected = model(ids).logits
    torch.testing.assert_close(reference_logits(folder, ids), expected, rtol=1e-4, atol=1e-4)


def _ntk_inv_freq_by_hand(d: int, base: float, k: float, b: float) -> list[float]:
    a = math.log(k) / ((d / 2) ** b)
    return [base ** (-2 * i / d) / math.exp(a * (i + 1) ** b) for i in range(d // 2)]


@pytest.mark.parametrize("factor,power", [(4.0, 0.25), (16.0, 1 / 3), (2.0, 0.5)])
def test_reference_ntkmixed_inv_freq(factor: float, power: float) -> None:
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 10000.0,
           "rope_scaling": {"type": "ntkmixed", "factor": factor, "power": power}}  # fmt: skip
    got = reference_inv_freq(cfg)
    want = torch.tensor(_ntk_inv_freq_by_hand(128, 10000.0, factor, power), dtype=torch.float64)
    assert got.shape == (64,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    plain = torch.tensor([10000.0 ** (-2 * i / 128) for i in range(64)], dtype=torch.float64)
    assert (got < plain).all()  # every frequency is lowered
    # The lowest frequency is divided by exactly the factor: exp(a * (d/2)^b) == k.
    assert got[-1] / plain[-1] == pytest.approx(1 / factor, rel=1e-12)


def test_reference_ntkmixed_factor_one_is_plain_rope() -> None:
    base = {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 10000.0}
    plain = reference_inv_freq(base)
    torch.testing.assert_close(plain, torch.tensor([10000.0 ** (-i / 8) for i in range(8)], dtype=torch.float64))
    scaled = reference_inv_freq({**base, "rope_scaling": {"type": "ntkmixed", "factor": 1.0, "power": 0.25}})
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)


def test_reference_rope_scaling_changes_logits(tmp_path: Path) -> None:
    plain = build_checkpoint(tmp_path / "plain", TinySpec(weights_format="bin"))
    ntk = build_checkpoint(tmp_path / "ntk", TinySpec(weights_format="bin", rope_scaling=NTK))
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    a, b = reference_logits(plain, ids), reference_logits(ntk, ids)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # position 0 has no rotation
    assert not torch.allclose(a[:, 1:], b[:, 1:])
