"""Long prompts: chunked prefill and last-position logits (what lets 32K fit a 24 GB card), on tiny checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bluelm_cli.core.prompt import HistoryTurn
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import DEFAULT_PREFILL_CHUNK, ChatEngine, StepRunner
from bluelm_cli.local.loading import LoadedModel, load_model
from checkpoints import checkpoints  # noqa: F401 - pytest fixture
from helpers import start

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> dict[str, LoadedModel]:  # noqa: F811
    return {name: load_model(str(checkpoints[name]), device="cpu", dtype="float32") for name in ("bin-sharded", "ntkmixed-32k")}


def _prompt(loaded: LoadedModel, length: int, seed: int = 0) -> torch.Tensor:
    pieces = loaded.tokenizer.sp_model.get_piece_size()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, pieces, (1, length), generator=generator)
    ids[0, 0] = loaded.tokenizer.bos_token_id
    return ids


class _ChunkRecorder:
    """Records the sequence length of every forward the model runs, and the logits shape it returns."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.logits_shapes: list[tuple[int, ...]] = []
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):  # type: ignore[no-untyped-def]
        self.lengths.append(kwargs["input_ids"].shape[1])
        self.logits_shapes.append(tuple(output.logits.shape))

    def close(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("name,length", [("bin-sharded", 700), ("ntkmixed-32k", 3000)])
@pytest.mark.parametrize("chunk", [1, 64, 257])
def test_chunked_prefill_gives_the_one_shot_next_token_logits(models, name: str, length: int, chunk: int) -> None:
    if chunk == 1 and length > 1000:
        pytest.skip("one token at a time over 3000 positions adds nothing the 700-token case does not show")
    loaded = models[name]
    ids = _prompt(loaded, length)
    with torch.inference_mode():
        one_shot_runner = StepRunner(loaded.model, prefill_chunk=length)
        one_shot = one_shot_runner.prefill(one_shot_runner.new_cache(), ids, 0)
        chunked_runner = StepRunner(loaded.model, prefill_chunk=chunk)
        chunked_cache = chunked_runner.new_cache()
        recorder = _ChunkRecorder(loaded.model)
        try:
            chunked = chunked_runner.prefill(chunked_cache, ids, 0)
        finally:
            recorder.close()
    # Every forward saw at most one chunk and formed logits for its last position only: O(vocab), not O(seq·vocab).
    assert max(recorder.lengths) == min(chunk, length)
    assert sum(recorder.lengths) == length
    vocab = loaded.model.config.vocab_size
    assert set(recorder.logits_shapes) == {(1, 1, vocab)}
    assert chunked.shape == one_shot.shape == (1, vocab)
    assert chunked_cache.get_seq_length() == length
    torch.testing.assert_close(chunked, one_shot, rtol=1e-4, atol=1e-4)
    assert int(chunked.argmax()) == int(one_shot.argmax())


def test_a_prefill_after_cached_tokens_is_chunked_at_its_own_positions(models) -> None:
    """A follow-up turn (start > 0) chunks only the new suffix, at its true positions."""
    loaded = models["ntkmixed-32k"]
    ids = _prompt(loaded, 2500, seed=1)
    with torch.inference_mode():
        whole = StepRunner(loaded.model, prefill_chunk=4096)
        expected = whole.prefill(whole.new_cache(), ids, 0)
        runner = StepRunner(loaded.model, prefill_chunk=300)
        cache = runner.new_cache()
        runner.prefill(cache, ids[:, :1234], 0)
        got = runner.prefill(cache, ids[:, 1234:], 1234)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,history_tokens", [("bin-sharded", 600), ("ntkmixed-32k", 2600)])
def test_chunked_prefill_gives_the_same_greedy_answer_over_turns(models, name: str, history_tokens: int) -> None:
    loaded = models[name]
    # A long first message (prefilled in many chunks), then a follow-up that reuses the cache.
    words = "春眠不觉晓，处处闻啼鸟。The quick brown fox jumps over the lazy dog. "
    reps = 1 + history_tokens // max(1, len(loaded.tokenizer.encode_plain(words)))
    message = words * reps

    def conversation(runner: StepRunner) -> list[list[int]]:
        engine = ChatEngine(loaded, runner=runner)
        first = start(engine, None, [], message, GREEDY)
        list(first)
        assert first.result is not None
        history = [HistoryTurn(message, first.result.answer_ids)]
        second = start(engine, None, history, "再来一次 " + message[:200], replace(GREEDY, max_new_tokens=8))
        list(second)
        assert second.result is not None
        return [first.result.answer_ids, second.result.answer_ids]

    one_shot = conversation(StepRunner(loaded.model, prefill_chunk=1_000_000))
    chunked = conversation(StepRunner(loaded.model, prefill_chunk=97))
    assert chunked == one_shot
    assert len(one_shot[0]) > 0


def test_default_chunk_and_bad_chunk(models) -> None:
    model = models["bin-sharded"].model
    assert StepRunner(model).prefill_chunk == DEFAULT_PREFILL_CHUNK == 2048
    with pytest.raises(ValueError, match="prefill_chunk"):
        StepRunner(model, prefill_chunk=0)
