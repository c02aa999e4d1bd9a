"""GPU-only checks (`pytest -m gpu`; skipped without CUDA): one device-to-host sync per decoded token,
bitsandbytes 8- and 4-bit loading that answers. The compiled-decode-equals-eager check is in test_fastpath.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.local.engine import ChatEngine, StepRunner
from bluelm_cli.local.fastpath import CompiledRunner, GraphRunner, make_runner
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.core.prompt import HistoryTurn
from helpers import start
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 24
# Syncs a turn may take besides one per token: the prompt ids and the stop ids copied to the device, the
# seeded generator, the prefill's mask. A per-token sync (e.g. torch.multinomial's two checks) exceeds it.
PER_TURN_SYNCS = 8
# bitsandbytes' 4-bit blocks and int8 kernels want dimensions that are multiples of 64.
QUANT_SPEC = TinySpec(hidden_size=256, intermediate_size=704, num_attention_heads=4, max_position_embeddings=512,
                      weights_format="safetensors", seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("gpu") / "ckpt", QUANT_SPEC)


def _synchronizing_calls(engine: ChatEngine, settings: SamplingSettings, history: list[HistoryTurn]) -> tuple[int, int]:
    """(syncs counted by torch's sync debug mode during one turn, tokens that turn decoded)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = start(engine, None, history, "hello there", settings, min_new_tokens=NEW_TOKENS).finish()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = sum("synchronizing" in str(warning.message) for warning in caught)
    history.append(HistoryTurn("hello there", result.answer_ids))
    return syncs, result.new_tokens


@pytest.mark.parametrize("kind", ["eager", "graphs", "compiled", "fused", "graph-prefill"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_one_device_sync_per_decoded_token(checkpoint: Path, kind: str, greedy: bool) -> None:
    loaded = load_model(str(checkpoint), device="cuda", dtype="bfloat16")
    runner_kind = {"eager": "compiled", "graph-prefill": "graphs"}.get(kind, kind)
    runner = make_runner(loaded, enabled=kind != "eager", kind=runner_kind, prefill_graph=kind == "graph-prefill")
    expected = {"eager": StepRunner, "graphs": GraphRunner, "compiled": CompiledRunner, "fused": GraphRunner, "graph-prefill": GraphRunner}
    assert type(runner) is expected[kind]
    engine = ChatEngine(loaded, runner=runner)
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0 if greedy else 0.7, seed=0)
    history: list[HistoryTurn] = []
    _synchronizing_calls(engine, settings, history)  # first turn: allocations, graph capture
    if kind == "graph-prefill":
        _synchronizing_calls(engine, settings, history)  # a later turn's prefill graph (by bucket and window): first use
    syncs, tokens = _synchronizing_calls(engine, settings, history)  # second turn reuses the cache
    assert tokens == NEW_TOKENS
    assert syncs <= NEW_TOKENS + PER_TURN_SYNCS, f"{syncs} syncs for {tokens} tokens"


def _answer_two_turns(loaded: LoadedModel) -> list[int]:
    engine = ChatEngine(loaded, runner=make_runner(loaded))
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0)
    first = start(engine, None, [], "你好", settings, min_new_tokens=12).finish()
    second = start(engine, None, [HistoryTurn("你好", first.answer_ids)], "again", settings, min_new_tokens=12).finish()
    assert first.new_tokens == second.new_tokens == 12
    assert second.reused_tokens > 0  # the quantized model's cache is kept across turns too
    assert second.text == loaded.tokenizer.decode(second.answer_ids, skip_special_tokens=True)
    return first.answer_ids


@pytest.mark.parametrize("quantization,layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_bitsandbytes_loads_and_answers(checkpoint: Path, quantization: str, layer: str) -> None:
    pytest.importorskip("bitsandbytes")
    loaded = load_model(str(checkpoint), device="cuda", dtype="bfloat16", quantization=quantization)
    assert loaded.quantization == quantization
    kinds = {type(module).__name__ for module in loaded.model.model.layers.modules()}
    assert layer in kinds
    full = load_model(str(checkpoint), device="cuda", dtype="bfloat16")
    assert loaded.model.get_memory_footprint() < full.model.get_memory_footprint()
    answer = _answer_two_turns(loaded)
    assert all(0 <= token < loaded.tokenizer.sp_model.get_piece_size() for token in answer)


@pytest.mark.parametrize("flag", ["--load-in-8bit", "--load-in-4bit"])
def test_ask_answers_with_a_quantized_model(checkpoint: Path, flag: str) -> None:
    pytest.importorskip("bitsandbytes")
    result = CliRunner().invoke(app, ["ask", "--model", str(checkpoint), flag, "--max-new-tokens", "8", "--json", "hello"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["finish_reason"] in ("stop", "length") and 0 < answer["new_tokens"] <= 8
