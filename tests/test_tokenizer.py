"""BlueLMTokenizer against SentencePiece itself, decoding round trips, and the streaming detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import bluelm_cli.modeling  # noqa: F401  (registers BlueLM with the Auto classes)
from bluelm_cli.local.loading import load_tokenizer
from bluelm_cli.modeling.tokenizer import AI_TAG, HUMAN_TAG, BlueLMTokenizer, StreamDetokenizer
from checkpoints import checkpoints, tiny_folder  # noqa: F401

TEXTS = [
    "你好",
    "Hello, who are you?",
    "中国的首都是北京。The capital of China is Beijing.",
    "emoji 😀👍🏽🎉 and 龘 (a rare character)",
    "  two leading spaces",
    " one leading space",
    "trailing space ",
    "line one\nline two\n\n  indented\n",
    "\n",
    " ",
    "tab\there",
    "def add(a, b):\n    return a + b\n",
    "[|Human|]:你好[|AI|]:你好，有什么可以帮助你吗？",
    "Ünïcödé ß ÆØÅ — “quotes” … ½",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_folder: Path) -> BlueLMTokenizer:
    tok = load_tokenizer(tiny_folder)
    assert isinstance(tok, BlueLMTokenizer)
    return tok


@pytest.fixture(scope="module")
def sp(tiny_folder: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_folder / "tokenizer.model"))


def _ordinary_ids(sp: spm.SentencePieceProcessor) -> list[int]:
    return [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]


# ---------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece_with_bos_and_no_eos(tokenizer: BlueLMTokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    expected = [1] + sp.encode(text)
    assert tokenizer(text)["input_ids"] == expected
    assert tokenizer.encode(text) == expected
    assert tokenizer.encode_plain(text) == sp.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


def test_auto_tokenizer_is_the_native_class(tiny_folder: Path, sp: spm.SentencePieceProcessor) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_folder))
    assert isinstance(tok, BlueLMTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert len(tok) == sp.get_piece_size()
    assert tok("你好 world")["input_ids"] == [1] + sp.encode("你好 world")


def test_chat_tags_are_single_tokens(tokenizer: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    human, ai = sp.piece_to_id(HUMAN_TAG), sp.piece_to_id(AI_TAG)
    assert human not in (0, sp.unk_id()) and ai not in (0, sp.unk_id())
    for tag, tag_id in ((HUMAN_TAG, human), (AI_TAG, ai)):
        assert sp.id_to_piece(tag_id) == tag
        ids = tokenizer.encode_plain(tag)
        # the whole tag is one piece; SentencePiece may put its dummy-prefix "▁" before it
        assert ids.count(tag_id) == 1
        assert [sp.id_to_piece(i) for i in ids if i != tag_id] in ([], ["▁"])
        assert tokenizer.encode(tag) == [1] + ids
    ids = tokenizer.encode("[|Human|]:你好[|AI|]:")
    assert ids[0] == 1 and ids[-1] == ai
    assert ids.count(human) == 1 and ids.count(ai) == 1
    assert tokenizer.decode([human]) == HUMAN_TAG and tokenizer.decode([ai]) == AI_TAG


def test_encode_plain_treats_special_token_text_as_characters(tokenizer: BlueLMTokenizer) -> None:
    ids = tokenizer.encode_plain("a </s> b <s>")
    assert 1 not in ids and 2 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a </s> b <s>"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("abc xyz\n\t,.!?01龘你好中文的是😀🎉ÆßЖ")), max_size=40))
def test_ids_equal_sentencepiece_property(tokenizer: BlueLMTokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    assert tokenizer.encode(text) == [1] + sp.encode(text)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tokenizer: BlueLMTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode_plain(text)) == text


def test_rare_characters_use_byte_fallback(tokenizer: BlueLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    for char, n_bytes in (("😀", 4), ("龘", 3)):
        ids = tokenizer.encode_plain(char)
        byte_ids = [i for i in ids if sp.is_byte(i)]
        assert len(byte_ids) == n_bytes, (char, [sp.id_to_piece(i) for i in ids])
        assert tokenizer.decode(ids) == char


def test_skip_special_tokens(tokenizer: BlueLMTokenizer) -> None:
    body = tokenizer.encode_plain("你好 world")
    ids = [1] + body + [2]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好 world"
    assert tokenizer.decode(ids) == "<s>你好 world</s>"
    assert tokenizer.decode([1, 3, 2, 0], skip_special_tokens=True) == ""
    chat = tokenizer.encode("[|Human|]:hi[|AI|]:ok") + [2]
    # the chat tags are ordinary pieces, not special tokens: they stay
    assert tokenizer.decode(chat, skip_special_tokens=True) == "[|Human|]:hi[|AI|]:ok"


# ------------------------------------------------------------------------------------ StreamDetokenizer
def _stream(tokenizer: BlueLMTokenizer, ids: list[int]) -> tuple[list[str], str]:
    stream = StreamDetokenizer(tokenizer)
    deltas = [stream.add(i) for i in ids]
    tail = stream.flush()
    return deltas, tail


def test_stream_emits_multibyte_character_whole_and_once(tokenizer: BlueLMTokenizer) -> None:
    for char in ("😀", "龘"):
        text = f"a{char}b"
        ids = tokenizer.encode_plain(text)
        deltas, tail = _stream(tokenizer, ids)
        assert "".join(deltas) + tail == text
        holding = [d for d in deltas if char in d]
        assert len(holding) == 1 and holding[0].count(char) == 1
        assert not any("\ufffd" in d for d in deltas)
        assert "" in deltas  # the incomplete bytes were held back
        assert tail == ""


def test_stream_skips_special_tokens(tokenizer: BlueLMTokenizer) -> None:
    ids = [1] + tokenizer.encode_plain("你好") + [2]
    deltas, tail = _stream(tokenizer, ids)
    assert "".join(deltas) + tail == "你好"
    stream = StreamDetokenizer(tokenizer)
    for i in ids:
        stream.add(i)
    assert stream.ids == ids and stream.text == "你好"


STREAM_ALPHABET = list("ab xyz\n\t,.!?01") + list("你好中文龘𪚥😀🎉👍🏽Жß") + ["[|Human|]:", "[|AI|]:"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(STREAM_ALPHABET), max_size=30).map("".join))
def test_stream_deltas_concatenate_to_decode_for_text(tokenizer: BlueLMTokenizer, text: str) -> None:
    ids = tokenizer.encode_plain(text)
    deltas, tail = _stream(tokenizer, ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert "".join(deltas) + tail == decoded
    # valid text: no delta ever carries a broken character, and nothing is left for flush
    assert not any("\ufffd" in d for d in deltas)
    assert tail == ""


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_deltas_concatenate_to_decode_for_random_ids(
    tokenizer: BlueLMTokenizer, sp: spm.SentencePieceProcessor, data: st.DataObject
) -> None:
    ordinary = _ordinary_ids(sp)
    ids = data.draw(st.lists(st.sampled_from(ordinary), max_size=40))
    deltas, tail = _stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_with_specials_interleaved(tokenizer: BlueLMTokenizer, sp: spm.SentencePieceProcessor, data: st.DataObject) -> None:
    ordinary = _ordinary_ids(sp)
    ids = data.draw(st.lists(st.one_of(st.sampled_from(ordinary), st.sampled_from([0, 1, 2, 3])), max_size=30))
    deltas, tail = _stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)
