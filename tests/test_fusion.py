"""Q/K/V and gate/up fused into one projection each at load time: the same outputs, fewer matmuls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.fastpath import CompiledRunner, GraphRunner
from bluelm_cli.local.loading import load_model
from bluelm_cli.modeling.modeling_bluelm import (
    BlueLMRMSNorm,
    compile_pointwise,
    eager_pointwise,
    fuse_projections,
    rms_norm,
)
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


def _graph_recorder() -> tuple[list[torch.fx.GraphModule], object]:
    """A torch.compile backend that keeps each FX graph dynamo hands it and runs it as traced."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(graph)
        return graph.forward

    return graphs, backend


def _called(graph: torch.fx.GraphModule, name: str) -> int:
    """How many nodes of the graph call a function or method of this name (torch.rsqrt, Tensor.cos, …)."""
    return sum(1 for node in graph.graph.nodes if node.op in ("call_function", "call_method")
               and name == (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_decode_step_is_one_graph_with_norms_and_rotary_inside(tmp_path: Path, dtype: torch.dtype) -> None:
    # What lets inductor fuse RMSNorm with the residual add and RoPE with the q/k projection's output on a GPU: the
    # whole step, every layer, is one graph (fullgraph=True raises at any graph break), with the norms and the
    # rotation in it. The compiled step's logits equal the eager fused model's.
    folder = build_checkpoint(tmp_path, TinySpec(num_key_value_heads=2))
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    loaded.model.to(dtype)
    fuse_projections(loaded.model)
    layers = loaded.model.config.num_hidden_layers
    graphs, backend = _graph_recorder()
    runner = CompiledRunner(loaded.model, 64, mode=None, backend=backend)  # type: ignore[arg-type]
    eager = GraphRunner(loaded.model, 64, use_graphs=False, smallest_window=64)
    prompt = torch.tensor([[1, *range(20, 30)]])
    with torch.inference_mode():
        outputs = []
        for stepper in (runner, eager):
            cache = stepper.new_cache()
            stepper.prefill(cache, prompt, 0)
            outputs.append([stepper.decode(cache, torch.tensor([[40 + step]]), 11 + step).clone() for step in range(3)])
    assert len(graphs) == 1, f"{len(graphs)} graphs: the decode step broke"
    graph = graphs[0]
    assert _called(graph, "rsqrt") == 2 * layers + 1  # two RMSNorms a layer and the final one
    assert _called(graph, "cat") >= 2 * layers and _called(graph, "neg") == 2 * layers  # rotate-half on q and k
    assert _called(graph, "scaled_dot_product_attention") == layers
    assert _called(graph, "item") == 0 and _called(graph, "tolist") == 0
    # Traced, the step may order a reduction differently: equal to rounding.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for compiled, reference in zip(*outputs):
        torch.testing.assert_close(compiled.float(), reference.float(), rtol=tolerance, atol=tolerance)


def _fused_tiny(tmp_path: Path) -> tuple[object, object]:
    folder = build_checkpoint(tmp_path, TinySpec(num_key_value_heads=2, max_position_embeddings=256, seed=3))
    plain = load_model(str(folder), device="cpu", dtype="float32")
    fused = load_model(str(folder), device="cpu", dtype="float32")
    fuse_projections(plain.model)
    fuse_projections(fused.model)
    return plain, fused


def _steps(loaded: object, runner: GraphRunner) -> list[torch.Tensor]:
    """A 40-token prefill and 60 decode steps, crossing the 64- and 128-slot windows: every step's logits."""
    cache = runner.new_cache()
    with torch.inference_mode():
        logits = [runner.prefill(cache, torch.tensor([[1, *range(20, 59)]]), 0).clone()]
        logits += [runner.decode(cache, torch.tensor([[30 + step % 50]]), 40 + step).clone() for step in range(60)]
    return logits


def test_pointwise_pieces_compile_once_each_for_every_shape(tmp_path: Path) -> None:
    # compile_pointwise, traced by dynamo but run as traced (the eager backend): RMSNorm, RoPE and SiLU times up are
    # one graph each, compiled for prefills and for decode steps and then never again, whatever the lengths and the
    # attention window (dynamic shapes: a recompile on a GPU would be a compile in the middle of a chat), and the
    # logits are the eager model's.
    plain, fused = _fused_tiny(tmp_path)
    graphs, backend = _graph_recorder()
    layers = fused.model.config.num_hidden_layers
    assert compile_pointwise(fused.model, backend=backend) == (2 * layers + 1) + layers + layers
    expected = _steps(plain, GraphRunner(plain.model, 256, use_graphs=False, smallest_window=64))
    got = _steps(fused, GraphRunner(fused.model, 256, use_graphs=False, smallest_window=64))
    # Per piece one graph for prefills and one for decode steps (torch specializes a length of 1), none per window.
    assert sorted(_called(graph, "rsqrt") + 10 * _called(graph, "neg") + 100 * _called(graph, "silu") for graph in graphs) \
        == [1, 1, 20, 20, 100, 100]  # the norm, both rotations, the activation
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), step
    eager_pointwise(fused.model)
    assert all(norm.kernel is rms_norm for norm in fused.model.modules() if isinstance(norm, BlueLMRMSNorm))


@pytest.mark.slow
def test_pointwise_pieces_compiled_by_inductor_equal_eager_to_rounding(tmp_path: Path) -> None:
    # The real compiler on the CPU (about 15 s here): generated kernels, equal to the eager model to float rounding.
    plain, fused = _fused_tiny(tmp_path)
    compile_pointwise(fused.model)
    expected = _steps(plain, GraphRunner(plain.model, 256, use_graphs=False, smallest_window=64))
    got = _steps(fused, GraphRunner(fused.model, 256, use_graphs=False, smallest_window=64))
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
