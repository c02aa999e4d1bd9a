"""Every RoPE type transformers has, plus BlueLM's ntkmixed: BlueLM computes each as transformers' Llama does.

The first two tests are transformers' generic rope-scaling checks (tests/causal_lm_tester.py:
`test_model_rope_scaling_from_config`, `test_model_rope_scaling_frequencies`, which the generic suite in
tests/transformers_generic runs when a transformers test tree is given), restated here so that they run in the
default suite without that tree; each runs for Llama too, as the control.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from bluelm_cli.export.hf import export_hf
from bluelm_cli.local.loading import load_model
from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM, BlueLMModel
from bluelm_cli.modeling.modeling_bluelm import BlueLMRotaryEmbedding
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

# The generic tester's shapes (CausalLMModelTester's defaults).
TESTER_SHAPE = {
    "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "intermediate_size": 37, "hidden_act": "gelu", "max_position_embeddings": 512, "pad_token_id": 0,
}
MODELS = {
    "bluelm": (BlueLMConfig, BlueLMModel, BlueLMRotaryEmbedding),
    "llama": (LlamaConfig, LlamaModel, LlamaRotaryEmbedding),
}


def _tester_config(kind: str):  # type: ignore[no-untyped-def]
    config_class = MODELS[kind][0]
    return config_class(**TESTER_SHAPE)


def _set_rope(config, params: dict) -> None:  # type: ignore[no-untyped-def]
    # As the generic suite's `_set_config_rope_params`: an in-place update, so earlier keys stay.
    config.rope_parameters = getattr(config, "rope_parameters", {}) or {}
    config.rope_parameters.update(params)


def _ids(shape: list[int], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ transformers' generic rope tests
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("scaling_type", ["linear", "dynamic", "yarn"])
def test_model_rope_scaling_from_config(kind: str, scaling_type: str) -> None:
    _, model_class, _ = MODELS[kind]
    config = _tester_config(kind)
    short_input = _ids([1, 10], config.vocab_size, 0)
    long_input = _ids([1, int(config.max_position_embeddings * 1.5)], config.vocab_size, 1)

    torch.manual_seed(42)
    _set_rope(config, {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0,
                       "original_max_position_embeddings": 16384})
    original = model_class(config).eval()
    with torch.no_grad():
        original_short = original(short_input).last_hidden_state
        original_long = original(long_input).last_hidden_state

    torch.manual_seed(42)
    _set_rope(config, {"rope_type": scaling_type, "factor": 10.0, "rope_theta": 10_000.0, "partial_rotary_factor": 1.0})
    scaled = model_class(config).eval()
    with torch.no_grad():
        scaled_short = scaled(short_input).last_hidden_state
        scaled_long = scaled(long_input).last_hidden_state

    if scaling_type == "dynamic":  # dynamic changes nothing until an input is longer than the original length
        torch.testing.assert_close(original_short, scaled_short, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(original_short, scaled_short, atol=1e-5)
    assert not torch.allclose(original_long, scaled_long, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_model_rope_scaling_frequencies(kind: str) -> None:
    _, model_class, rope_class = MODELS[kind]
    config = _tester_config(kind)
    # The generic test finds the class by module name in the base model.
    assert type(model_class(config).rotary_emb) is rope_class
    factor, short_length = 10, 10
    long_length = int(config.max_position_embeddings * 1.5)
    x = torch.randn(1, dtype=torch.float32)
    short_positions = torch.arange(short_length).unsqueeze(0)
    long_positions = torch.arange(long_length).unsqueeze(0)

    _set_rope(config, {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0})
    original = rope_class(config=config)
    cos_short, sin_short = original(x, short_positions)
    cos_long, sin_long = original(x, long_positions)
    torch.testing.assert_close(cos_short, cos_long[:, :short_length])
    torch.testing.assert_close(sin_short, sin_long[:, :short_length])

    # linear: new position p is original position p / factor
    _set_rope(config, {"rope_type": "linear", "factor": factor, "rope_theta": 10_000.0, "partial_rotary_factor": 1.0})
    linear = rope_class(config=config)
    linear_cos_short, linear_sin_short = linear(x, short_positions)
    linear_cos_long, linear_sin_long = linear(x, long_positions)
    torch.testing.assert_close(linear_cos_short, linear_cos_long[:, :short_length])
    torch.testing.assert_close(linear_sin_short, linear_sin_long[:, :short_length])
    for new_position in range(0, long_length, factor):
        torch.testing.assert_close(linear_cos_long[:, new_position], cos_long[:, new_position // factor])
        torch.testing.assert_close(linear_sin_long[:, new_position], sin_long[:, new_position // factor])

    # dynamic NTK: unchanged for short inputs, lower frequencies once a long input was seen
    _set_rope(config, {"rope_type": "dynamic", "factor": factor, "rope_theta": 10_000.0, "partial_rotary_factor": 1.0})
    ntk = rope_class(config=config)
    ntk_cos_short, ntk_sin_short = ntk(x, short_positions)
    ntk_cos_long, ntk_sin_long = ntk(x, long_positions)
    torch.testing.assert_close(ntk_cos_short, cos_short)
    torch.testing.assert_close(ntk_sin_short, sin_short)
    assert not torch.allclose(ntk_cos_long, cos_long)
    assert not torch.allclose(ntk_sin_long, sin_long)
    assert (ntk.inv_freq <= original.inv_freq).all()

    # yarn: scaled over the whole input
    _set_rope(config, {"rope_type": "yarn", "factor": factor, "rope_theta": 10_000.0, "partial_rotary_factor": 1.0})
    yarn = rope_class(config=config)
    yarn_cos_short, yarn_sin_short = yarn(x, short_positions)
    yarn_cos_long, yarn_sin_long = yarn(x, long_positions)
    torch.testing.assert_close(yarn_cos_short, yarn_cos_long[:, :short_length])
    torch.testing.assert_close(yarn_sin_short, yarn_sin_long[:, :short_length])
    assert not torch.allclose(yarn_cos_short, cos_short)
    assert not torch.allclose(yarn_sin_short, sin_short)
    assert not torch.allclose(yarn_cos_long, cos_long)
    assert not torch.allclose(yarn_sin_long, sin_long)


# ------------------------------------------------------------------------------ BlueLM = Llama, type by type
HEAD_DIM = 16  # hidden 64 / 4 heads
ORIGINAL = 64  # original_max_position_embeddings: the long inputs below run past it

ROPE_TYPES: dict[str, dict] = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32, "beta_slow": 1},
    "longrope": {
        "rope_type": "longrope",
        "original_max_position_embeddings": ORIGINAL,
        "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
        "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)],
    },
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}
LONG = 5 * ORIGINAL  # past max_position_embeddings below
SHAPE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4 * ORIGINAL}


def _pair(rope: dict) -> tuple[BlueLMForCausalLM, LlamaForCausalLM]:
    """BlueLM without its embedding LayerNorm (exactly Llama's graph) and Llama, same weights, same RoPE config."""
    params = {**rope, "rope_theta": 10000.0}
    torch.manual_seed(0)
    bluelm = BlueLMForCausalLM(BlueLMConfig(**SHAPE, use_stable_embedding=False, rope_parameters=dict(params))).eval()
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=dict(params))).eval()
    missing, unexpected = llama.load_state_dict(bluelm.state_dict(), strict=False)
    assert not missing and not unexpected
    return bluelm, llama


@pytest.mark.parametrize("name", list(ROPE_TYPES))
def test_bluelm_equals_llama_for_each_rope_type(name: str) -> None:
    bluelm, llama = _pair(ROPE_TYPES[name])
    assert type(bluelm.model.rotary_emb).__name__ == "BlueLMRotaryEmbedding"
    torch.testing.assert_close(bluelm.model.rotary_emb.inv_freq, llama.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert bluelm.model.rotary_emb.attention_scaling == llama.model.rotary_emb.attention_scaling
    # Short (within the original length) and long (past max_position_embeddings: dynamic rescales there, and
    # past original_max_position_embeddings: longrope switches to its long factors).
    for length, seed in ((20, 0), (LONG, 1)):
        ids = _ids([2, length], SHAPE["vocab_size"], seed)
        with torch.no_grad():
            torch.testing.assert_close(bluelm(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
    # Greedy decoding through the cache, crossing max_position_embeddings (dynamic re-derives its frequencies).
    prompt = _ids([1, SHAPE["max_position_embeddings"] - 8], SHAPE["vocab_size"], 2)
    with torch.no_grad():
        ours = bluelm.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
        theirs = llama.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_the_rope_types_differ_from_each_other() -> None:
    """The comparison above can fail: each type changes the logits of a long input."""
    ids = _ids([1, LONG], SHAPE["vocab_size"], 3)
    outputs = {}
    for name, rope in ROPE_TYPES.items():
        bluelm, _ = _pair(rope)
        with torch.no_grad():
            outputs[name] = bluelm(ids).logits
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not torch.allclose(outputs[first], outputs[second], atol=1e-4), (first, second)


# ----------------------------------------------------------------------------------- export round trip
@pytest.mark.parametrize("name", [*ROPE_TYPES, "ntkmixed"])
def test_export_round_trip_per_rope_type(tmp_path: Path, name: str) -> None:
    rope = {"type": "ntkmixed", "factor": 4.0, "power": 0.25} if name == "ntkmixed" else ROPE_TYPES[name]
    spec = TinySpec(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL,
                    rope_scaling=None if name == "default" else dict(rope), weights_format="safetensors", seed=7)
    source = build_checkpoint(tmp_path / "src", spec)
    out = tmp_path / "hf"
    export_hf(source, out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    if name in ("default",):
        assert "rope_scaling" not in config
    elif name == "ntkmixed":
        assert config["rope_scaling"]["rope_type"] == "longrope"
    else:
        written = config["rope_scaling"]
        assert written["rope_type"] == written["type"] == name
        assert {key: written[key] for key in rope if key != "rope_type"} == {k: v for k, v in rope.items() if k != "rope_type"}
    ours = load_model(str(source), device="cpu", dtype="float32").model
    llama = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert llama.config.rope_parameters["rope_type"] == ("longrope" if name == "ntkmixed" else name)
    pieces = llama.config.vocab_size
    for length, seed in ((24, 4), (LONG, 5)):
        ids = torch.randint(4, pieces, (1, length), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = ours(ids).logits[..., :pieces]
            got = llama(ids).logits
        assert (expected - got).abs().max().item() <= 1e-5, (name, length)


def test_gguf_export_refuses_a_rope_type_it_would_compute_as_plain_rope(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from typer.testing import CliRunner

    from bluelm_cli.cli.app import app

    source = build_checkpoint(tmp_path / "src", TinySpec(rope_scaling={"type": "linear", "factor": 4.0}, seed=9))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "out.gguf"), "--model", str(source), "--format", "gguf"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: GGUF export supports the published RoPE types (default and ntkmixed), not 'linear'; "
        "use --format hf (it carries every transformers RoPE type)\n"
    )
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.partial").exists()


@pytest.mark.parametrize("rope", [{"type": "ntkmixed", "factor": 4.0, "power": 0.25}, ROPE_TYPES["yarn"]],
                         ids=["ntkmixed", "yarn"])
def test_export_reads_a_config_saved_by_transformers(tmp_path: Path, rope: dict) -> None:
    """A fine-tune saved with save_pretrained has `rope_parameters` (rope_theta inside), not `rope_scaling`."""
    spec = TinySpec(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL,
                    rope_scaling=dict(rope), weights_format="safetensors", seed=10)
    source = build_checkpoint(tmp_path / "src", spec)
    ours = load_model(str(source), device="cpu", dtype="float32").model
    ours.config.rope_parameters["rope_theta"] = 5000.0  # not the default, so a dropped theta shows
    ours.config.save_pretrained(source)
    saved = json.loads((source / "config.json").read_text())
    assert "rope_scaling" not in saved and saved["rope_parameters"]["rope_theta"] == 5000.0
    ours = load_model(str(source), device="cpu", dtype="float32").model
    export_hf(source, tmp_path / "hf", dtype="float32")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    pieces = llama.config.vocab_size
    ids = torch.randint(4, pieces, (1, LONG), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids).logits[..., :pieces] - llama(ids).logits).abs().max().item() <= 1e-5
