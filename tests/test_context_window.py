"""A full context window on tiny checkpoints: turns dropped in one block (exact, and cheap on average), and the
opt-in context shift (kept keys re-rotated to their new positions, no re-prefill) on the 2K RoPE and on
BlueLM-32K's ntkmixed frequencies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.core.prompt import HistoryTurn, PromptPlan, fit_prompt
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.context_shift import MIN_SHIFT_TOKENS, find_shift, rerotate
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.fastpath import GraphRunner
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.modeling.modeling_bluelm import BlueLMRotaryEmbedding, apply_rotary_pos_emb
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

NEW_TOKENS = 8
GREEDY = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)
NTKMIXED = {"type": "ntkmixed", "factor": 4.0, "power": 0.25}


@pytest.fixture(scope="module")
def loaded_256(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_checkpoint(Path(tmp_path_factory.mktemp("ctx256")), TinySpec(max_position_embeddings=256))
    return load_model(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def loaded_ntkmixed(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    # 64 positions × factor 4: a 256-token window with BlueLM-32K's frequencies.
    spec = TinySpec(max_position_embeddings=64, rope_scaling=NTKMIXED)
    folder = build_checkpoint(Path(tmp_path_factory.mktemp("ntk")), spec)
    return load_model(str(folder), device="cpu", dtype="float32")


def answer(engine: ChatEngine, plan: PromptPlan) -> AnswerResult:
    stream = engine.stream(plan, GREEDY, min_new_tokens=NEW_TOKENS)
    return stream.finish()


def converse(engine: ChatEngine, turns: int, *, drop_fraction: float | None = None):
    """A conversation of short messages past the window; yields (plan, result) per turn."""
    history: list[HistoryTurn] = []
    extra = {} if drop_fraction is None else {"drop_fraction": drop_fraction}
    for number in range(turns):
        message = f"Question {number}: the quick brown fox jumps."
        plan = fit_prompt(engine.encoder, None, history, message, context_limit=engine.context_limit,
                          max_new_tokens=NEW_TOKENS, **extra)
        result = answer(engine, plan)
        yield plan, result
        history = [*history[plan.dropped_turns :], HistoryTurn(message, result.answer_ids)]


# ------------------------------------------------------------------------------------- the block drop
def test_after_the_window_fills_a_turn_prefills_within_5x_a_normal_turn_and_answers_as_a_fresh_prefill(
    loaded_256: LoadedModel,
) -> None:
    engine = ChatEngine(loaded_256)
    records = list(converse(engine, 40))
    first_drop = next(index for index, (plan, _) in enumerate(records) if plan.dropped_turns)
    assert first_drop < 20 and sum(1 for plan, _ in records if plan.dropped_turns) >= 2  # the window filled repeatedly
    normal = sorted(result.prefill_tokens for _, result in records[1:first_drop])[first_drop // 2]
    after = [result.prefill_tokens for _, result in records[first_drop:]]
    assert sum(after) / len(after) <= 5 * normal, (normal, after)
    for plan, result in records:
        if plan.dropped_turns:  # the turn that re-prefilled: exactly a fresh prefill of the kept text
            assert result.answer_ids == answer(ChatEngine(loaded_256), plan).answer_ids
    assert all(result.forwards == NEW_TOKENS for _, result in records)  # a prefill, then one per further token


def test_dropping_only_the_turns_needed_re_prefills_every_turn(loaded_256: LoadedModel) -> None:
    """The old policy, for contrast: the measure above fails without the block."""
    records = list(converse(ChatEngine(loaded_256), 30, drop_fraction=0))
    first_drop = next(index for index, (plan, _) in enumerate(records) if plan.dropped_turns)
    normal = sorted(result.prefill_tokens for _, result in records[1:first_drop])[first_drop // 2]
    after = [result.prefill_tokens for _, result in records[first_drop:]]
    assert sum(after) / len(after) > 5 * normal


# ------------------------------------------------------------------------------------ re-rotated keys
def test_find_shift_locates_the_kept_turns_later_in_the_cache() -> None:
    kept = list(range(100, 100 + 2 * MIN_SHIFT_TOKENS))
    cached = [1, 7, 7, 7, 5, 6, *kept, 9]
    assert find_shift(cached, [1, *kept, 42], 1) == (6, len(kept))
    assert find_shift(cached, [1, 2, 3], 1) is None  # nothing long enough matches


@pytest.mark.parametrize("rope_scaling", [None, NTKMIXED], ids=["2k-default", "32k-ntkmixed"])
def test_rerotating_a_rotated_key_equals_rotating_it_at_the_new_position(rope_scaling: dict | None) -> None:
    from bluelm_cli.modeling import BlueLMConfig

    fields = dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1,
                  intermediate_size=8, vocab_size=64, max_position_embeddings=2048)
    if rope_scaling:
        fields["rope_scaling"] = dict(rope_scaling, factor=16.0)  # 32K positions, as BlueLM-7B-Chat-32K
    rotary = BlueLMRotaryEmbedding(BlueLMConfig(**fields))
    raw = torch.randn(1, 1, 64, 128, dtype=torch.float64)
    context = 2048 * (16 if rope_scaling else 1)
    old = torch.arange(context - 64, context).unsqueeze(0)  # the end of the window ...
    new = torch.arange(5, 5 + 64).unsqueeze(0)  # ... moved to its start
    def rotated(positions: torch.Tensor) -> torch.Tensor:
        # float64 throughout, so that what is compared is the re-rotation, not float32's angle rounding.
        freqs = positions[..., None].double() * rotary.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return apply_rotary_pos_emb(raw, raw, emb.cos(), emb.sin())[1]
    moved = rerotate(rotated(old).float(), rotary.inv_freq, 5 - (context - 64))
    torch.testing.assert_close(moved.double(), rotated(new), rtol=0, atol=2e-5)
    # The model's own float32 rotation at the new positions agrees to float32 error as well.
    cos, sin = rotary(raw.float(), new)
    torch.testing.assert_close(moved, apply_rotary_pos_emb(raw.float(), raw.float(), cos, sin)[1], rtol=0, atol=1e-4)


def _keys(engine: ChatEngine) -> list[torch.Tensor]:
    assert engine._cache is not None
    return [layer.keys[:, :, : len(engine.cached_ids)].clone() for layer in engine._cache.layers]


def _unrotated(keys: torch.Tensor, rotary: BlueLMRotaryEmbedding, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + keys.shape[-2]).unsqueeze(0)
    cos, sin = rotary(keys, positions)
    # The inverse rotation: by -angle.
    return apply_rotary_pos_emb(keys, keys, cos, -sin)[1]


@pytest.mark.parametrize("fixture", ["loaded_256", "loaded_ntkmixed"], ids=["2k-default", "32k-ntkmixed"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_context_shift_moves_the_kept_keys_without_a_re_prefill(fixture: str, static: bool, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(fixture)
    runner = GraphRunner(loaded.model, loaded.context_length, use_graphs=False, smallest_window=16) if static else None
    engine = ChatEngine(loaded, runner=runner, context_shift=True)
    rotary = loaded.model.model.rotary_emb
    before: list[torch.Tensor] = []
    before_ids: tuple[int, ...] = ()
    shifted_turns = 0
    for plan, result in converse(engine, 30):
        if plan.dropped_turns:
            shifted_turns += 1
            assert result.shifted_tokens >= MIN_SHIFT_TOKENS
            assert result.prefill_tokens < 40  # the new message, not the kept window
            start = result.reused_tokens - result.shifted_tokens
            found = find_shift(list(before_ids), plan.ids, start)
            assert found is not None and found[1] >= result.shifted_tokens
            source = found[0]
            after = _keys(engine)
            for layer, (old, new) in enumerate(zip(before, after)):
                kept_old = old[:, :, source : source + result.shifted_tokens]
                kept_new = new[:, :, start : start + result.shifted_tokens]
                # The same position-free keys, rotated to the new positions instead of the old ones.
                torch.testing.assert_close(_unrotated(kept_new, rotary, start), _unrotated(kept_old, rotary, source),
                                           rtol=1e-4, atol=1e-4)
                if layer == 0:
                    # Layer 0's keys depend on the token and its position only: a fresh prefill gives the same.
                    fresh = ChatEngine(loaded)
                    fresh.stream(PromptPlan(plan.ids[: start + result.shifted_tokens + 1]), replace(GREEDY, max_new_tokens=1)).finish()
                    torch.testing.assert_close(kept_new, _keys(fresh)[0][:, :, start : start + result.shifted_tokens],
                                               rtol=1e-4, atol=1e-4)
        before, before_ids = _keys(engine), engine.cached_ids
    assert shifted_turns >= 2


# ---------------------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("context_shift", [False, True], ids=["block-drop", "context-shift"])
def test_bench_runs_past_the_window_and_reports_every_turn(context_shift: bool) -> None:
    import json

    from bluelm_cli.bench.local import format_report, random_weights_model, run_bench

    shapes = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    engine = ChatEngine(random_weights_model(shapes, "cpu", torch.float32), context_shift=context_shift)
    report = run_bench(engine, prompt_tokens=40, new_tokens=8, turns=14, overhead=False)
    turns = json.loads(report.to_json())["turns"]
    assert len(turns) == 14
    for turn in turns:
        assert {"context_tokens", "reused_tokens", "prefill_tokens", "dropped_turns", "ttft_s", "decode_tok_s",
                "forwards", "shifted_tokens"} <= set(turn)
        assert turn["forwards"] == 8  # a prefill and seven decode steps: prompt lookup is off
    dropped = [turn for turn in turns if turn["dropped_turns"]]
    assert dropped, "the conversation never filled the 256-token window"
    assert all((turn["shifted_tokens"] > 0) == context_shift for turn in dropped)
    if context_shift:
        assert all(turn["prefill_tokens"] < 40 for turn in dropped)
    assert report.forwards_per_token == 1.0 and report.context_shift is context_shift
    table = format_report(report)
    rows = [line for line in table.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 14  # every turn's TTFT is shown
    assert "(drop: the oldest turns left the full context window in one block;" in table
