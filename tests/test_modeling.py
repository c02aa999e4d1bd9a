"""BlueLMForCausalLM against the independent plain-torch reference, caches, backends, generate(), RoPE and safety."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

import bluelm_cli.modeling  # noqa: F401  (registers BlueLM with the Auto classes)
from bluelm_cli.local.loading import load_model
from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM, BlueLMTokenizer, rope_inverse_frequencies
from bluelm_cli.testing.tiny_checkpoint import REMOTE_CODE_MARKER, build_checkpoint, remote_code_was_executed, TinySpec
from checkpoints import NTK, SPECS, checkpoints, fresh_checkpoint, tiny_folder  # noqa: F401
from reference_bluelm import load_config, load_state_dict, reference_greedy, reference_inv_freq, reference_logits

TOLERANCE = 1e-5
VARIANTS = list(SPECS)


def _load(folder: Path, **kwargs: object) -> BlueLMForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32, **kwargs)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _prompt_ids(folder: Path, length: int = 40, seed: int = 0) -> torch.Tensor:
    """BOS, the chat tags, and random ordinary ids (no specials) within the tokenizer's range."""
    pieces = _tokenizer_pieces(folder)
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(4, pieces, (length,), generator=g)
    return torch.cat([torch.tensor([1]), body]).unsqueeze(0)


def _tokenizer_pieces(folder: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_reference(checkpoints: dict[str, Path], variant: str) -> None:
    folder = checkpoints[variant]
    model = _load(folder)
    assert isinstance(model, BlueLMForCausalLM)
    assert model.dtype == torch.float32
    ids = _prompt_ids(folder, length=48)
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference_logits(folder, ids)
    assert logits.shape == expected.shape == (1, ids.shape[1], load_config(folder)["vocab_size"])
    assert _max_diff(logits, expected) <= TOLERANCE


def test_gqa_variant_really_has_fewer_kv_heads(checkpoints: dict[str, Path]) -> None:
    model = _load(checkpoints["gqa"])
    config = model.config
    assert config.num_key_value_heads == 2 < config.num_attention_heads == 8
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.weight.shape == (2 * config.head_dim, config.hidden_size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_names_are_the_published_ones(checkpoints: dict[str, Path], variant: str) -> None:
    folder = checkpoints[variant]
    _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert set(info["missing_keys"]) == set()
    assert set(info["unexpected_keys"]) == set()
    assert set(info["mismatched_keys"]) == set()
    model = BlueLMForCausalLM(BlueLMConfig.from_pretrained(str(folder)))
    assert set(model.state_dict()) == set(load_state_dict(folder))


# ----------------------------------------------------------------------------------------------- caches
@pytest.mark.parametrize("variant", ["gqa", "ntkmixed-32k"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_incremental_decoding_equals_full_forward(checkpoints: dict[str, Path], variant: str, cache_kind: str) -> None:
    model = _load(checkpoints[variant])
    ids = _prompt_ids(checkpoints[variant], length=31, seed=5)
    total = ids.shape[1]
    if cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        steps = [model(ids[:, :10], cache=cache, use_cache=True).logits]
        # a chunk of several tokens, then one token at a time (like a new chat turn, then decoding)
        steps.append(model(ids[:, 10:17], cache=cache, use_cache=True).logits)
        for i in range(17, total):
            steps.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    incremental = torch.cat(steps, dim=1)
    assert int(cache.get_seq_length()) == total
    assert _max_diff(incremental, full) <= TOLERANCE


def test_sdpa_equals_eager(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["gqa"]
    sdpa = _load(folder, attn_implementation="sdpa")
    eager = _load(folder, attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    ids = _prompt_ids(folder, length=33, seed=7)
    with torch.no_grad():
        assert _max_diff(sdpa(ids).logits, eager(ids).logits) <= TOLERANCE
        # and with a cache: prefill then single steps
        caches = [DynamicCache(config=sdpa.config), DynamicCache(config=eager.config)]
        outs = [[], []]
        for k, net in enumerate((sdpa, eager)):
            outs[k].append(net(ids[:, :20], cache=caches[k]).logits)
            for i in range(20, ids.shape[1]):
                outs[k].append(net(ids[:, i : i + 1], cache=caches[k]).logits)
    assert _max_diff(torch.cat(outs[0], 1), torch.cat(outs[1], 1)) <= TOLERANCE


# --------------------------------------------------------------------------------------------- generate
def _truncate_at_eos(ids: list[int], eos: int = 2) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("variant", ["bin-sharded", "gqa"])
def test_greedy_generate_through_auto_classes_equals_reference_loop(checkpoints: dict[str, Path], variant: str) -> None:
    folder = checkpoints[variant]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert isinstance(tokenizer, BlueLMTokenizer)
    assert isinstance(model, BlueLMForCausalLM)
    inputs = tokenizer("[|Human|]:你好[|AI|]:", return_tensors="pt")
    prompt = inputs["input_ids"]
    assert prompt[0, 0].item() == 1
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    generated = out[0, prompt.shape[1] :].tolist()
    expected = _truncate_at_eos(reference_greedy(folder, prompt, 16))
    assert generated == expected
    assert isinstance(tokenizer.decode(generated, skip_special_tokens=True), str)


# ------------------------------------------------------------------------------------------------- RoPE
def test_ntkmixed_inverse_frequencies_equal_the_formula(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["ntkmixed-32k"]
    config = AutoConfig.from_pretrained(str(folder))
    assert config.rope_parameters["rope_type"] == "ntkmixed"
    inv_freq = rope_inverse_frequencies(config)
    d = config.head_dim
    k, b, base = NTK["factor"], NTK["power"], 10000.0
    a = math.log(k) / (d / 2) ** b
    by_hand = torch.tensor([base ** (-2 * i / d) / math.exp(a * (i + 1) ** b) for i in range(d // 2)], dtype=torch.float64)
    assert inv_freq.shape == (d // 2,)
    torch.testing.assert_close(inv_freq.double(), by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq.double(), reference_inv_freq(load_config(folder)), rtol=1e-6, atol=0)
    # the scaling really changes the frequencies (all but the first, whose divisor is exp(a) > 1 too)
    plain = torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    assert bool((inv_freq.double() < plain).all())
    # and the loaded model's rotary buffer holds exactly these
    model = _load(folder)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), inv_freq.double(), rtol=1e-6, atol=0)


def test_default_inverse_frequencies_are_plain_rope(tiny_folder: Path) -> None:
    config = AutoConfig.from_pretrained(str(tiny_folder))
    d = config.head_dim
    expected = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    torch.testing.assert_close(rope_inverse_frequencies(config).double(), expected, rtol=1e-6, atol=0)


def test_context_length_is_factor_times_max_positions(checkpoints: dict[str, Path]) -> None:
    ntk = AutoConfig.from_pretrained(str(checkpoints["ntkmixed-32k"]))
    assert ntk.max_position_embeddings == 2048
    assert ntk.context_length == int(NTK["factor"]) * 2048 == 32768
    plain = AutoConfig.from_pretrained(str(checkpoints["bin-sharded"]))
    assert plain.context_length == plain.max_position_embeddings == 2048
    published_32k = BlueLMConfig(rope_scaling={"type": "ntkmixed", "factor": 4.0, "power": 0.25}, max_position_embeddings=8192)
    assert published_32k.context_length == 32768


def test_ntkmixed_config_loads_without_warnings(checkpoints: dict[str, Path]) -> None:
    import logging

    from transformers.utils import logging as transformers_logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        config = AutoConfig.from_pretrained(str(checkpoints["ntkmixed-32k"]))
        BlueLMConfig.from_dict(config.to_dict())
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "ntkmixed" in r], records


# ------------------------------------------------------------------------------------------ padding rows
@pytest.fixture(scope="module")
def padding_attractor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose padding rows of lm_head are scaled copies of real rows, so an unmasked argmax
    (almost) always lands on a padding id."""
    from safetensors.torch import load_file, save_file

    folder = build_checkpoint(tmp_path_factory.mktemp("pad") / "BlueLM-tiny-pad", TinySpec(weights_format="safetensors", seed=4))
    pieces = _tokenizer_pieces(folder)
    sd = load_file(str(folder / "model.safetensors"))
    head = sd["lm_head.weight"]
    padding = head.shape[0] - pieces
    assert padding > 0
    head[pieces:] = 30.0 * head[:padding]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_padding_rows_are_masked_when_tokenizer_size_is_known(padding_attractor: Path) -> None:
    folder = padding_attractor
    pieces = _tokenizer_pieces(folder)
    ids = _prompt_ids(folder, length=20, seed=3)
    unmasked = reference_logits(folder, ids)
    assert bool((unmasked[0].argmax(-1) >= pieces).any()), "precondition: padding rows would win unmasked"

    loaded = load_model(str(folder), device="cpu", dtype="float32")
    model = loaded.model
    assert model.config.tokenizer_vocab_size == pieces == len(loaded.tokenizer)
    with torch.no_grad():
        logits = model(ids).logits
    assert bool((logits[..., pieces:] == torch.finfo(logits.dtype).min).all())
    assert _max_diff(logits[..., :pieces], unmasked[..., :pieces]) <= TOLERANCE

    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    generated = out[0, ids.shape[1] :].tolist()
    assert generated and max(generated) < pieces
    # equals a greedy loop over the reference restricted to the tokenizer's ids
    cfg, sd = load_config(folder), load_state_dict(folder)
    from reference_bluelm import forward

    seq, expected = ids, []
    for _ in range(12):
        nxt = int(forward(cfg, sd, seq)[0, -1, :pieces].argmax())
        expected.append(nxt)
        if nxt == 2:
            break
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert generated == expected

    for seed in range(3):
        torch.manual_seed(seed)
        sampled = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=5.0, top_k=0, top_p=1.0)
        assert max(sampled[0, ids.shape[1] :].tolist()) < pieces


def test_padding_rows_masked_with_dtype_min_in_bfloat16(padding_attractor: Path) -> None:
    loaded = load_model(str(padding_attractor), device="cpu", dtype="bfloat16")
    pieces = loaded.model.config.tokenizer_vocab_size
    ids = _prompt_ids(padding_attractor, length=8)
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.dtype == torch.bfloat16
    assert bool((logits[..., pieces:] == torch.finfo(torch.bfloat16).min).all())
    assert bool((logits[..., :pieces] > torch.finfo(torch.bfloat16).min).all())


# ------------------------------------------------------------------------------------------ remote code
def test_remote_code_is_never_needed_nor_executed(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "BlueLM-tiny-trap")
    assert (folder / "modeling_bluelm.py").is_file()
    assert "auto_map" in json.loads((folder / "config.json").read_text())

    config = AutoConfig.from_pretrained(str(folder))
    assert isinstance(config, BlueLMConfig)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(tokenizer, BlueLMTokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(model) is BlueLMForCausalLM
    # explicitly refusing remote code changes nothing
    AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    loaded = load_model(str(folder), device="cpu")
    assert type(loaded.model) is BlueLMForCausalLM
    assert not remote_code_was_executed(folder)
    assert not (folder / REMOTE_CODE_MARKER).exists()
    assert not any(type(m).__module__.startswith("transformers_modules") for m in model.modules())


@pytest.mark.slow
def test_loading_never_prompts_on_stdin(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "BlueLM-tiny-stdin")
    script = textwrap.dedent(
        f"""
        import bluelm_cli.modeling
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from bluelm_cli.local.loading import load_model
        folder = {str(folder)!r}
        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        AutoModelForCausalLM.from_pretrained(folder)
        loaded = load_model(folder, device="cpu")
        ids = loaded.tokenizer("[|Human|]:hi[|AI|]:", return_tensors="pt").input_ids
        loaded.model.generate(ids, max_new_tokens=3, do_sample=False)
        print("LOADED-OK")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED-OK" in result.stdout
    assert "trust_remote_code" not in result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    assert not remote_code_was_executed(folder)
