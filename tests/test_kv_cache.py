"""The int8 KV cache (`--kv-cache int8`): per-head scales, storage size, chunked prefill, cropping across turns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bluelm_cli.core.prompt import HistoryTurn
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine, StepRunner
from bluelm_cli.local.kv_cache import Int8Layer, dequantize_per_head, quantize_per_head
from bluelm_cli.local.loading import LoadedModel, load_model
from checkpoints import checkpoints  # noqa: F401 - pytest fixture
from helpers import start

GREEDY = SamplingSettings(max_new_tokens=10, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path]) -> LoadedModel:  # noqa: F811
    return load_model(str(checkpoints["gqa"]), device="cpu", dtype="float32")


def test_quantization_is_per_head_and_position_and_within_half_a_step() -> None:
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, 3, 5, 16, generator=generator) * torch.tensor([0.01, 1.0, 100.0])[None, :, None, None]
    quantized, scale = quantize_per_head(states)
    assert quantized.dtype == torch.int8 and scale.shape == (1, 3, 5, 1) and scale.dtype == torch.float32
    # Each (head, position) vector uses the full range: its largest magnitude is ±127.
    assert (quantized.abs().amax(dim=-1) == 127).all()
    restored = dequantize_per_head(quantized, scale, torch.float32)
    assert ((restored - states).abs() <= scale / 2 + 1e-7).all()
    # A head of small values keeps its precision next to a head 10,000 times larger.
    small_head_error = (restored[:, 0] - states[:, 0]).abs().max()
    assert small_head_error < 1e-3 * states[:, 0].abs().max() * 10
    zero_q, zero_scale = quantize_per_head(torch.zeros(1, 1, 2, 8))
    assert (zero_q == 0).all() and (zero_scale > 0).all()


def test_the_cache_stores_one_byte_per_value_plus_a_scale_per_head(loaded: LoadedModel) -> None:
    config = loaded.model.config
    runner = StepRunner(loaded.model, kv_cache="int8")
    cache = runner.new_cache()
    assert all(type(layer) is Int8Layer for layer in cache.layers)
    ids = torch.randint(4, 500, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        runner.prefill(cache, ids, 0)
    assert cache.get_seq_length() == 300
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.head_dim * 1 + 4)
    assert sum(layer.stored_bytes() for layer in cache.layers) == 300 * per_token
    # The model-dtype layers keep nothing in full precision beside it.
    assert all(layer.keys.numel() == 0 and layer.values.numel() == 0 for layer in cache.layers)


def test_int8_logits_are_close_to_the_full_precision_cache(loaded: LoadedModel) -> None:
    ids = torch.randint(4, 500, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = StepRunner(loaded.model)
        int8 = StepRunner(loaded.model, kv_cache="int8")
        expected = full.prefill(full.new_cache(), ids, 0)
        got = int8.prefill(int8.new_cache(), ids, 0)
    difference = (got - expected).abs().max().item()
    assert 0 < difference < 0.05 * expected.abs().max().item()  # quantized (not a copy of the full cache), and close


def test_chunked_prefill_quantizes_as_one_shot_does(loaded: LoadedModel) -> None:
    """No scale depends on other positions, so chunking changes what is stored only by float rounding upstream
    (a matmul over 50 rows rounds differently from one over 333): at most one int8 step, rarely."""
    ids = torch.randint(4, 500, (1, 333), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        one_shot = StepRunner(loaded.model, kv_cache="int8", prefill_chunk=1000)
        chunked = StepRunner(loaded.model, kv_cache="int8", prefill_chunk=50)
        cache_a, cache_b = one_shot.new_cache(), chunked.new_cache()
        logits_a = one_shot.prefill(cache_a, ids, 0)
        logits_b = chunked.prefill(cache_b, ids, 0)
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        key_a, key_scale_a, value_a, value_scale_a = (buffer[:, :, :333] for buffer in layer_a._buffers)
        key_b, key_scale_b, value_b, value_scale_b = (buffer[:, :, :333] for buffer in layer_b._buffers)
        for quantized_a, quantized_b in ((key_a, key_b), (value_a, value_b)):
            steps = (quantized_a.int() - quantized_b.int()).abs()
            assert steps.max() <= 1 and (steps == 0).float().mean() > 0.999
        torch.testing.assert_close(key_scale_a, key_scale_b, rtol=1e-4, atol=0)
        torch.testing.assert_close(value_scale_a, value_scale_b, rtol=1e-4, atol=0)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-4)


def test_turns_that_reuse_and_crop_the_int8_cache_equal_fresh_prefills(loaded: LoadedModel) -> None:
    """Undo/retry crop the cache at the common prefix: later turns must equal a fresh int8 engine's."""
    engine = ChatEngine(loaded, runner=StepRunner(loaded.model, kv_cache="int8"))
    history: list[HistoryTurn] = []
    for message in ("你好", "What is the capital of France?", "写一首关于春天的诗。"):
        stream = start(engine, None, history, message, GREEDY)
        list(stream)
        result = stream.result
        assert result is not None
        if history:
            assert result.reused_tokens > 0
        fresh_engine = ChatEngine(loaded, runner=StepRunner(loaded.model, kv_cache="int8"))
        fresh = start(fresh_engine, None, history, message, GREEDY)
        list(fresh)
        assert fresh.result is not None and fresh.result.reused_tokens == 0
        assert result.answer_ids == fresh.result.answer_ids
        history.append(HistoryTurn(message, result.answer_ids))
    # A retry of the last message: the cache is cropped back into the prompt and the answer comes out the same.
    retry = start(engine, None, history[:-1], "写一首关于春天的诗。", GREEDY)
    list(retry)
    assert retry.result is not None and retry.result.answer_ids == history[-1].answer_ids
    assert 0 < retry.result.reused_tokens < len(engine.cached_ids)


def test_bad_kv_cache_kind_is_refused(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="kv_cache must be one of model, int8"):
        StepRunner(loaded.model, kv_cache="fp4")


def test_the_int8_cache_never_reserves_past_the_context(checkpoints: dict[str, Path]) -> None:  # noqa: F811
    small = load_model(str(checkpoints["bin-sharded"]), device="cpu", dtype="float32")
    small.model.config.max_position_embeddings = 300  # context_length follows it (a model of its own: no one else sees it)
    runner = StepRunner(small.model, kv_cache="int8")
    cache = runner.new_cache()
    ids = torch.randint(4, 500, (1, 290), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        runner.prefill(cache, ids[:, :250], 0)
        assert all(layer._buffers[0].shape[-2] == 256 for layer in cache.layers)
        runner.prefill(cache, ids[:, 250:], 250)  # doubling would reserve 512 rows
    assert all(layer._buffers[0].shape[-2] == 300 for layer in cache.layers)
    assert cache.get_seq_length() == 290


# ------------------------------------------------------------------------------------------ the CLI option
def test_ask_with_kv_cache_int8_answers_from_the_int8_cache(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from bluelm_cli.cli.app import app
    from bluelm_cli.core.prompt import fit_prompt

    folder = checkpoints["bin-sharded"]
    loaded_model = load_model(str(folder), device="cpu")
    reference = ChatEngine(loaded_model, runner=StepRunner(loaded_model.model, kv_cache="int8"))
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    plan = fit_prompt(reference.encoder, None, [], "hello", context_limit=reference.context_limit, max_new_tokens=12)
    expected = reference.stream(plan, settings).finish().text

    updates: list[int] = []
    original_update = Int8Layer.update

    def counting_update(self, key_states, value_states, *args, **kwargs):  # type: ignore[no-untyped-def]
        updates.append(key_states.shape[-2])
        return original_update(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(Int8Layer, "update", counting_update)
    monkeypatch.delenv("BLUELM_MODEL", raising=False)
    result = CliRunner().invoke(app, ["ask", "--model", str(folder), "--device", "cpu", "--kv-cache", "int8",
                                      "-t", "0", "-n", "12", "hello"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert updates  # the answer came through int8 layers

    bad = CliRunner().invoke(app, ["ask", "--model", str(folder), "--kv-cache", "fp4", "hi"])
    assert bad.exit_code == 2
    assert bad.stderr == "Error: kv_cache must be 'model' or 'int8', got 'fp4'\n"


def test_bench_measures_the_int8_cache(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """`bluelm bench --kv-cache int8` runs its conversation through the int8 cache (what a GPU check measures)."""
    import json

    from typer.testing import CliRunner

    from bluelm_cli.cli.app import app

    updates: list[int] = []
    original_update = Int8Layer.update

    def counting_update(self, key_states, value_states, *args, **kwargs):  # type: ignore[no-untyped-def]
        updates.append(key_states.shape[-2])
        return original_update(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(Int8Layer, "update", counting_update)
    result = CliRunner().invoke(app, ["bench", "--random-weights", "--model", str(checkpoints["bin-sharded"]), "--device", "cpu", "--kv-cache", "int8",
                                      "--turns", "2", "--prompt-tokens", "40", "--new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["turns"]) == 2
    assert updates and max(updates) >= 40  # the prompt's prefill went through the int8 layers
