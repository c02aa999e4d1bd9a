"""The graph prefill (GraphRunner(prefill_graphs=True)): each prefill chunk padded to a bucket length, written into the
static cache at its real positions, logits of the last real token only, the cache's length advanced by the real count.

On the CPU the same padded steps run eagerly (`use_graphs=False`): their logits equal the eager prefill's within float
error at and around the bucket edges, from an empty cache and from an offset (a later turn), across chunks; the
padding's slots are never attended to; greedy answers are those of the eager engine across turns, with prompt lookup's
verify too. The CUDA-graph replays are GPU-only tests at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bluelm_cli.core.prompt import HistoryTurn
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local import fastpath
from bluelm_cli.local.engine import ChatEngine, StepRunner
from bluelm_cli.local.fastpath import GraphRunner, make_runner, prefill_buckets
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint
from helpers import start

GREEDY = SamplingSettings(temperature=0, max_new_tokens=12)
# Float32 on a CPU: the padded forward attends over other shapes (a padded or masked window) than the eager one, so
# sums may run in another order; measured differences were about 2e-6.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_checkpoint(tmp_path_factory.mktemp("prefill") / "ckpt", TinySpec(max_position_embeddings=2048, seed=3))
    return load_model(str(folder), device="cpu", dtype="float32")


def padded_runner(loaded: LoadedModel, **options: object) -> GraphRunner:
    runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16,
                         prefill_graphs=True, **options)  # type: ignore[arg-type]
    runner.warm_up()
    return runner


def random_ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 200, (1, count), generator=torch.Generator().manual_seed(seed))


def cache_length(runner: GraphRunner) -> int:
    assert runner._cache is not None
    lengths = {int(layer.cumulative_length) for layer in runner._cache.layers}
    assert len(lengths) == 1
    return lengths.pop()


def test_buckets_are_powers_of_two_up_to_the_chunk() -> None:
    assert prefill_buckets(2048, 2048) == [64, 128, 256, 512, 1024, 2048]
    assert prefill_buckets(2048, 32768) == [64, 128, 256, 512, 1024, 2048]
    assert prefill_buckets(1500, 32768) == [64, 128, 256, 512, 1024, 1500]
    assert prefill_buckets(2048, 1000) == [64, 128, 256, 512, 1000]  # a cache smaller than the chunk
    runner = GraphRunner(torch.nn.Linear(1, 1), 2048, use_graphs=False, prefill_graphs=True)
    assert [runner.bucket_for(n) for n in (1, 63, 64, 65, 1000, 2048, 2049)] == [64, 64, 64, 128, 1024, 2048, None]


@pytest.mark.parametrize("count, attention", [(1, "sdpa"), (63, "sdpa"), (64, "sdpa"), (65, "sdpa"), (1000, "sdpa"), (65, "eager")])
def test_padded_prefill_logits_equal_the_eager_prefill_from_empty_and_from_an_offset(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, count: int, attention: str,
) -> None:
    # "eager": transformers' additive float mask instead of SDPA's boolean one.
    monkeypatch.setattr(loaded.model.config, "_attn_implementation", attention)
    eager = StepRunner(loaded.model)
    eager_cache = eager.new_cache()
    runner = padded_runner(loaded)
    cache = runner.new_cache()
    first, second = random_ids(count, seed=count), random_ids(37, seed=count + 1)
    with torch.inference_mode():
        expected = eager.prefill(eager_cache, first, 0)
        got = runner.prefill(cache, first, 0)
        bucket = runner.bucket_for(count)
        assert (bucket, bucket, True) in runner._prefills  # the padded path ran (from an empty cache: flash-style is_causal)
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        assert cache_length(runner) == count  # advanced by the real count, not the bucket's
        # A second turn's prefill starts at an offset: a masked window over the cache.
        torch.testing.assert_close(runner.prefill(cache, second, count), eager.prefill(eager_cache, second, count),
                                   atol=TOLERANCE, rtol=0)
        assert (64, runner.window_for(count + 64), False) in runner._prefills
        assert cache_length(runner) == count + 37
        # The next decode step sees exactly the real tokens.
        token = torch.tensor([[7]])
        torch.testing.assert_close(runner.decode(cache, token, count + 37), eager.decode(eager_cache, token, count + 37),
                                   atol=TOLERANCE, rtol=0)


def test_the_padding_slots_are_never_attended_to(loaded: LoadedModel) -> None:
    eager = StepRunner(loaded.model)
    eager_cache = eager.new_cache()
    runner = padded_runner(loaded)
    cache = runner.new_cache()
    with torch.inference_mode():
        eager.prefill(eager_cache, random_ids(70, seed=1), 0)
        runner.prefill(cache, random_ids(70, seed=1), 0)  # 70 tokens padded to 128: slots 70..127 hold padding
        for layer in cache.layers:
            assert layer.keys[:, :, 70:128].abs().sum() > 0  # the padding was written there...
            # ...and even absurd values there change nothing that follows (they are past the cache's length).
            layer.keys[:, :, 70:].fill_(1e4)
            layer.values[:, :, 70:].fill_(-1e4)
        token = torch.tensor([[9]])
        torch.testing.assert_close(runner.decode(cache, token, 70), eager.decode(eager_cache, token, 70), atol=TOLERANCE, rtol=0)
        follow = random_ids(20, seed=2)
        torch.testing.assert_close(runner.prefill(cache, follow, 71), eager.prefill(eager_cache, follow, 71),
                                   atol=TOLERANCE, rtol=0)
        draft = random_ids(5, seed=4)
        torch.testing.assert_close(runner.verify(cache, draft, 91), eager.verify(eager_cache, draft, 91), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("start", [0, 50], ids=["empty-cache", "offset"])
def test_the_padded_forward_reads_no_tensor_on_the_host(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, start: int) -> None:
    # A CUDA graph capture fails on any read of a device value by the host (and a replay would not repeat the choice it
    # made): transformers' mask helper reads the cache's length to decide whether SDPA's is_causal will do, unless the
    # runner builds the mask itself. On a CPU nothing fails, so every way of reading a tensor's value is made to.
    runner = padded_runner(loaded)
    cache = runner.new_cache()
    with torch.inference_mode():
        if start:
            runner.prefill(cache, random_ids(start, seed=9), 0)
        step = fastpath._PaddedPrefill(64, 64 if not start else runner.window_for(start + 64), not start, torch.device("cpu"),
                                       torch.float32)
        step.load(random_ids(20, seed=10), start)

        def read(*args: object, **kwargs: object) -> None:
            raise AssertionError("a tensor was read on the host")

        for method in ("__bool__", "item", "tolist", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, method, read)
        runner._padded_forward(step)
        monkeypatch.undo()
    assert cache_length(runner) == start + 20


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_padded_prefill_compiles_into_one_graph(loaded: LoadedModel, backend: str) -> None:
    # fullgraph=True: dynamo traces the whole padded forward (mask, cache writes, the length counter set back) without a
    # break, the other way to run it as one graph (torch.compile per bucket; "eager" checks the trace, "inductor" the code).
    runner = padded_runner(loaded)
    runner.new_cache()
    compiled = torch.compile(runner._padded_forward, fullgraph=True, backend=backend, dynamic=False)
    eager = StepRunner(loaded.model)
    eager_cache = eager.new_cache()
    with torch.inference_mode():
        for offset, count in ((0, 40), (40, 30)):
            ids = random_ids(count, seed=offset)
            bucket = runner.bucket_for(count)
            assert bucket is not None
            step = fastpath._PaddedPrefill(bucket, bucket if not offset else runner.window_for(offset + bucket), not offset,
                                           torch.device("cpu"), torch.float32)
            step.load(ids, offset)
            torch.testing.assert_close(compiled(step), eager.prefill(eager_cache, ids, offset), atol=TOLERANCE, rtol=0)
            assert cache_length(runner) == offset + count
    torch.compiler.reset()


def test_a_prompt_longer_than_a_chunk_prefills_chunk_by_chunk(loaded: LoadedModel) -> None:
    eager = StepRunner(loaded.model, prefill_chunk=64)
    runner = padded_runner(loaded, prefill_chunk=64)
    assert runner.buckets == [64]
    ids = random_ids(150, seed=5)  # chunks of 64, 64 and 22 (padded to 64)
    with torch.inference_mode():
        got = runner.prefill(runner.new_cache(), ids, 0)
        expected = eager.prefill(eager.new_cache(), ids, 0)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert sorted(runner._prefills) == [(64, 64, True), (64, 128, False), (64, 256, False)]
    assert cache_length(runner) == 150


def test_padding_that_would_run_past_the_cache_prefills_eagerly(loaded: LoadedModel) -> None:
    runner = GraphRunner(loaded.model, 100, use_graphs=False, smallest_window=16, prefill_graphs=True)
    runner.warm_up()
    assert runner.buckets == [64, 100]
    eager = StepRunner(loaded.model)
    eager_cache = eager.new_cache()
    cache = runner.new_cache()
    with torch.inference_mode():
        eager.prefill(eager_cache, random_ids(60, seed=6), 0)
        runner.prefill(cache, random_ids(60, seed=6), 0)
        # 30 more tokens at 60: the 64 bucket would write slots up to 123 of 100.
        torch.testing.assert_close(runner.prefill(cache, random_ids(30, seed=7), 60),
                                   eager.prefill(eager_cache, random_ids(30, seed=7), 60), atol=TOLERANCE, rtol=0)
    assert all(fresh for _, _, fresh in runner._prefills)
    assert cache_length(runner) == 90


def test_other_attention_implementations_prefill_eagerly(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = padded_runner(loaded)
    monkeypatch.setattr(loaded.model.config, "_attn_implementation", "flex_attention")
    calls: list[str] = []
    monkeypatch.setattr(runner, "_padded_forward", lambda step: calls.append("padded") or torch.zeros(1))
    monkeypatch.setattr(runner, "_eager_prefill", lambda ids, start: calls.append("eager") or torch.zeros(1))
    with torch.inference_mode():
        runner.prefill(runner.new_cache(), random_ids(10, seed=11), 0)
    assert calls == ["eager"]


def conversation(engine: ChatEngine) -> list[list[int]]:
    """Four turns (each reuses the cache: its prefill starts at an offset), then a divergent turn and one more."""
    history: list[HistoryTurn] = []
    answers: list[list[int]] = []
    for turn in range(4):
        message = f"问题 {turn}: hello " + "a long line of text to pad the prompt " * (turn * 6)
        result = start(engine, None, history, message, GREEDY).finish()
        answers.append(result.answer_ids)
        history.append(HistoryTurn(message, result.answer_ids))
    answers.append(start(engine, "Be brief.", history[:2], "again", GREEDY).finish().answer_ids)
    answers.append(start(engine, None, history, "and once more", GREEDY).finish().answer_ids)
    return answers


@pytest.mark.parametrize("prompt_lookup", [False, True], ids=["plain", "prompt-lookup"])
def test_greedy_answers_equal_the_eager_engine_across_turns(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, prompt_lookup: bool,
) -> None:
    runner = padded_runner(loaded, prefill_chunk=128)  # the longer turns run over more than one chunk
    verified: list[int] = []
    verify = runner.verify
    monkeypatch.setattr(runner, "verify", lambda cache, ids, start: verified.append(ids.shape[1]) or verify(cache, ids, start))
    expected = conversation(ChatEngine(loaded))
    assert conversation(ChatEngine(loaded, runner=runner, prompt_lookup=prompt_lookup)) == expected
    assert any(not fresh for _, _, fresh in runner._prefills) and any(fresh for _, _, fresh in runner._prefills)
    assert bool(verified) == prompt_lookup  # drafts were checked over the cache the padded prefills wrote


def test_a_failed_capture_warns_and_that_length_prefills_eagerly(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=True, smallest_window=16, prefill_graphs=True)
    runner._eager_prefill(torch.ones((1, 4), dtype=torch.long), 0)  # allocates the cache (warm_up would capture on CUDA)
    attempts: list[int] = []

    def broken(step: object, start: int) -> None:
        attempts.append(start)
        raise RuntimeError("capture exploded\nmore detail")

    monkeypatch.setattr(runner, "_capture_prefill", broken)
    eager = StepRunner(loaded.model)
    cache = runner.new_cache()
    ids = random_ids(40, seed=8)
    with torch.inference_mode():
        expected = eager.prefill(eager.new_cache(), ids, 0)
        with pytest.warns(RuntimeWarning, match=r"the graph prefill of 64 tokens failed \(capture exploded\)"):
            got = runner.prefill(cache, ids, 0)
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        assert cache_length(runner) == 40
        runner.prefill(runner.new_cache(), ids, 0)  # not tried again
    assert attempts == [0]


def test_make_runner_passes_the_graph_prefill_on(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GraphRunner, "warm_up", lambda self: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 1024**3, 80 * 1024**3))
    on_cuda = dataclasses.replace(loaded, device=torch.device("cuda"))
    assert make_runner(on_cuda, prefill_graph=True).prefill_graphs is True  # type: ignore[attr-defined]
    assert make_runner(on_cuda).prefill_graphs is fastpath.DEFAULT_PREFILL_GRAPH is False  # type: ignore[attr-defined]
    monkeypatch.setattr(fastpath, "DEFAULT_PREFILL_GRAPH", True)  # the one line to flip once a GPU has measured it
    assert make_runner(on_cuda).prefill_graphs is True  # type: ignore[attr-defined]
    assert make_runner(on_cuda, prefill_graph=False).prefill_graphs is False  # type: ignore[attr-defined]
    messages: list[str] = []
    monkeypatch.setattr(fastpath.CompiledRunner, "warm_up", lambda self: None)
    make_runner(on_cuda, kind="compiled", prefill_graph=True, on_status=messages.append)
    assert "The graph prefill is for the graphs and fused runners: the compiled runner prefills eagerly" in messages


def test_make_runner_says_which_prefill_graph_failed_to_capture(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def warm_up(self: GraphRunner) -> None:  # what warm_up does for the prefill graphs, without CUDA
        self.new_cache()
        self._eager_prefill(torch.ones((1, 4), dtype=torch.long), 0)
        self._prefill_chunk(torch.ones((1, 64), dtype=torch.long), 0)

    def broken(self: GraphRunner, step: object, start: int) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(GraphRunner, "warm_up", warm_up)
    monkeypatch.setattr(GraphRunner, "_capture_prefill", broken)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 1024**3, 80 * 1024**3))
    messages: list[str] = []
    with torch.inference_mode():
        runner = make_runner(dataclasses.replace(loaded, device=torch.device("cuda")), prefill_graph=True, on_status=messages.append)
    assert isinstance(runner, GraphRunner)  # the decode graphs stay; that length prefills eagerly
    assert messages[-1] == "Warning: the graph prefill of 64 tokens failed (out of memory); that length prefills eagerly"


def test_bench_prefill_graph_flag_reaches_the_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bluelm bench --prefill-graph` asks make_runner for it and says so in --json (here a CPU stand-in for the CUDA
    runner: the padded prefill stepped eagerly, through the whole benchmark conversation)."""
    import json

    from typer.testing import CliRunner

    from bluelm_cli.cli.app import app

    asked: list[bool | None] = []

    def fake_make_runner(loaded: LoadedModel, *, prefill_graph: bool | None = None, **options: object) -> GraphRunner:
        asked.append(prefill_graph)
        runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16,
                             prefill_graphs=bool(prefill_graph))
        runner.warm_up()
        return runner

    monkeypatch.setattr(fastpath, "make_runner", fake_make_runner)
    folder = build_checkpoint(tmp_path / "ckpt", TinySpec(max_position_embeddings=512, seed=3))
    reports = []
    for flag in ("--prefill-graph", "--no-prefill-graph", None):
        result = CliRunner().invoke(app, ["bench", "--random-weights", "--model", str(folder), "--device", "cpu",
                                          *([flag] if flag else []), "--turns", "2", "--prompt-tokens", "40", "--new-tokens", "4",
                                          "--json"])
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(result.stdout))
    assert asked == [True, False, None]  # None: make_runner's default, the chat's
    assert [report["prefill_graph"] for report in reports] == [True, False, False]
    assert len(reports[0]["turns"]) == 2


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.fixture(scope="module")
def on_gpu(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = build_checkpoint(tmp_path_factory.mktemp("prefill-gpu") / "ckpt", TinySpec(max_position_embeddings=2048, seed=3))
    return load_model(str(folder), device="cuda", dtype="float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("count", [1, 63, 64, 65, 1000])
def test_cuda_graph_prefill_equals_eager(on_gpu: LoadedModel, count: int) -> None:
    runner = GraphRunner(on_gpu.model, on_gpu.context_length, smallest_window=16, prefill_graphs=True)
    runner.warm_up()
    eager = StepRunner(on_gpu.model)
    eager_cache = eager.new_cache()
    cache = runner.new_cache()
    first, second = random_ids(count, seed=count).cuda(), random_ids(37, seed=count + 1).cuda()
    with torch.inference_mode():
        for _ in range(2):  # the first call captures, the second replays the captured graph
            cache = runner.new_cache()
            got = runner.prefill(cache, first, 0)
        expected = eager.prefill(eager_cache, first, 0)
        assert runner._prefills[(runner.bucket_for(count),) * 2 + (True,)].graph is not None
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        assert cache_length(runner) == count
        torch.testing.assert_close(runner.prefill(cache, second, count), eager.prefill(eager_cache, second, count),
                                   atol=TOLERANCE, rtol=0)
        token = torch.tensor([[7]], device="cuda")
        torch.testing.assert_close(runner.decode(cache, token, count + 37), eager.decode(eager_cache, token, count + 37),
                                   atol=TOLERANCE, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prompt_lookup", [False, True], ids=["plain", "prompt-lookup"])
def test_cuda_graph_prefill_answers_equal_eager(on_gpu: LoadedModel, prompt_lookup: bool) -> None:
    runner = make_runner(on_gpu, prefill_graph=True)
    assert isinstance(runner, GraphRunner) and runner.prefill_graphs
    expected = conversation(ChatEngine(on_gpu))
    assert conversation(ChatEngine(on_gpu, runner=runner, prompt_lookup=prompt_lookup)) == expected
    assert all(step.graph is not None for step in runner._prefills.values())
    assert {(bucket, bucket, True) for bucket in runner.buckets} <= set(runner._prefills)  # captured at warm-up
