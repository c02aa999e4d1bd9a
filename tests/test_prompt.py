"""BlueLM's chat format: golden prompt text and golden ids on the tiny checkpoint's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from bluelm_cli.local.engine import TokenizerEncoder
from bluelm_cli.local.loading import load_tokenizer
from bluelm_cli.modeling import BlueLMTokenizer
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.prompt import HistoryTurn, build_continuation_ids, build_prompt_ids, fit_continuation, prompt_text, user_segment
from bluelm_cli.testing.tiny_checkpoint import train_tokenizer

GREETING = "你好，有什么可以帮助你吗？"  # the web demo's display-only greeting


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BlueLMTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(folder)
    return load_tokenizer(Path(folder))


def build(tokenizer: BlueLMTokenizer, system: str | None, history: list[HistoryTurn], message: str):
    encoder = TokenizerEncoder(tokenizer.encode_plain, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.decode, tokenizer.sp_model.get_piece_size())
    return build_prompt_ids(encoder, system, history, message)


# ------------------------------------------------------------------------------------------------ text
def test_golden_text_without_system() -> None:
    assert prompt_text(None, [("u1", "a1")], "u2") == "<s>[|Human|]:u1[|AI|]:a1</s>[|Human|]:u2[|AI|]:"


def test_golden_text_with_system_before_first_human() -> None:
    assert prompt_text("SYS", [("u1", "a1")], "u2") == "<s>SYS[|Human|]:u1[|AI|]:a1</s>[|Human|]:u2[|AI|]:"


def test_golden_text_first_turn() -> None:
    assert prompt_text(None, [], "u1") == "<s>[|Human|]:u1[|AI|]:"
    assert prompt_text("SYS", [], "u1") == "<s>SYS[|Human|]:u1[|AI|]:"
    assert prompt_text("", [], "u1") == "<s>[|Human|]:u1[|AI|]:"


def test_golden_text_many_turns() -> None:
    history = [("u1", "a1"), ("u2", "a2"), ("u3", "a3")]
    assert prompt_text("S", history, "u4") == (
        "<s>S[|Human|]:u1[|AI|]:a1</s>[|Human|]:u2[|AI|]:a2</s>[|Human|]:u3[|AI|]:a3</s>[|Human|]:u4[|AI|]:"
    )


def test_no_greeting_in_the_prompt() -> None:
    # There is no API for a greeting: an empty history starts straight with the user's turn.
    for system in (None, ""):
        text = prompt_text(system, [], "hello")
        assert text.startswith("<s>[|Human|]:")
        assert GREETING not in text
        assert "[|AI|]:" not in text[: text.index("[|Human|]:")]


def test_user_segment() -> None:
    assert user_segment("u") == "[|Human|]:u[|AI|]:"
    assert user_segment("u", "SYS") == "SYS[|Human|]:u[|AI|]:"


# ------------------------------------------------------------------------------------------------- ids
def pieces(tokenizer: BlueLMTokenizer, spaced: str) -> list[int]:
    """The ids of space-separated SentencePiece pieces. Golden sequences name pieces, not numbers: the tiny
    tokenizer is trained by the installed sentencepiece, and releases number its pieces differently
    (0.2.0 learns one more merge than 0.2.3) while splitting text the same way."""
    ids = [tokenizer.sp_model.piece_to_id(piece) for piece in spaced.split(" ")]
    assert tokenizer.sp_model.unk_id() not in ids, spaced
    return ids


def answer_ids(tokenizer: BlueLMTokenizer) -> list[int]:
    return pieces(tokenizer, "▁ 你 好 ， 有 什 么 可 以 帮 助 你 吗 ？")


def test_golden_ids_without_system(tokenizer: BlueLMTokenizer) -> None:
    prompt = build(tokenizer, None, [HistoryTurn("你好", answer_ids(tokenizer))], "Hello, who are you?")
    assert prompt.ids == [
        1,
        *pieces(tokenizer, "▁ [|Human|]: 你 好 [|AI|]:"),
        *answer_ids(tokenizer),
        2,
        *pieces(tokenizer, "▁ [|Human|]: H el lo , ▁w h o ▁a re ▁ y ou ? [|AI|]:"),
    ]
    assert prompt.turn_starts == [1]
    assert prompt.message_start == 21


def test_golden_ids_with_system(tokenizer: BlueLMTokenizer) -> None:
    prompt = build(tokenizer, "You are helpful.", [HistoryTurn("你好", answer_ids(tokenizer))], "Hello, who are you?")
    assert prompt.ids == [
        1,
        *pieces(tokenizer, "▁ <0x59> ou ▁a re ▁ h el p f u l . [|Human|]: 你 好 [|AI|]:"),
        *answer_ids(tokenizer),
        2,
        *pieces(tokenizer, "▁ [|Human|]: H el lo , ▁w h o ▁a re ▁ y ou ? [|AI|]:"),
    ]
    assert prompt.turn_starts == [1]
    assert prompt.message_start == 33


def test_chat_tags_are_single_ids(tokenizer: BlueLMTokenizer) -> None:
    human = tokenizer.sp_model.piece_to_id("[|Human|]:")
    ai = tokenizer.sp_model.piece_to_id("[|AI|]:")
    assert (human, ai) == (4, 5)
    assert tokenizer.encode_plain("[|Human|]:u1[|AI|]:").count(human) == 1
    assert tokenizer.encode_plain("[|Human|]:u1[|AI|]:").count(ai) == 1


@pytest.mark.parametrize("system", [None, "SYS prompt."])
def test_id_structure(tokenizer: BlueLMTokenizer, system: str | None) -> None:
    # Answers go in verbatim, deliberately ids that re-tokenizing their text would never give.
    answers = [[7, 8, 9, 100], [599, 3, 42]]
    history = [HistoryTurn("first question", answers[0]), HistoryTurn("第二个问题", answers[1])]
    prompt = build(tokenizer, system, history, "third? </s> <s>")
    segments = [
        tokenizer.encode_plain(user_segment("first question", system)),
        tokenizer.encode_plain(user_segment("第二个问题")),
        tokenizer.encode_plain(user_segment("third? </s> <s>")),
    ]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    expected = [bos] + segments[0] + answers[0] + [eos] + segments[1] + answers[1] + [eos] + segments[2]
    assert prompt.ids == expected
    assert prompt.ids[0] == bos and prompt.ids.count(bos) == 1
    assert prompt.turn_starts == [1, 1 + len(segments[0]) + len(answers[0]) + 1]
    assert prompt.message_start == len(expected) - len(segments[2])
    # Each answer is followed by exactly one EOS, and the typed "</s>" stays plain text.
    assert [i for i, token in enumerate(prompt.ids) if token == eos] == [
        1 + len(segments[0]) + len(answers[0]),
        prompt.message_start - 1,
    ]
    assert prompt.ids[-1] == tokenizer.sp_model.piece_to_id("[|AI|]:")


def test_system_goes_only_with_the_first_turn(tokenizer: BlueLMTokenizer) -> None:
    history = [HistoryTurn("a", [10]), HistoryTurn("b", [11])]
    with_system = build(tokenizer, "SYS", history, "c")
    without = build(tokenizer, None, history, "c")
    system_ids = tokenizer.encode_plain(user_segment("a", "SYS"))
    plain_ids = tokenizer.encode_plain(user_segment("a"))
    assert with_system.ids[1 : 1 + len(system_ids)] == system_ids
    assert with_system.ids[1 + len(system_ids) :] == without.ids[1 + len(plain_ids) :]
    # No history: the system prompt goes with the message.
    alone = build(tokenizer, "SYS", [], "c")
    assert alone.ids == [tokenizer.bos_token_id] + tokenizer.encode_plain(user_segment("c", "SYS"))
    assert alone.turn_starts == [] and alone.message_start == 1


def test_empty_history_has_no_greeting_ids(tokenizer: BlueLMTokenizer) -> None:
    prompt = build(tokenizer, None, [], "hello")
    assert prompt.ids == [tokenizer.bos_token_id] + tokenizer.encode_plain("[|Human|]:hello[|AI|]:")
    assert prompt.ids[:3] == [1, *pieces(tokenizer, "▁ [|Human|]:")]



# ------------------------------------------------------------------------------------------ /continue
def test_continuation_leaves_the_last_answer_open(tokenizer: BlueLMTokenizer) -> None:
    history = [HistoryTurn("你好", answer_ids(tokenizer))]
    open_turn = HistoryTurn("Hello, who are you?", [7, 8, 9])
    closed = build(tokenizer, None, history, "Hello, who are you?")
    prompt = build_continuation_ids(TokenizerEncoder(tokenizer.encode_plain, 1, 2, tokenizer.decode, tokenizer.sp_model.get_piece_size()), None, history, open_turn)
    assert prompt.ids == closed.ids + [7, 8, 9]  # the answer's ids as generated, and no </s> after them
    assert prompt.turn_starts == closed.turn_starts and prompt.message_start == closed.message_start


def test_continuation_drops_old_turns_to_fit_and_refuses_when_the_exchange_alone_cannot() -> None:
    from bluelm_cli.testing.fakes import CharEncoder

    encoder = CharEncoder()
    history = [HistoryTurn("a" * 10, encoder.encode_plain("b" * 10)), HistoryTurn("c" * 10, encoder.encode_plain("d" * 10))]
    open_turn = HistoryTurn("question", encoder.encode_plain("cut off"), "cut off")
    # <s> + two exchanges of 23 ids + [|Human|]:question[|AI|]: (10) + "cut off" (7) = 64 ids.
    whole = fit_continuation(encoder, None, history, open_turn, context_limit=74, max_new_tokens=10)
    assert (len(whole.ids), whole.dropped_turns, whole.partial_answer, whole.message) == (64, 0, "cut off", "question")
    assert whole.ids[-7:] == encoder.encode_plain("cut off") and encoder.eos_id not in whole.ids[-8:]
    one_dropped = fit_continuation(encoder, None, history, open_turn, context_limit=60, max_new_tokens=10)
    assert (len(one_dropped.ids), one_dropped.dropped_turns) == (41, 1)
    assert one_dropped.history == (history[1],)
    with pytest.raises(BlueLMError, match=r"^the exchange to continue is already 18 tokens and at most 15 fit in the"
                       r" context window with room for 10 more; lower max_new_tokens \(/set max_new_tokens N\) or /retry$"):
        fit_continuation(encoder, None, history, open_turn, context_limit=25, max_new_tokens=10)


# ------------------------------------------------------------------------------------ a full window
def test_a_full_window_drops_the_oldest_half_of_the_history_in_one_block() -> None:
    from bluelm_cli.core.prompt import fit_prompt
    from bluelm_cli.testing.fakes import CharEncoder

    encoder = CharEncoder()
    # Ten exchanges of 23 ids each ([|Human|]: + 10 + [|AI|]: + 10 + </s>), then a 10-id message: 1 + 230 + 10 = 241.
    history = [HistoryTurn(f"{n}" * 10, encoder.encode_plain("b" * 10)) for n in range(10)]
    minimal = fit_prompt(encoder, None, history, "question", context_limit=250, max_new_tokens=10, drop_fraction=0)
    assert minimal.dropped_turns == 1  # one turn is enough to fit 240 ...
    block = fit_prompt(encoder, None, history, "question", context_limit=250, max_new_tokens=10)
    assert block.dropped_turns == 5  # ... but half the history's 230 tokens go at once
    assert block.history == tuple(history[5:])
    assert len(block.ids) == 1 + 5 * 23 + 10
    # The next turns extend the kept prompt (its ids are a prefix of theirs) until the window fills again.
    grown = [*history[5:], HistoryTurn("question", encoder.encode_plain("b" * 10))]
    following = fit_prompt(encoder, None, grown, "next one", context_limit=250, max_new_tokens=10)
    assert following.dropped_turns == 0 and following.ids[: len(block.ids)] == block.ids
    # A message that leaves room for less than half the history still fits: the fewest turns that make it fit.
    big = "x" * 150
    fitted = fit_prompt(encoder, None, history, big, context_limit=250, max_new_tokens=10)
    assert fitted.dropped_turns == 7 and len(fitted.ids) <= 240 < len(
        fit_prompt(encoder, None, history[6:], big, context_limit=10_000, max_new_tokens=10).ids)
