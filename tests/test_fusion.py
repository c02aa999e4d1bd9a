"""Q/K/V and gate/up fused into one projection each at load time: the same outputs, fewer matmuls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.loading import load_model
from bluelm_cli.modeling.modeling_bluelm import fuse_projections
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

GREEDY = SamplingSettings(max_new_tokens=24, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_fused_projections_give_the_same_logits_and_answers(tmp_path: Path, kv_heads: int | None) -> None:
    folder = build_checkpoint(tmp_path, TinySpec(num_key_value_heads=kv_heads))
    plain = load_model(str(folder), device="cpu", dtype="float32")
    fused = load_model(str(folder), device="cpu", dtype="float32")
    parameters = sum(p.numel() for p in fused.model.parameters())
    layers = fused.model.config.num_hidden_layers
    assert fuse_projections(fused.model) == 2 * layers
    assert fuse_projections(fused.model) == 0  # already fused
    attention = fused.model.model.layers[0].self_attn
    assert attention.qkv_proj is not None and not hasattr(attention, "q_proj")
    assert sum(p.numel() for p in fused.model.parameters()) == parameters
    ids = torch.tensor([[1, *range(20, 60)]])
    with torch.inference_mode():
        expected, got = plain.model(input_ids=ids).logits, fused.model(input_ids=ids).logits
    # The same dot products, but a GEMM of another width may sum them in another order: equal to rounding, not bitwise.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    plan = PromptPlan([1, *range(30, 50)])
    fused_answer = ChatEngine(fused).stream(plan, GREEDY, min_new_tokens=24).finish()
    assert fused_answer.answer_ids == ChatEngine(plain).stream(plan, GREEDY, min_new_tokens=24).finish().answer_ids


def test_layers_that_are_not_plain_linear_are_left_alone(tmp_path: Path) -> None:
    loaded = load_model(str(build_checkpoint(tmp_path, TinySpec())), device="cpu", dtype="float32")

    class QuantizedStandIn(torch.nn.Linear):  # what bitsandbytes' and AWQ/GPTQ layers look like to a type check
        pass

    mlp = loaded.model.model.layers[0].mlp
    mlp.up_proj.__class__ = QuantizedStandIn
    assert fuse_projections(loaded.model) == 2 * loaded.model.config.num_hidden_layers - 1
    assert mlp.gate_up_proj is None and isinstance(mlp.up_proj, QuantizedStandIn)
