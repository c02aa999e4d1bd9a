"""Per-token overhead measurement (bluelm_cli.bench.overhead) and the sync-free sampler, on the CPU."""

from __future__ import annotations

import pytest
import torch

from bluelm_cli.bench.local import format_report, random_weights_model, run_bench
from bluelm_cli.local.engine import ChatEngine, _logits_processors, _sample
from bluelm_cli.local.loading import LoadedModel
from bluelm_cli.bench.overhead import PUBLISHED_VOCAB, CachedLogitsRunner, measure_split, stub_logits
from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from helpers import plan

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
SHAPES = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return random_weights_model(SHAPES, "cpu", torch.float32)


@pytest.mark.parametrize("seed", range(8))
def test_sampler_draws_exactly_what_torch_multinomial_draws(seed: int) -> None:
    # The engine draws without torch.multinomial (whose validity checks sync the GPU twice a token):
    # same distribution and the same random stream, so a seeded answer is unchanged.
    settings = SamplingSettings(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1, seed=seed)
    logits = torch.randn((1, 640), generator=torch.Generator().manual_seed(100 + seed)) * 3
    history = torch.randint(0, 640, (1, 30), generator=torch.Generator().manual_seed(seed))
    processors = _logits_processors(settings)
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    expected_probabilities = torch.softmax(processors(history, logits.float()), dim=-1)
    drawn = [int(_sample(logits, history, processors, ours, greedy=False)) for _ in range(20)]
    expected = [int(torch.multinomial(expected_probabilities, 1, generator=theirs)[0, 0]) for _ in range(20)]
    assert drawn == expected


def test_instrumented_run_splits_the_decode_window_without_changing_the_answer(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    ids = plan(engine, None, [], "The quick brown fox jumps over the lazy dog.", GREEDY.max_new_tokens).ids
    plain = engine.stream(PromptPlan(ids), GREEDY, min_new_tokens=6).finish()
    engine.reset()
    split = measure_split(engine, ids, GREEDY)
    assert split.decode_steps == 5  # 6 tokens: the first comes from the prefill
    assert 0 < split.forward_s - split.first_forward_s < split.window_s
    assert 0 < split.outside_fraction < 1
    # The window holds 4 of the 5 forwards: the first was queued before the first token was read.
    assert split.outside_ms_per_token * 5 / 1000 + split.forward_s - split.first_forward_s == pytest.approx(split.window_s)
    again = engine.stream(PromptPlan(ids), GREEDY, min_new_tokens=6).finish()
    assert again.answer_ids == plain.answer_ids and again.reused_tokens == 0


@pytest.mark.parametrize("vocab", [640, PUBLISHED_VOCAB])
def test_stubbed_forward_runs_the_real_decode_loop(loaded: LoadedModel, vocab: int) -> None:
    pieces = loaded.tokenizer.sp_model.get_piece_size()
    logits = stub_logits(vocab, pieces, torch.device("cpu"), torch.float32)
    assert logits.shape == (1, vocab) and bool((logits[0, pieces:] == torch.finfo(torch.float32).min).all())
    engine = ChatEngine(loaded, runner=CachedLogitsRunner(loaded.model, logits))
    settings = SamplingSettings(max_new_tokens=12, seed=3)  # default sampling: temperature, top-p, repetition penalty
    result = engine.stream(PromptPlan([1, 5, 6, 7]), settings, min_new_tokens=12).finish()
    assert result.new_tokens == 12 and all(0 <= token < pieces for token in result.answer_ids)
    assert len(set(result.answer_ids)) > 1  # sampled, and the repetition penalty moves the draw
    assert result.text == loaded.tokenizer.decode(result.answer_ids, skip_special_tokens=True)


def test_bench_reports_the_overhead(loaded: LoadedModel) -> None:
    report = run_bench(ChatEngine(loaded), prompt_tokens=20, new_tokens=5, turns=2)
    overhead = report.overhead
    assert overhead is not None and overhead["runs"] == 3
    assert set(overhead["stub_ms_per_token"]) == {"640 greedy", "640 default sampling", "100096 default sampling"}
    assert overhead["forward_ms_per_token"] > 0 and overhead["outside_forward_ms_per_token"] > 0
    assert 0 < overhead["outside_forward_fraction"] < 1
    table = format_report(report)
    assert "  outside the forward " in table and "  vocab 100,096, default sampling " in table
    assert report.compile_s is None and '"overhead": {' in report.to_json()
