"""The CUDA fast path's logic, checked on the CPU: a static cache with a compiled decode step, and a windowed
static cache stepped eagerly window by window, give the same greedy answers as the eager engine across turns,
with cache reuse and divergence; a capture or compiler failure falls back to eager with a warning. The real
CUDA-graph runs are GPU-only tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bluelm_cli.local import fastpath
from bluelm_cli.local.engine import ChatEngine, StepRunner
from bluelm_cli.local.fastpath import CompiledRunner, GraphRunner, attention_windows, make_runner
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.modeling.modeling_bluelm import BlueLMRMSNorm, rms_norm
from bluelm_cli.core.prompt import HistoryTurn
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint
from helpers import start

GREEDY = SamplingSettings(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_checkpoint(tmp_path_factory.mktemp("fast") / "ckpt", TinySpec(max_position_embeddings=256, seed=5))
    return load_model(str(folder), device="cpu")


def conversation(engine: ChatEngine) -> list[list[int]]:
    """Four turns, then a divergent turn (history cut back, system prompt added): all answers' ids."""
    history: list[HistoryTurn] = []
    answers: list[list[int]] = []
    for turn in range(4):
        stream = start(engine, None, history, f"问题 {turn}: hello", GREEDY)
        result = stream.finish()
        answers.append(result.answer_ids)
        history.append(HistoryTurn(f"问题 {turn}: hello", result.answer_ids))
    answers.append(start(engine, "Be brief.", history[:2], "again", GREEDY).finish().answer_ids)
    answers.append(start(engine, None, history, "and once more", GREEDY).finish().answer_ids)
    return answers


@pytest.mark.slow
def test_compiled_static_cache_runner_equals_eager(loaded: LoadedModel) -> None:
    # backend="eager" traces the decode step with dynamo but skips code generation: it checks the
    # static-cache bookkeeping (crop by rewinding, fixed input buffers) at CPU-test speed.
    runner = CompiledRunner(loaded.model, loaded.context_length, mode=None, backend="eager")
    runner.warm_up()
    assert conversation(ChatEngine(loaded, runner=runner)) == conversation(ChatEngine(loaded))


def test_windowed_graph_runner_stepped_eagerly_equals_eager(loaded: LoadedModel) -> None:
    # Windows of 16, 32, ... 256 slots: the six turns cross several, and cropping moves back across them.
    runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16)
    runner.warm_up()
    assert runner.windows == [16, 32, 64, 128, 256]
    assert conversation(ChatEngine(loaded, runner=runner)) == conversation(ChatEngine(loaded))


def test_attention_windows_double_up_to_the_cache_length() -> None:
    assert attention_windows(2048) == [256, 512, 1024, 2048]
    assert attention_windows(12288) == [256, 512, 1024, 2048, 4096, 8192, 12288]
    assert attention_windows(200) == [200]
    runner = GraphRunner(torch.nn.Linear(1, 1), 2048, use_graphs=False)
    assert [runner.window_for(n) for n in (1, 256, 257, 2048)] == [256, 256, 512, 2048]
    with pytest.raises(ValueError):
        runner.window_for(2049)


@pytest.mark.parametrize("kind, cls", [("graphs", GraphRunner), ("compiled", CompiledRunner), ("fused", GraphRunner)])
def test_fast_path_failure_falls_back_to_eager(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, kind: str, cls: type) -> None:
    class Broken(cls):  # type: ignore[valid-type, misc]
        def warm_up(self, *args: object) -> None:
            raise RuntimeError("capture exploded\nmore detail")

    monkeypatch.setattr(fastpath, cls.__name__, Broken)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 1024**3, 80 * 1024**3))
    on_cuda = dataclasses.replace(loaded, device=torch.device("cuda"))
    messages: list[str] = []
    runner = make_runner(on_cuda, on_status=messages.append, kind=kind)
    assert type(runner) is StepRunner
    assert messages[-1] == "Warning: the fast path failed (capture exploded); using the eager path"
    # The fused runner compiled the model's element-wise pieces first: the eager path gets the eager ones back.
    norms = [m for m in loaded.model.modules() if isinstance(m, BlueLMRMSNorm)]
    assert norms and all(norm.kernel is rms_norm for norm in norms)


def test_no_compilation_off_cuda_or_when_disabled(loaded: LoadedModel) -> None:
    assert type(make_runner(loaded)) is StepRunner
    on_cuda = dataclasses.replace(loaded, device=torch.device("cuda"))
    assert type(make_runner(on_cuda, enabled=False)) is StepRunner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind, cls", [("graphs", GraphRunner), ("compiled", CompiledRunner), ("fused", GraphRunner)])
def test_cuda_graph_decode_equals_eager(tmp_path: Path, kind: str, cls: type) -> None:
    folder = build_checkpoint(tmp_path / "ckpt", TinySpec(max_position_embeddings=256, seed=5))
    loaded = load_model(str(folder), device="cuda", dtype="float32")
    runner = make_runner(loaded, kind=kind)
    assert isinstance(runner, cls)
    assert conversation(ChatEngine(loaded, runner=runner)) == conversation(ChatEngine(loaded))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_per_window_equal_eager(tmp_path: Path) -> None:
    # Windows of 16 ... 256 slots: the conversation replays several graphs and crops back across them.
    folder = build_checkpoint(tmp_path / "ckpt", TinySpec(max_position_embeddings=256, seed=5))
    loaded = load_model(str(folder), device="cuda", dtype="float32")
    runner = GraphRunner(loaded.model, loaded.context_length, smallest_window=16)
    runner.warm_up()
    assert sorted(runner._graphs) == [16, 32, 64, 128, 256]
    assert conversation(ChatEngine(loaded, runner=runner)) == conversation(ChatEngine(loaded))


def test_a_model_spread_over_several_devices_steps_eagerly(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    on_cuda = dataclasses.replace(loaded, device=torch.device("cuda"))
    monkeypatch.setattr(loaded.model, "hf_device_map", {"model.layers.0": 0, "model.layers.1": 1}, raising=False)
    messages: list[str] = []
    assert type(make_runner(on_cuda, on_status=messages.append)) is StepRunner
    assert messages == ["The model spans 2 devices: decoding on the eager path"]


def test_static_cache_is_sized_to_free_memory() -> None:
    from bluelm_cli.local.fastpath import kv_bytes_per_token, static_cache_length
    from bluelm_cli.modeling import BlueLMConfig

    config = BlueLMConfig()  # the published 7B shapes
    per_token = kv_bytes_per_token(config, torch.bfloat16)
    assert per_token == 512 * 1024  # 0.5 MiB a token, as docs/MODEL.md says
    gib = 1024**3
    assert static_cache_length(2048, per_token, 8 * gib) == 2048  # the 2K chat model: whole context
    assert static_cache_length(32768, per_token, 8 * gib) == 12288  # 32K model on a 24 GB card: 6 GiB of cache
    assert static_cache_length(32768, per_token, 40 * gib) == 32768
    assert static_cache_length(2048, per_token, 0) == 0


def test_engine_context_follows_a_smaller_static_cache(loaded: LoadedModel) -> None:
    runner = CompiledRunner(loaded.model, 128, mode=None, backend="eager")
    engine = ChatEngine(loaded, runner=runner)
    assert engine.context_limit == 128 < loaded.context_length
