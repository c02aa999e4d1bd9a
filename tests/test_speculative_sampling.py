"""Exact speculative sampling of prompt-lookup drafts (TokenSampler.speculate), against the analytic distribution.

A draft is deterministic (q is one-hot on the drafted token d): d is accepted with probability p(d), the first
rejection draws from p with d removed, and after a whole accepted draft the bonus token is drawn from the last
row's p. Then the settled tokens (the accepted drafts and one token more) have exactly the distribution of
plain sampling, token by token. These tests compute that distribution from the logits with transformers' own
processors (repetition penalty over the text INCLUDING the drafts before each row, temperature, top-k, top-p),
draw many seeded outcomes from the sampler, and bound the chi-square statistic so that a correct sampler fails
with probability below 1e-6 (the seeds are fixed, so each run is the same). Two wrong samplers (a draft always
accepted; the rejection drawn from p without removing d) are shown to fail the same check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import bluelm_cli.local.sampling as sampling
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.sampling import TokenSampler

VOCAB = 8
STOPS = [0, 1]
HISTORY = [2, 5, 5, 7]  # the text before the verify forward, seen by the repetition penalty
DRAFT = [5, 3, 6]
# Logits of the k + 1 rows, chosen so that each drafted token has a middling probability after processing.
ROWS = torch.tensor([
    [1.5, 0.2, 0.8, 0.5, -0.4, 2.0, 0.1, 1.2],
    [0.9, 0.3, 0.2, 1.6, 1.1, -0.3, 0.6, 0.4],
    [0.4, 1.4, 0.9, 1.2, 0.2, 0.7, 1.5, -1.0],
    [1.0, 0.5, 1.3, -0.2, 0.8, 1.1, 0.3, 0.6],
])
CASES = {
    "temperature": SamplingSettings(temperature=0.9, top_p=1.0, top_k=0, repetition_penalty=1.0),
    "penalty, top-k, top-p, stops suppressed": SamplingSettings(temperature=0.8, top_p=0.9, top_k=6,
                                                                 repetition_penalty=1.4),
}
SUPPRESSED = {"temperature": 0, "penalty, top-k, top-p, stops suppressed": 2}
DRAWS = 3000
FALSE_ALARM = 1e-6  # the chance that a correct sampler fails the chi-square check


def _reference_distribution(settings: SamplingSettings, suppressed: int) -> list[torch.Tensor]:
    """Each row's p as plain sampling forms it: transformers' processors over the text so far and the drafts before it."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(settings.top_p))
    distributions = []
    for index, row in enumerate(ROWS):
        scores = row.clone().view(1, -1)
        if index < suppressed:
            scores[0, STOPS] = float("-inf")
        scores = processors(torch.tensor([HISTORY + DRAFT[:index]]), scores)
        distributions.append(torch.softmax(scores, dim=-1)[0].double())
    return distributions


def _outcome_probabilities(settings: SamplingSettings, suppressed: int) -> dict[tuple[int, ...], float]:
    """P(settled tokens) of plain sampling, for every possible outcome: draft[:m] then a token other than draft[m]
    (or any token after the whole draft)."""
    p = _reference_distribution(settings, suppressed)
    outcomes: dict[tuple[int, ...], float] = {}
    prefix = 1.0
    for m in range(len(DRAFT) + 1):
        for token in range(VOCAB):
            if m < len(DRAFT) and token == DRAFT[m]:
                continue
            probability = prefix * float(p[m][token])
            if probability > 0:
                outcomes[(*DRAFT[:m], token)] = probability
        if m < len(DRAFT):
            prefix *= float(p[m][DRAFT[m]])
    return outcomes


def _draw(settings: SamplingSettings, suppressed: int, draws: int, seed: int = 0) -> Counter[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(seed)
    counts: Counter[tuple[int, ...]] = Counter()
    draft = torch.tensor(DRAFT)
    for _ in range(draws):
        sampler = TokenSampler(settings, VOCAB, torch.device("cpu"), torch.tensor(STOPS), generator)
        sampler.observe(torch.tensor([HISTORY]))
        outcome = sampler.speculate(ROWS.clone(), draft, suppressed).tolist()
        counts[tuple(outcome[1 : outcome[0] + 2])] += 1
    return counts


def _chi_square_critical(degrees: int, alpha: float) -> float:
    """The chi-square value exceeded with probability alpha (bisection on the survival function Q(k/2, x/2))."""
    low, high = 0.0, 10.0 * degrees + 200.0
    for _ in range(200):
        middle = (low + high) / 2
        survival = float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                                 torch.tensor(middle / 2, dtype=torch.float64)))
        low, high = (middle, high) if survival > alpha else (low, middle)
    return high


def _chi_square(counts: Counter[tuple[int, ...]], expected: dict[tuple[int, ...], float], draws: int) -> tuple[float, int, int]:
    """(statistic, degrees of freedom, draws outside the support). Outcomes expected fewer than 5 times are pooled."""
    impossible = sum(count for outcome, count in counts.items() if outcome not in expected)
    cells: list[tuple[float, int]] = []
    pooled_expected, pooled_count = 0.0, 0
    for outcome, probability in expected.items():
        if probability * draws >= 5:
            cells.append((probability * draws, counts.get(outcome, 0)))
        else:
            pooled_expected += probability * draws
            pooled_count += counts.get(outcome, 0)
    if pooled_expected > 0:
        cells.append((pooled_expected, pooled_count))
    statistic = sum((count - mean) ** 2 / mean for mean, count in cells)
    return statistic, len(cells) - 1, impossible


def _check(settings: SamplingSettings, suppressed: int) -> tuple[bool, str]:
    expected = _outcome_probabilities(settings, suppressed)
    assert abs(sum(expected.values()) - 1) < 1e-6  # float32 softmax
    counts = _draw(settings, suppressed, DRAWS)
    statistic, degrees, impossible = _chi_square(counts, expected, DRAWS)
    critical = _chi_square_critical(degrees, FALSE_ALARM)
    detail = f"chi-square {statistic:.1f} on {degrees} degrees (bound {critical:.1f}), {impossible} impossible draws"
    return impossible == 0 and statistic <= critical, detail


@contextmanager
def _mutant(name: str, replacement: Callable[..., object]) -> Iterator[None]:
    original = getattr(sampling, name)
    setattr(sampling, name, replacement)
    try:
        yield
    finally:
        setattr(sampling, name, original)


def test_the_reference_drafts_have_middling_probabilities() -> None:
    # The check has power only if drafts are neither always nor never accepted.
    for settings in CASES.values():
        p = _reference_distribution(settings, 0)
        for index, token in enumerate(DRAFT):
            assert 0.1 < float(p[index][token]) < 0.8


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_matches_plain_sampling_exactly(case: str) -> None:
    passed, detail = _check(CASES[case], SUPPRESSED[case])
    assert passed, detail


@pytest.mark.parametrize("case", list(CASES))
def test_a_sampler_that_always_accepts_drafts_fails_the_check(case: str) -> None:
    with _mutant("_accept_drafts", lambda at_draft, uniforms: torch.ones_like(at_draft, dtype=torch.bool)):
        passed, detail = _check(CASES[case], SUPPRESSED[case])
    assert not passed, detail


@pytest.mark.parametrize("case", list(CASES))
def test_a_sampler_that_draws_the_rejection_from_p_with_the_draft_left_in_fails_the_check(case: str) -> None:
    with _mutant("_rejection_distribution", lambda probabilities, drafted: None):
        passed, detail = _check(CASES[case], SUPPRESSED[case])
    assert not passed, detail


def test_greedy_settles_the_argmaxes_while_they_are_the_draft() -> None:
    settings = SamplingSettings(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    sampler = TokenSampler(settings, VOCAB, torch.device("cpu"), torch.tensor(STOPS))
    rows = torch.zeros((4, VOCAB))
    rows[0, 5] = rows[1, 3] = rows[2, 2] = rows[3, 4] = 1.0  # argmaxes 5, 3, 2, 4 against the draft 5, 3, 6
    assert sampler.speculate(rows, torch.tensor(DRAFT)).tolist()[:4] == [2, 5, 3, 2]
    rows[2, 6] = 2.0  # the whole draft is the argmax: the bonus token is the last row's
    assert sampler.speculate(rows, torch.tensor(DRAFT)).tolist() == [3, 5, 3, 6, 4]
    rows[0, 0] = 3.0  # a stop beats the draft, but the first row cannot choose a stop: the draft is accepted
    assert sampler.speculate(rows.clone(), torch.tensor(DRAFT), suppressed=1).tolist()[:2] == [3, 5]
    assert sampler.speculate(rows, torch.tensor(DRAFT)).tolist()[:2] == [0, 0]


def test_the_settled_tokens_are_marked_for_the_repetition_penalty_and_the_rejected_ones_are_not() -> None:
    settings = SamplingSettings(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.5)
    sampler = TokenSampler(settings, VOCAB, torch.device("cpu"), torch.tensor(STOPS))
    rows = torch.zeros((4, VOCAB))
    rows[0, 5] = rows[1, 4] = 1.0  # the draft's 5 is accepted, its 3 rejected for 4
    assert sampler.speculate(rows, torch.tensor(DRAFT)).tolist()[:3] == [1, 5, 4]
    assert sampler._seen is not None
    assert sampler._seen[0, :VOCAB].nonzero().view(-1).tolist() == [4, 5]


def test_the_penalty_of_each_row_counts_the_drafts_before_it() -> None:
    # Row 1 prefers 5 only if the drafted 5 before it is not penalised: the penalty must see it and pick 3.
    settings = SamplingSettings(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=2.0)
    sampler = TokenSampler(settings, VOCAB, torch.device("cpu"), torch.tensor(STOPS))
    rows = torch.zeros((4, VOCAB))
    rows[0, 5] = 1.0
    rows[1, 5], rows[1, 3] = 1.0, 0.8  # 1.0 / 2 < 0.8 once 5 is in the text
    assert sampler.speculate(rows, torch.tensor(DRAFT)).tolist()[:3] == [2, 5, 3]


def test_seeded_speculation_is_reproducible() -> None:
    settings = CASES["penalty, top-k, top-p, stops suppressed"]
    assert _draw(settings, 1, 50, seed=3) == _draw(settings, 1, 50, seed=3)


def test_a_drafted_stop_is_never_accepted_where_stops_are_suppressed_and_sometimes_elsewhere() -> None:
    settings = CASES["temperature"]
    generator = torch.Generator().manual_seed(0)
    rows = torch.zeros((3, VOCAB))
    rows[:, STOPS[0]] = 1.0  # the stop is the likeliest token of every row
    accepted = {0: Counter(), 1: Counter()}  # type: dict[int, Counter[int]]
    for suppressed in (0, 1):
        for _ in range(200):
            sampler = TokenSampler(settings, VOCAB, torch.device("cpu"), torch.tensor(STOPS), generator)
            outcome = sampler.speculate(rows.clone(), torch.tensor([STOPS[0], 4]), suppressed).tolist()
            accepted[suppressed][outcome[0]] += 1
            if suppressed:
                assert outcome[1] != STOPS[0] and outcome[1] not in STOPS  # the first row cannot choose a stop
    assert set(accepted[1]) == {0}
    assert accepted[0][0] < 200  # without suppression the drafted stop is kept at times (p = e / (e + 7) each)
