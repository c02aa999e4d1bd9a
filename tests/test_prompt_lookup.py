"""Prompt-lookup speculative decoding on a tiny checkpoint: the drafts, and greedy answers identical token for
token to plain greedy decoding (dynamic and static caches), with fewer forwards where drafts hit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.core.prompt import HistoryTurn, PromptPlan, fit_prompt
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.fastpath import GraphRunner
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.local.prompt_lookup import NgramLookup
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

GREEDY = SamplingSettings(max_new_tokens=48, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)
PROMPTS = [
    "你好",
    "Hello, who are you?",
    "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog.",
    "1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2 3 4 5",
    "Summarise: 春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。春眠不觉晓，处处闻啼鸟。",
    "def add(a, b): return a + b\ndef add(a, b): return a + b\ndef add(",
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_checkpoint(Path(tmp_path_factory.mktemp("lookup")), TinySpec(max_position_embeddings=512))
    return load_model(str(folder), device="cpu", dtype="float32")


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_final_ngram() -> None:
    lookup = NgramLookup([1, 2, 3, 4, 5, 9, 2, 3])
    assert lookup.draft(3) == [4, 5, 9]  # "2 3" was followed by 4 5 9
    lookup.append(7)
    assert lookup.draft() == []  # "3 7" and "2 3 7" never occurred before
    lookup.extend([1, 2, 3])
    assert lookup.draft(2) == [4, 5]  # the longest match wins: "1 2 3" at the start, over the later "2 3 7"
    lookup.extend([8, 2, 3])
    assert lookup.draft(2) == [8, 2]  # of the earlier "2 3"s, the latest wins
    assert NgramLookup([5, 6]).draft() == []


def _answer(engine: ChatEngine, plan: PromptPlan, settings: SamplingSettings, min_new_tokens: int = 0) -> AnswerResult:
    return engine.stream(plan, settings, min_new_tokens=min_new_tokens).finish()


def _plan(engine: ChatEngine, history: list[HistoryTurn], message: str, settings: SamplingSettings) -> PromptPlan:
    return fit_prompt(engine.encoder, None, history, message, context_limit=engine.context_limit,
                      max_new_tokens=settings.max_new_tokens)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
@pytest.mark.parametrize("settings", [GREEDY, replace(GREEDY, repetition_penalty=1.1)], ids=["greedy", "greedy-penalty"])
def test_greedy_with_prompt_lookup_is_plain_greedy_token_for_token(
    loaded: LoadedModel, static: bool, settings: SamplingSettings
) -> None:
    runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16) if static else None
    looked_up = ChatEngine(loaded, runner=runner, prompt_lookup=True)
    plain = ChatEngine(loaded)
    fewer = 0
    # One conversation per engine, so that every later turn also checks the cache the drafts left behind.
    history_plain: list[HistoryTurn] = []
    history_lookup: list[HistoryTurn] = []
    for number, message in enumerate(PROMPTS):
        minimum = 12 if number % 2 else 0  # also with the stops suppressed for the first tokens
        expected = _answer(plain, _plan(plain, history_plain, message, settings), settings, minimum)
        got = _answer(looked_up, _plan(looked_up, history_lookup, message, settings), settings, minimum)
        assert got.answer_ids == expected.answer_ids, message
        assert (got.finish_reason, got.text) == (expected.finish_reason, expected.text)
        assert got.reused_tokens == expected.reused_tokens
        assert 1 <= got.forwards <= expected.forwards
        fewer += got.forwards < expected.forwards
        history_plain.append(HistoryTurn(message, expected.answer_ids))
        history_lookup.append(HistoryTurn(message, got.answer_ids))
    assert fewer >= 2  # drafts were accepted on the repetitive prompts


SAMPLED = replace(GREEDY, temperature=0.7, top_k=4, top_p=1.0, repetition_penalty=1.2)
FIRST_TOKENS = 3
RUNS = 2000
FALSE_ALARM = 1e-6


def _reference_probabilities(loaded: LoadedModel, prompt: list[int], settings: SamplingSettings,
                             smallest: float) -> dict[tuple[int, ...], float]:
    """The exact probability of every sequence of the first FIRST_TOKENS tokens that plain sampling gives with
    probability >= `smallest` (stops suppressed), from full forwards of the model and transformers' processors
    (repetition penalty over the prompt and the tokens before, temperature, top-k). Prefixes below `smallest` are not
    expanded: their sequences are pooled by the caller."""
    import torch
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper)

    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(settings.repetition_penalty),
                                      TemperatureLogitsWarper(settings.temperature), TopKLogitsWarper(settings.top_k)])
    stops = [loaded.tokenizer.eos_token_id, loaded.tokenizer.sp_model.piece_to_id("[|Human|]:")]
    found: dict[tuple[int, ...], float] = {}
    frontier: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    with torch.inference_mode():
        while frontier:
            prefix, probability = frontier.pop()
            ids = torch.tensor([prompt + list(prefix)])
            scores = loaded.model(input_ids=ids).logits[:, -1, :].float()
            scores[0, stops] = float("-inf")
            distribution = torch.softmax(processors(ids, scores), dim=-1)[0].double()
            for token in (distribution * probability >= smallest).nonzero().view(-1).tolist():
                extended = (*prefix, token), probability * float(distribution[token])
                (found.update([extended]) if len(prefix) + 1 == FIRST_TOKENS else frontier.append(extended))
    return found


@pytest.mark.slow  # 2,000 short answers: ~15 s on one core
def test_sampling_with_prompt_lookup_gives_the_distribution_of_plain_sampling(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the frequencies of the first tokens over many seeds against their exact probabilities.

    Exactness must hold whatever is drafted; for the check to have power, drafts must hit often and miss often.
    A random model's answer seldom repeats its prompt, so here the lookup drafts, after the first token, the most
    likely next token (from the exact probabilities): it is accepted about half the time. Chi-square over the
    sequences expected at least 5 times (the rest pooled), at a false alarm rate of 1e-6 (fixed seeds: the same
    every run)."""
    import bluelm_cli.local.engine as engine_module
    from test_speculative_sampling import _chi_square, _chi_square_critical

    settings = replace(SAMPLED, max_new_tokens=FIRST_TOKENS)
    engine = ChatEngine(loaded, prompt_lookup=True)
    plan = _plan(engine, [], PROMPTS[1], settings)
    expected = _reference_probabilities(loaded, list(plan.ids), settings, 5 / RUNS)
    likeliest: dict[tuple[int, ...], tuple[float, int]] = {}
    for sequence, probability in expected.items():
        prefix = sequence[:1]
        likeliest[prefix] = max(likeliest.get(prefix, (0.0, 0)), (probability, sequence[1]))
    prompt_length = len(plan.ids)

    class LikeliestDraft(NgramLookup):
        def draft(self, limit: int = 8) -> list[int]:
            found = likeliest.get(tuple(self.tokens[prompt_length:]))
            return [found[1]][:limit] if found else []

    monkeypatch.setattr(engine_module, "NgramLookup", LikeliestDraft)
    counts: dict[tuple[int, ...], int] = {}
    forwards = 0
    for seed in range(RUNS):
        result = _answer(engine, plan, replace(settings, seed=seed), FIRST_TOKENS)
        outcome = tuple(result.answer_ids)
        counts[outcome] = counts.get(outcome, 0) + 1
        forwards += result.forwards
    expected[("rest",)] = 1 - sum(expected.values())  # type: ignore[index]
    pooled = {outcome: count for outcome, count in counts.items() if outcome in expected}
    pooled[("rest",)] = RUNS - sum(pooled.values())  # type: ignore[index]
    statistic, degrees, _ = _chi_square(pooled, expected, RUNS)  # type: ignore[arg-type]
    critical = _chi_square_critical(degrees, FALSE_ALARM)
    assert statistic <= critical, f"chi-square {statistic:.1f} on {degrees} degrees (bound {critical:.1f})"
    # The check had power: a draft was verified in every run (two forwards, three when it was rejected), and
    # accepted in a good share of them.
    assert RUNS * 2.2 < forwards < RUNS * 2.8, forwards


@pytest.fixture(scope="module")
def echoing(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A model whose answers repeat the prompt's last token, forever: drafts from the answer always hit."""
    folder = build_checkpoint(Path(tmp_path_factory.mktemp("echo")), TinySpec(max_position_embeddings=512, echo=True,
                                                                                endless=True))
    return load_model(str(folder), device="cpu", dtype="float32")


def test_sampling_at_a_low_temperature_takes_fewer_forwards_on_a_repetitive_answer(echoing: LoadedModel) -> None:
    settings = replace(GREEDY, temperature=0.3, repetition_penalty=1.1, seed=5)
    engine = ChatEngine(echoing, prompt_lookup=True)
    plan = _plan(engine, [], PROMPTS[3], settings)
    got = _answer(engine, plan, settings, settings.max_new_tokens)
    plain = _answer(ChatEngine(echoing), plan, settings, settings.max_new_tokens)
    assert got.new_tokens == plain.new_tokens == settings.max_new_tokens
    assert plain.forwards == settings.max_new_tokens
    assert got.forwards <= 0.6 * plain.forwards, got.forwards
    # At this temperature the echo's probability is 1 in float32: every draft greedy decoding accepts is accepted.
    greedy = _answer(engine, plan, replace(settings, temperature=0.0), settings.max_new_tokens)
    assert got.forwards == greedy.forwards


class _AlwaysDrafts(NgramLookup):
    """Drafts the last three tokens again at every step: every step verifies a draft, mostly rejected."""

    def draft(self, limit: int = 8) -> list[int]:
        return self.tokens[-3:][:limit]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_seeded_sampling_with_prompt_lookup_gives_the_same_answer_every_run(
    loaded: LoadedModel, static: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bluelm_cli.local.engine as engine_module

    monkeypatch.setattr(engine_module, "NgramLookup", _AlwaysDrafts)
    settings = replace(SAMPLED, temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=24, seed=11)

    def runner() -> GraphRunner | None:
        return GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16) if static else None

    engine = ChatEngine(loaded, runner=runner(), prompt_lookup=True)
    plan = _plan(engine, [], PROMPTS[3], settings)
    first = _answer(engine, plan, settings, 12)
    again = _answer(engine, plan, settings, 12)  # the cache of the first run reused
    fresh = _answer(ChatEngine(loaded, runner=runner(), prompt_lookup=True), plan, settings, 12)
    assert first.answer_ids == again.answer_ids == fresh.answer_ids
    other = _answer(engine, plan, replace(settings, seed=12), 12)
    assert other.answer_ids != first.answer_ids  # the seed does choose the tokens


@pytest.mark.slow
def test_a_stop_inside_an_accepted_draft_ends_the_answer_there(loaded: LoadedModel) -> None:
    """An answer that stops on its own (</s> or [|Human|]:) stops at the same token with drafts."""
    settings = replace(GREEDY, max_new_tokens=200)
    for message in PROMPTS:
        plan = _plan(ChatEngine(loaded), [], message, settings)
        expected = _answer(ChatEngine(loaded), plan, settings)
        got = _answer(ChatEngine(loaded, prompt_lookup=True), plan, settings)
        assert (got.answer_ids, got.finish_reason) == (expected.answer_ids, expected.finish_reason)


def test_the_draft_budget_grows_on_hits_shrinks_on_misses_and_pauses_after_a_total_miss() -> None:
    from bluelm_cli.local.prompt_lookup import DraftBudget

    budget = DraftBudget(most=8)
    assert budget.limit() == 8
    budget.update(8, 3)
    assert budget.limit() == 4  # what was accepted, plus one
    budget.update(4, 4)
    assert budget.limit() == 6  # a whole draft accepted: two more
    budget.update(6, 0)  # nothing accepted: pause one step, then two, then four ...
    assert [budget.limit(), budget.limit()] == [0, 1]
    budget.update(1, 0)
    assert [budget.limit() for _ in range(3)] == [0, 0, 1]
    for _ in range(10):
        budget.update(1, 0)
        waited = 0
        while budget.limit() == 0:
            waited += 1
    assert waited == DraftBudget.MAX_PAUSE
    budget.update(1, 1)  # a hit ends the pauses
    assert budget.limit() == 3
    budget.update(0, 0)  # no draft found: nothing changes
    assert budget.limit() == 3


def test_a_draft_verified_past_the_current_attention_window_widens_it(loaded: LoadedModel) -> None:
    """A replayed decode graph leaves the static cache's window as captured: a draft's eager forward that runs
    past it must widen it, or its last positions would not see themselves."""
    import torch

    from bluelm_cli.local.engine import StepRunner

    runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16)
    runner.warm_up()
    ids = torch.tensor([[1, *range(40, 60)]])  # 21 tokens: a 14-token prompt, then a token and a 6-token draft
    reference = StepRunner(loaded.model)
    with torch.inference_mode():
        static, dynamic = runner.new_cache(), reference.new_cache()
        runner.prefill(static, ids[:, :14], 0)
        reference.prefill(dynamic, ids[:, :14], 0)
        runner._window.size = 16  # as a graph replayed for position 14 left it
        got = runner.verify(static, ids[:, 14:], 14)
        expected = reference.verify(dynamic, ids[:, 14:], 14)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
