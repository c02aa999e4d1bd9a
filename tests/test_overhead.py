"""Per-token overhead measurement (bluelm_cli.bench.overhead) and the sync-free sampler, on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bluelm_cli.bench.local import format_report, random_weights_model, run_bench
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.sampling import TokenSampler
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


def _hf_processors(settings: SamplingSettings) -> LogitsProcessorList:
    """What generate() applies for these settings, in its order: the reference the engine's sampler must equal."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if not settings.greedy:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


@pytest.mark.parametrize("seed", range(8))
def test_sampler_draws_exactly_what_torch_multinomial_draws(seed: int) -> None:
    # The engine draws without torch.multinomial (whose validity checks sync the GPU twice a token), and keeps the
    # repetition penalty's history as a mask on the device: the same scores as transformers' processors over a
    # growing history, the same distribution and random stream, so a seeded answer is unchanged.
    settings = SamplingSettings(temperature=0.7, top_p=0.9, top_k=[0, 40][seed % 2], repetition_penalty=1.1, seed=seed)
    history = torch.randint(0, 640, (1, 30), generator=torch.Generator().manual_seed(seed))
    processors = _hf_processors(settings)
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    stop_ids = torch.tensor([2, 5])
    sampler = TokenSampler(settings, 640, torch.device("cpu"), stop_ids, ours)
    sampler.observe(history)
    drawn, expected = [], []
    for step in range(20):
        logits = torch.randn((1, 640), generator=torch.Generator().manual_seed(100 * seed + step)) * 3
        reference_scores = processors(history, logits.float())
        assert torch.equal(sampler.scores(logits.clone()), reference_scores)
        token = sampler(logits.clone())
        drawn.append(int(token))
        expected.append(int(torch.multinomial(torch.softmax(reference_scores, dim=-1), 1, generator=theirs)[0, 0]))
        history = torch.cat([history, torch.tensor([[expected[-1]]])], dim=1)
    assert drawn == expected


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_sampler_equals_argmax_of_the_processed_scores(penalty: float) -> None:
    settings = SamplingSettings(temperature=0.0, repetition_penalty=penalty)
    history = torch.tensor([[1, 7, 7, 9, 639, 650]])  # 650: past the logits' rows, as padding ids are; ignored
    sampler = TokenSampler(settings, 640, torch.device("cpu"), torch.tensor([2]), None)
    sampler.observe(history)
    assert sampler.processes == (penalty != 1.0)
    for step in range(10):
        logits = torch.randn((1, 640), generator=torch.Generator().manual_seed(step))
        logits[0, 7] = logits.abs().max() + 0.01  # a seen token on top: the penalty may move the choice
        # The reference without the id past the rows (transformers 5.17's penalty indexes with it and fails).
        seen = history[:, history[0] < logits.shape[-1]]
        expected = int(_hf_processors(settings)(seen, logits.clone()).argmax())
        assert int(sampler(logits.clone())) == expected
        history = torch.cat([history, torch.tensor([[expected]])], dim=1)
    # Stops suppressed (min_new_tokens): the top score is a stop id, the next one wins.
    plain = TokenSampler(SamplingSettings(temperature=0.0, repetition_penalty=1.0), 640, torch.device("cpu"),
                         torch.tensor([639]), None)
    assert int(plain(torch.arange(640.0).unsqueeze(0), suppress_stops=True)) == 638
    assert int(plain(torch.arange(640.0).unsqueeze(0))) == 639


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


def test_bench_of_two_new_tokens_still_measures_the_overhead(loaded: LoadedModel) -> None:
    # `bluelm bench --new-tokens 2` failed here ("needs at least three answer tokens"): the overhead runs now decode
    # at least MIN_OVERHEAD_TOKENS tokens, whatever the turns decode.
    report = run_bench(ChatEngine(loaded), prompt_tokens=20, new_tokens=2, turns=1)
    assert report.overhead is not None and report.overhead["outside_forward_ms_per_token"] > 0
    assert all(turn.new_tokens == 2 for turn in report.turns)


def test_a_two_token_split_has_one_interval_and_no_forward_inside(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    split = measure_split(engine, [1, 5, 6, 7], replace(GREEDY, max_new_tokens=2))
    assert split.decode_steps == 1 and split.forward_s == split.first_forward_s
    assert split.outside_fraction == pytest.approx(1.0)
