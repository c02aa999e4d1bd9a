"""A tokenizer.model that normalizes (NFKC, whitespace): tokenizer.json carries the same normalizer, GGUF warns.

Whether the published BlueLM tokenizer.model normalizes cannot be read here (no weights download); its
normalizer spec decides, and `scripts/tokenizer_normalizer.py` prints it. These tests hold the exports to
whatever the spec says, for the identity spec the tiny checkpoints use and for SentencePiece's defaults
(nmt_nfkc, extra whitespace removed).
"""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import pytest
import sentencepiece
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.export.hf import export_hf
from bluelm_cli.export.tokenizer_json import normalizer_description, read_model_proto, steps_llama_cpp_skips
from bluelm_cli.testing.tiny_checkpoint import _CORPUS, TinySpec, build_checkpoint, tokenizer_model_bytes

NORMALIZING = {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True}

# Text NFKC changes (full-width forms, ligatures, circled digits, compatibility ideographs, the ideographic
# space, half-width katakana) and runs of spaces that whitespace removal collapses.
CHANGED = [
    "ＡＢＣ１２３", "全角：标点，符号！", "ﬁne ﬂow", "①②③", "ｶﾀｶﾅ", "㈱", "⁵₂", "x\u3000y", "Ⅻ", "ｈｅｌｌｏ　ｗｏｒｌｄ",
    "two  spaces", "  leading", "trailing   ", "a \t b", "你好，世界！", "ＣＰＵ　ｉｓ　１００％",
]
_ALPHABET = list("abcxyzABC 019 你好中国的是 .,，。!?[]|:<>/😀é\u3000ＡＢ１２ﬁ①ｶﾅ") + ["  ", "Hello", "春眠不觉晓"]


def _strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("normalizer")
    model = root / "nfkc.model"
    model.write_bytes(tokenizer_model_bytes(**NORMALIZING))
    return {
        "identity": build_checkpoint(root / "identity", TinySpec(seed=8)),
        "nfkc": build_checkpoint(root / "nfkc", TinySpec(seed=8), tokenizer_model=model),
    }


def test_the_spec_says_whether_a_tokenizer_normalizes(folders: dict[str, Path]) -> None:
    identity = read_model_proto(folders["identity"] / "tokenizer.model")
    assert normalizer_description(identity) == {
        "name": "identity", "unicode_normalization": False, "precompiled_charsmap_bytes": 0,
        "add_dummy_prefix": True, "remove_extra_whitespaces": False, "escape_whitespaces": True,
    }
    assert steps_llama_cpp_skips(identity) == []
    nfkc = read_model_proto(folders["nfkc"] / "tokenizer.model")
    described = normalizer_description(nfkc)
    assert described["name"] == "nmt_nfkc" and described["unicode_normalization"] and described["remove_extra_whitespaces"]
    assert steps_llama_cpp_skips(nfkc) == ["Unicode normalization (nmt_nfkc)", "removing leading, trailing and repeated spaces"]


def test_tokenizer_json_applies_the_normalizer_as_sentencepiece_does(folders: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    export_hf(folders["nfkc"], out, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folders["nfkc"] / "tokenizer.model"))
    identity = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model_bytes())
    # The normalizer matters for these strings: SentencePiece's own normalization changes every one of them.
    assert all(sp.normalize(text) != identity.normalize(text) for text in CHANGED)
    assert [sp.normalize(text) for text in CHANGED[:3]] == ["▁ABC123", "▁全角:标点,符号!", "▁fine▁flow"]
    strings = CHANGED + _strings(1500, seed=3) + list(_CORPUS) + ["", " ", "\n\n"]
    mismatches = [text for text in strings if tokenizer(text).input_ids != [1] + sp.encode(text)]
    assert mismatches == []
    # NFKC itself, as a check on the strings: unicodedata agrees on what the full-width ones become.
    assert unicodedata.normalize("NFKC", "ＡＢＣ１２３") == "ABC123"


def test_gguf_export_warns_only_for_a_normalizing_tokenizer(folders: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    runner = CliRunner()
    normalizing = runner.invoke(app, ["export", str(tmp_path / "nfkc.gguf"), "--model", str(folders["nfkc"]),
                                      "--format", "gguf", "--dtype", "float32"])
    assert normalizing.exit_code == 0, normalizing.stderr
    assert (
        "Warning: this tokenizer.model normalizes text (Unicode normalization (nmt_nfkc); removing leading, trailing "
        "and repeated spaces) and llama.cpp does not: text that normalization changes is tokenized differently there; "
        "normalize prompts before sending them, or serve the hf export (its tokenizer.json carries the normalizer)"
    ) in " ".join(normalizing.stderr.split())
    plain = runner.invoke(app, ["export", str(tmp_path / "identity.gguf"), "--model", str(folders["identity"]),
                                "--format", "gguf", "--dtype", "float32"])
    assert plain.exit_code == 0, plain.stderr
    assert "Warning" not in plain.stderr
