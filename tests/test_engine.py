"""ChatEngine on a tiny random BlueLM (float32, CPU): cache reuse, stops, context handling, threads, sampling."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.local.engine import ChatEngine, GenerationStream, StepRunner
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.core.prompt import ContextOverflowError, HistoryTurn, PromptIds, PromptPlan, build_prompt_ids
from bluelm_cli.core.settings import SamplingSettings
from helpers import plan, start
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

GREEDY = SamplingSettings(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)
TIMEOUT_S = 20.0

MESSAGES = [
    "你好",
    "Hello, who are you?",
    "请介绍一下你自己。",
    "What is the capital of France?",
    "中国的首都是哪里？",
    "写一首关于春天的诗。",
    "Translate 'good morning' into Chinese.",
    "1 + 2 = ?",
    "Compute 12345 * 678.",
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们一起去公园散步吧。",
    "def add(a, b): return a + b",
    "Thank you very much! 谢谢你的帮助。",
    "春眠不觉晓，处处闻啼鸟。",
    "How do I reverse a list in Python?",
    "Once upon a time, there was a little robot.",
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_checkpoint(Path(tmp_path_factory.mktemp("tiny")), TinySpec())
    return load_model(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def loaded_small(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_checkpoint(Path(tmp_path_factory.mktemp("tiny256")), TinySpec(max_position_embeddings=256))
    return load_model(str(folder), device="cpu", dtype="float32")


# --------------------------------------------------------------------------------------------- helpers
class ScriptedRunner(StepRunner):
    """Counts steps and can force a token at an answer position or raise there.

    Step 0 is the prefill (its logits give answer token 0); step i is the i-th decode call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        force: dict[int, int] | None = None,
        raise_at: int | None = None,
        delay_s: float = 0.0,
    ) -> None:
        super().__init__(model)
        self.force = dict(force or {})
        self.raise_at = raise_at
        self.delay_s = delay_s
        self.step = 0
        self._decoding = False
        self.decode_started: list[float] = []

    def _edit(self, logits: torch.Tensor) -> torch.Tensor:
        if self.raise_at is not None and self.step == self.raise_at:
            raise RuntimeError(f"boom at step {self.step}")
        token = self.force.get(self.step)
        if token is not None:
            logits = logits.clone()
            logits[..., token] = logits.max() + 100.0
        return logits

    def prefill(self, cache, ids, start):  # type: ignore[no-untyped-def]
        if self._decoding:  # StepRunner.decode is implemented with prefill
            return super().prefill(cache, ids, start)
        self.step = 0
        return self._edit(super().prefill(cache, ids, start))

    def decode(self, cache, token, position):  # type: ignore[no-untyped-def]
        self.decode_started.append(time.perf_counter())
        if self.delay_s:
            time.sleep(self.delay_s)
        self.step += 1
        self._decoding = True
        try:
            logits = super().decode(cache, token, position)
        finally:
            self._decoding = False
        return self._edit(logits)


def encode_prompt(engine: ChatEngine, system: str | None, history: list[HistoryTurn], message: str) -> PromptIds:
    return build_prompt_ids(engine.encoder, system, history, message)


def run(engine: ChatEngine, system: str | None, history: list[HistoryTurn], message: str,
        settings: SamplingSettings = GREEDY, **kwargs: int) -> tuple[AnswerResult, str]:
    stream = start(engine, system, history, message, settings, **kwargs)
    deltas = "".join(stream)
    assert stream.result is not None
    return stream.result, deltas


def fresh(loaded: LoadedModel, system: str | None, history: list[HistoryTurn], message: str,
          settings: SamplingSettings = GREEDY) -> AnswerResult:
    """The same turn on a new engine: the whole conversation encoded from scratch."""
    result, _ = run(ChatEngine(loaded), system, history, message, settings)
    assert result.reused_tokens == 0
    return result


def check_text(engine: ChatEngine, result: AnswerResult, deltas: str) -> None:
    assert deltas == result.text == engine.tokenizer.decode(result.answer_ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ cache reuse
def test_sixteen_turns_with_cache_reuse_equal_reencoding(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    reference = ChatEngine(loaded)
    system = "You are a helpful assistant."
    history: list[HistoryTurn] = []
    retokenized_differs = False
    for turn, message in enumerate(MESSAGES, start=1):
        cached_before = len(engine.cached_ids)
        result, deltas = run(engine, system, history, message)
        reference.reset()
        expected, _ = run(reference, system, history, message)
        assert result.answer_ids == expected.answer_ids, f"turn {turn}"
        assert result.finish_reason == expected.finish_reason
        assert all(0 <= token < engine.tokenizer.sp_model.get_piece_size() for token in result.answer_ids)
        check_text(engine, result, deltas)
        prompt_ids = plan(engine, system, history, message, GREEDY.max_new_tokens).ids
        assert result.prompt_tokens == len(prompt_ids)
        if turn == 1:
            assert result.reused_tokens == 0
        else:
            # Everything cached from the previous turn is reused; only the new suffix is prefilled.
            assert result.reused_tokens == cached_before
            assert result.prefill_tokens == result.prompt_tokens - cached_before
            previous = history[-1]
            assert cached_before >= previous_prompt + len(previous.answer_ids) - 1
        assert expected.reused_tokens == 0 and expected.prefill_tokens == expected.prompt_tokens
        previous_prompt = result.prompt_tokens
        retokenized_differs |= engine.tokenizer.encode_plain(result.text) != result.answer_ids
        history.append(HistoryTurn(message, result.answer_ids))
    # The answers' ids are kept as generated: re-tokenizing their text would have given other ids,
    # and then the cache could not have been reused.
    assert retokenized_differs
    # An oracle independent of the engine's cache: transformers' generate() on the whole last prompt.
    assert len(engine.cached_ids) > 256  # the cache buffers grew at least once
    last = history.pop()
    ids = plan(engine, system, history, last.user, GREEDY.max_new_tokens).ids
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                    eos_token_id=[2, 4], pad_token_id=3)
    assert list(last.answer_ids) == [t for t in out[0, len(ids):].tolist() if t not in (2, 3, 4)]


def test_prompt_holds_answer_ids_verbatim(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    first, _ = run(engine, None, [], MESSAGES[0])
    history = [HistoryTurn(MESSAGES[0], first.answer_ids)]
    ids = plan(engine, None, history, MESSAGES[1], GREEDY.max_new_tokens).ids
    start = first.prompt_tokens
    assert ids[:start] == plan(engine, None, [], MESSAGES[0], GREEDY.max_new_tokens).ids
    assert ids[start : start + len(first.answer_ids)] == first.answer_ids
    assert ids[start + len(first.answer_ids)] == engine.tokenizer.eos_token_id
    second, _ = run(engine, None, history, MESSAGES[1])
    assert second.reused_tokens == start + len(first.answer_ids) - 1  # length stop: last token never ran


def _conversation(engine: ChatEngine, system: str | None, count: int) -> list[HistoryTurn]:
    history: list[HistoryTurn] = []
    for message in MESSAGES[:count]:
        result, _ = run(engine, system, history, message)
        history.append(HistoryTurn(message, result.answer_ids))
    return history


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("kind", ["undo", "retry", "system", "edit"])
def test_divergence_crops_to_common_prefix(loaded: LoadedModel, kind: str) -> None:
    engine = ChatEngine(loaded)
    history = _conversation(engine, "SYS", 4)
    system, message = "SYS", MESSAGES[10]
    if kind == "undo":  # drop the last turn and say something else
        history = history[:-1]
    elif kind == "retry":  # the last message again, its answer discarded
        history, message = history[:-1], MESSAGES[3]
    elif kind == "system":
        system = "Another system prompt."
    else:  # an earlier user message edited
        history = [history[0], replace(history[1], user="edited"), *history[2:]]
    cached = list(engine._cached_ids)
    ids = plan(engine, system, history, message, GREEDY.max_new_tokens).ids
    result, _ = run(engine, system, history, message)
    assert result.reused_tokens == min(_common_prefix(cached, ids), len(ids) - 1)
    assert result.reused_tokens < len(cached)
    assert result.prefill_tokens == len(ids) - result.reused_tokens
    assert result.answer_ids == fresh(loaded, system, history, message).answer_ids
    # And the conversation goes on consistently from there.
    history = [*history, HistoryTurn(message, result.answer_ids)]
    after, _ = run(engine, system, history, MESSAGES[11])
    assert after.reused_tokens > 0
    assert after.answer_ids == fresh(loaded, system, history, MESSAGES[11]).answer_ids


def test_retry_of_identical_prompt_reuses_all_but_one_token(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    first, _ = run(engine, None, [], "hello")
    again, _ = run(engine, None, [], "hello")
    assert again.reused_tokens == first.prompt_tokens - 1 and again.prefill_tokens == 1
    assert again.answer_ids == first.answer_ids


def test_reset_forgets_the_cache(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    run(engine, None, [], "hello")
    assert len(engine.cached_ids) > 0
    engine.reset()
    assert len(engine.cached_ids) == 0
    result, _ = run(engine, None, [], "hello")
    assert result.reused_tokens == 0


# ------------------------------------------------------------------------------------------------ stops
def test_stops_at_eos(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded, ScriptedRunner(loaded.model, force={3: loaded.tokenizer.eos_token_id}))
    settings = replace(GREEDY, max_new_tokens=20)
    result, deltas = run(engine, None, [], "hello", settings)
    assert result.finish_reason == FinishReason.STOP
    assert len(result.answer_ids) == 3 and result.new_tokens == 3
    assert loaded.tokenizer.eos_token_id not in result.answer_ids
    check_text(engine, result, deltas)
    # The </s> was read too (the next forward is queued before the host sees the token): the cache holds it.
    assert engine.cached_ids == (*engine.cached_ids[: result.prompt_tokens], *result.answer_ids, loaded.tokenizer.eos_token_id)
    assert result.context_tokens == len(engine.cached_ids) == result.prompt_tokens + 3 + 1
    # The next turn continues from the whole answer, and still equals a fresh encoding.
    history = [HistoryTurn("hello", result.answer_ids)]
    engine.runner.force = {}
    after, _ = run(engine, None, history, "again")
    assert after.reused_tokens == result.prompt_tokens + 3 + 1  # the answer's closing </s> included
    assert after.answer_ids == fresh(loaded, None, history, "again").answer_ids


def test_stops_at_max_new_tokens(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    result, _ = run(engine, None, [], "hello", replace(GREEDY, max_new_tokens=5))
    assert result.finish_reason == FinishReason.LENGTH
    assert result.new_tokens == 5 == len(result.answer_ids)


def test_stops_when_the_model_starts_a_human_turn(loaded: LoadedModel) -> None:
    human = loaded.tokenizer.sp_model.piece_to_id("[|Human|]:")
    engine = ChatEngine(loaded, ScriptedRunner(loaded.model, force={2: human}))
    result, deltas = run(engine, None, [], "hello", replace(GREEDY, max_new_tokens=20))
    assert result.finish_reason == FinishReason.STOP
    assert len(result.answer_ids) == 2 and human not in result.answer_ids
    assert "[|Human|]:" not in result.text
    check_text(engine, result, deltas)


def test_min_new_tokens_suppresses_the_stops(loaded: LoadedModel) -> None:
    eos = loaded.tokenizer.eos_token_id
    human = loaded.tokenizer.sp_model.piece_to_id("[|Human|]:")
    engine = ChatEngine(loaded, ScriptedRunner(loaded.model, force={1: eos, 4: human, 9: eos}))
    result, _ = run(engine, None, [], "hello", replace(GREEDY, max_new_tokens=20), min_new_tokens=6)
    assert result.finish_reason == FinishReason.STOP
    assert len(result.answer_ids) == 9 and eos not in result.answer_ids and human not in result.answer_ids
    stream = engine.stream(plan(engine, None, [], "x", 12), replace(GREEDY, max_new_tokens=12), min_new_tokens=12)
    assert stream.finish().new_tokens == 12


def test_stops_at_the_context_limit(loaded: LoadedModel) -> None:
    # plan() always leaves room for max_new_tokens, so only a plan made for a larger window reaches the end.
    engine = ChatEngine(loaded)
    ids = plan(engine, None, [], "hello", 10).ids
    engine.context_limit = len(ids) + 4
    stream = GenerationStream(engine, PromptPlan(ids), replace(GREEDY, max_new_tokens=10))
    result = stream.finish()
    assert result.finish_reason == FinishReason.CONTEXT
    assert result.new_tokens == 4
    assert result.answer_ids == fresh(loaded, None, [], "hello", replace(GREEDY, max_new_tokens=4)).answer_ids


# ---------------------------------------------------------------------------------------- context window
def _long_history(engine: ChatEngine, turns: int) -> list[HistoryTurn]:
    answer = engine.tokenizer.encode_plain("The capital of France is Paris. 中国的首都是北京。")
    return [HistoryTurn(f"Question {n}: the quick brown fox jumps over the lazy dog.", answer) for n in range(turns)]


@pytest.mark.parametrize("system", [None, "You are helpful."])
def test_drops_oldest_whole_turns_to_fit(loaded_small: LoadedModel, system: str | None) -> None:
    engine = ChatEngine(loaded_small)
    assert engine.context_limit == 256
    history = _long_history(engine, 8)
    message = "What did I ask first?"
    settings = replace(GREEDY, max_new_tokens=16)
    full = encode_prompt(engine, system, history, message).ids
    assert len(full) + 16 > 256
    fewest = next(
        d for d in range(len(history) + 1) if len(encode_prompt(engine, system, history[d:], message).ids) + 16 <= 256
    )
    # Turns go in one block holding at least half the history's tokens (core.prompt.DROP_BLOCK_FRACTION).
    full_prompt = encode_prompt(engine, system, history, message)
    bounds = [*full_prompt.turn_starts, full_prompt.message_start]
    half = (bounds[-1] - bounds[0]) / 2
    expected_dropped = next(d for d in range(fewest, len(history) + 1) if bounds[d] - bounds[0] >= half)
    assert 0 < fewest <= expected_dropped < len(history)
    assert plan(engine, system, history, message, 16).dropped_turns == expected_dropped
    result, _ = run(engine, system, history, message, settings)
    kept = history[expected_dropped:]
    assert result.prompt_tokens == len(encode_prompt(engine, system, kept, message).ids)
    assert result.prompt_tokens + 16 <= 256
    assert plan(engine, system, kept, message, 16).dropped_turns == 0
    reference = fresh(loaded_small, system, kept, message, settings)
    assert result.answer_ids == reference.answer_ids


def test_message_that_cannot_fit_raises_with_counts(loaded_small: LoadedModel) -> None:
    engine = ChatEngine(loaded_small)
    message = "the quick brown fox jumps over the lazy dog " * 30
    tokens = engine.count_tokens(message)
    assert tokens > 256
    with pytest.raises(ContextOverflowError) as caught:
        start(engine, None, _long_history(engine, 2), message, replace(GREEDY, max_new_tokens=16))
    error = caught.value
    assert error.message_tokens == tokens
    assert 0 < error.fits < 256 - 16
    assert str(tokens) in str(error) and str(error.fits) in str(error)
    with pytest.raises(ContextOverflowError):
        engine.stream(PromptPlan(list(range(250))), replace(GREEDY, max_new_tokens=16))
    assert len(engine.cached_ids) == 0  # nothing started


# ------------------------------------------------------------------------------------------------ threads
def test_stop_from_another_thread(loaded: LoadedModel) -> None:
    runner = ScriptedRunner(loaded.model, delay_s=0.02)
    engine = ChatEngine(loaded, runner)
    settings = replace(GREEDY, max_new_tokens=200)
    stream = start(engine, None, [], "tell me a long story", settings)
    stopped_at: list[float] = []

    def stopper() -> None:
        stopped_at.append(time.perf_counter())
        stream.stop()

    deltas = []
    for delta in stream:
        deltas.append(delta)
        if len(deltas) == 5 and not stopped_at:
            thread = threading.Thread(target=stopper)
            thread.start()
            thread.join()
    result = stream.result
    assert result is not None
    assert result.finish_reason == FinishReason.INTERRUPTED
    assert 5 <= len(result.answer_ids) < 200
    # Within one step: at most the decode call already under way when stop() came.
    assert sum(started > stopped_at[0] for started in runner.decode_started) <= 1
    check_text(engine, result, "".join(deltas))
    # The partial answer goes into history and the cache stays consistent with it.
    history = [HistoryTurn("tell me a long story", result.answer_ids)]
    runner.delay_s = 0.0
    after, _ = run(engine, None, history, "go on")
    assert after.reused_tokens >= result.prompt_tokens + len(result.answer_ids) - 1
    assert after.answer_ids == fresh(loaded, None, history, "go on").answer_ids


def test_stop_then_finish_returns_the_partial_answer(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded, ScriptedRunner(loaded.model, delay_s=0.01))
    stream = start(engine, None, [], "hello", replace(GREEDY, max_new_tokens=500))
    next(iter(stream))  # the answer has begun (its first text came), not a pause that hopes it has
    stream.stop()
    result = stream.finish()
    assert result.finish_reason == FinishReason.INTERRUPTED
    assert len(result.answer_ids) < 500


def _consume_with_timeout(stream: GenerationStream) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def consume() -> None:
        try:
            for _ in stream:
                pass
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001
            outcome.append(error)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "the stream hung"
    return outcome[0]


@pytest.mark.parametrize("step", [0, 3])
def test_worker_exception_reaches_the_caller(loaded: LoadedModel, step: int) -> None:
    runner = ScriptedRunner(loaded.model, raise_at=step)
    engine = ChatEngine(loaded, runner)
    error = _consume_with_timeout(start(engine, None, [], "hello", replace(GREEDY, max_new_tokens=10)))
    assert isinstance(error, RuntimeError) and f"boom at step {step}" in str(error)
    # The engine is usable afterwards, from a clean cache.
    runner.raise_at = None
    result, _ = run(engine, None, [], "hello")
    assert result.reused_tokens == 0
    assert result.answer_ids == fresh(loaded, None, [], "hello").answer_ids


def test_an_item_lost_to_an_interrupt_does_not_hang_the_stream(loaded: LoadedModel) -> None:
    """A Ctrl-C between the queue handing over an item and the stream handling it loses that item; if it
    was the end of the stream, draining must still end (it used to wait forever)."""
    engine = ChatEngine(loaded)
    stream = start(engine, None, [], "hello", replace(GREEDY, max_new_tokens=6))
    stream._thread.join(TIMEOUT_S)
    while True:  # every item, the final "done" included, taken as an interrupt would take it
        try:
            stream._queue.get_nowait()
        except Exception:  # noqa: BLE001 - queue.Empty
            break
    assert _consume_with_timeout(stream) is None
    assert stream.result is not None and stream.result.new_tokens > 0


# ----------------------------------------------------------------------------------------------- sampling
SAMPLED = SamplingSettings(max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=7)


def test_seeded_sampling_is_reproducible(loaded: LoadedModel) -> None:
    settings = replace(SAMPLED, temperature=0.9, top_p=0.95, seed=1234)
    first = fresh(loaded, None, [], "hello", settings)
    engine = ChatEngine(loaded)
    run(engine, None, [], "something else")
    second, _ = run(engine, None, [], "hello", settings)  # reusing a cropped cache changes nothing
    assert first.answer_ids == second.answer_ids
    other = fresh(loaded, None, [], "hello", replace(settings, seed=4321))
    assert other.answer_ids != first.answer_ids
    greedy = fresh(loaded, None, [], "hello", replace(GREEDY, max_new_tokens=24))
    assert first.answer_ids != greedy.answer_ids


@pytest.mark.parametrize(
    "change",
    [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4), dict(top_k=1, temperature=2.0, top_p=0.5)],
)
def test_warpers_that_leave_one_token_equal_greedy(loaded: LoadedModel, change: dict) -> None:
    greedy = fresh(loaded, None, [], "hello", replace(GREEDY, max_new_tokens=24))
    sampled = fresh(loaded, None, [], "hello", replace(SAMPLED, **change))
    assert sampled.answer_ids == greedy.answer_ids


def test_top_k_limits_choices(loaded: LoadedModel) -> None:
    # With top_k=2, every sampled token is one of the two best under the model at that point.
    engine = ChatEngine(loaded)
    result = fresh(loaded, None, [], "hello", replace(SAMPLED, top_k=2, temperature=2.0, max_new_tokens=12))
    ids = plan(engine, None, [], "hello", 12).ids
    # An empty or one-token answer would prove nothing: the seed gives a full-length answer.
    assert len(result.answer_ids) == 12 and result.finish_reason is FinishReason.LENGTH
    with torch.inference_mode():
        for index, token in enumerate(result.answer_ids):
            context = torch.tensor([ids + result.answer_ids[:index]])
            logits = loaded.model(input_ids=context).logits[0, -1]
            assert token in logits.topk(2).indices.tolist()


def test_repetition_penalty_matches_generate(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    human = loaded.tokenizer.sp_model.piece_to_id("[|Human|]:")
    for penalty in (1.0, 1.3):
        settings = replace(GREEDY, max_new_tokens=30, repetition_penalty=penalty)
        result, _ = run(engine, None, [], "hello", settings)
        ids = plan(engine, None, [], "hello", 30).ids
        with torch.inference_mode():
            out = loaded.model.generate(
                torch.tensor([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=penalty,
                eos_token_id=[loaded.tokenizer.eos_token_id, human], pad_token_id=3,
            )
        expected = [t for t in out[0, len(ids):].tolist() if t not in (loaded.tokenizer.eos_token_id, human, 3)]
        assert result.answer_ids == expected
    plain = fresh(loaded, None, [], "hello", replace(GREEDY, max_new_tokens=30))
    penalized = fresh(loaded, None, [], "hello", replace(GREEDY, max_new_tokens=30, repetition_penalty=1.3))
    assert plain.answer_ids != penalized.answer_ids


def test_never_generates_ids_past_the_tokenizer(loaded: LoadedModel) -> None:
    pieces = loaded.tokenizer.sp_model.get_piece_size()
    assert loaded.model.config.vocab_size > pieces
    engine = ChatEngine(loaded)
    for seed in range(3):
        settings = replace(SAMPLED, temperature=2.0, max_new_tokens=40, seed=seed)
        result, deltas = run(engine, None, [], f"hello {seed}", settings)
        assert all(0 <= token < pieces for token in result.answer_ids)
        check_text(engine, result, deltas)


def test_deltas_concatenate_to_the_text(loaded: LoadedModel) -> None:
    engine = ChatEngine(loaded)
    history: list[HistoryTurn] = []
    for turn, message in enumerate(["写一首诗", "emoji 😀 and 龘", "more"]):
        settings = replace(SAMPLED, temperature=1.5, max_new_tokens=30, seed=turn)
        result, deltas = run(engine, None, history, message, settings)
        check_text(engine, result, deltas)
        assert "\ufffd" not in deltas or "\ufffd" in result.text
        history.append(HistoryTurn(message, result.answer_ids))


# ---------------------------------------------------------------------------------------------- bench
def test_bench_smoke_on_random_weights() -> None:
    from bluelm_cli.bench.local import format_report, random_weights_model, run_bench

    shapes = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)
    loaded = random_weights_model(shapes, "cpu", torch.float32)
    assert loaded.context_length == 512 and loaded.model.config.tokenizer_vocab_size == 600
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    report = run_bench(ChatEngine(loaded), prompt_tokens=40, new_tokens=5, turns=3, baseline=True)
    assert [r.new_tokens for r in report.turns] == [5, 5, 5] == [r.new_tokens for r in report.baseline]
    assert report.turns[0].reused_tokens == 0 and report.turns[0].context_tokens >= 40
    for previous, record in zip(report.turns, report.turns[1:]):
        assert record.reused_tokens == previous.context_tokens + previous.new_tokens - 1
        assert record.prefill_tokens == record.context_tokens - record.reused_tokens
    assert [r.context_tokens for r in report.turns] == [r.context_tokens for r in report.baseline]
    assert report.answers_match is True
    assert set(report.ratios) >= {"engine_ttft_last_over_first", "generate_ttft_last_over_first",
                                  "engine_decode_over_generate"}
    assert report.peak_gpu_mem_gb is None and report.peak_host_mem_gb > 0
    table = format_report(report)
    assert "decode tok/s, engine / generate()" in table and len(table.splitlines()) > 10


def test_cache_grows_in_place_and_never_past_the_context(loaded_small: LoadedModel) -> None:
    engine = ChatEngine(loaded_small)
    history = _long_history(engine, 4)
    result, _ = run(engine, None, history, "hello", replace(GREEDY, max_new_tokens=16))
    layers = engine._cache.layers
    assert all(type(layer).__name__ == "_GrowingLayer" for layer in layers)
    for layer in layers:
        assert layer.keys.shape[-2] == len(engine.cached_ids)
        assert layer._key_buffer.shape[-2] <= engine.context_limit == 256
        assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # a view, not a copy
    assert result.answer_ids == fresh(loaded_small, None, history, "hello", replace(GREEDY, max_new_tokens=16)).answer_ids
