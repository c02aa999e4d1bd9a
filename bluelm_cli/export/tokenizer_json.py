"""An exact `tokenizer.json` for a BlueLM `tokenizer.model`: the fast tokenizer gives SentencePiece's ids.

transformers' automatic conversion of the SentencePiece file splits `[|Human|]:`/`[|AI|]:` into characters
and handles the dummy prefix differently, so engines that convert it themselves feed BlueLM a different
prompt. This builds the tokenizer from the model file's own normalizer spec instead:

- normalizer: the precompiled charsmap (if any), whitespace cleanup (if `remove_extra_whitespaces`),
  the "▁" dummy prefix (if `add_dummy_prefix`), spaces → "▁" (if `escape_whitespaces`);
- the user-defined pieces (the tags) are cut out of the *normalized* text by the pre-tokenizer and looked
  up whole (`ignore_merges`), like SentencePiece's prefix matcher; they cannot be added tokens, because
  tokenizers normalizes an added token's own text too (giving "▁[|Human|]:"). Control pieces (<s>, </s>)
  are special added tokens, so one dummy prefix is added per span between them, as SentencePiece adds
  one per `encode` call and our engine encodes each turn on its own;
- a BPE model whose merges rank pairs by the SentencePiece score of the merged piece, with byte fallback.
  `ignore_merges` also looks up whole any other span that is a piece; `unreachable_pieces` lists the
  pieces for which that could differ from SentencePiece (none in the tiny test vocabulary).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = [
    "build_tokenizer", "normalizer_description", "read_model_proto", "steps_llama_cpp_skips", "unreachable_pieces",
    "user_defined_pieces",
]

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "▁"


def read_model_proto(path: Path) -> Any:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def build_tokenizer(path: Path) -> Tokenizer:
    """The fast tokenizer equivalent to the SentencePiece BPE model at `path` (BOS prepended, no EOS)."""
    proto = read_model_proto(path)
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError("only SentencePiece BPE models are supported (BlueLM's tokenizer is BPE)")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    unk_piece = next(piece for piece, _, kind in pieces if kind == _UNKNOWN)
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_merges(pieces, vocab),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            dropout=None,
            ignore_merges=True,
        )
    )
    spec = proto.normalizer_spec
    tokenizer.normalizer = _normalizer(spec)
    tokenizer.pre_tokenizer = _tag_splitter(user_defined_pieces(proto))
    tokenizer.decoder = _decoder(spec)
    tokenizer.add_special_tokens(
        [AddedToken(piece, normalized=False, special=True) for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)]
    )
    bos = pieces[proto.trainer_spec.bos_id][0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, proto.trainer_spec.bos_id)]
    )
    return tokenizer


def normalizer_description(proto: Any) -> dict[str, Any]:
    """The normalizer spec of a SentencePiece model as plain fields (what `scripts/tokenizer_normalizer.py` prints).

    `unicode_normalization` is False for the identity rule: its precompiled character map is empty."""
    spec = proto.normalizer_spec
    return {
        "name": spec.name,
        "unicode_normalization": bool(spec.precompiled_charsmap),
        "precompiled_charsmap_bytes": len(spec.precompiled_charsmap),
        "add_dummy_prefix": spec.add_dummy_prefix,
        "remove_extra_whitespaces": spec.remove_extra_whitespaces,
        "escape_whitespaces": spec.escape_whitespaces,
    }


def steps_llama_cpp_skips(proto: Any) -> list[str]:
    """What this model's normalizer does to text that llama.cpp's SentencePiece ("llama") tokenizer does not do.

    llama.cpp's SPM tokenizer only escapes spaces and adds the dummy prefix (llama-vocab.cpp): it applies no
    character map, and its `remove_extra_whitespaces` key is read by the T5 (UGM) tokenizer only."""
    spec = proto.normalizer_spec
    skipped = []
    if spec.precompiled_charsmap:
        skipped.append(f"Unicode normalization ({spec.name or 'a precompiled character map'})")
    if spec.remove_extra_whitespaces:
        skipped.append("removing leading, trailing and repeated spaces")
    return skipped


def user_defined_pieces(proto: Any) -> list[str]:
    return [p.piece for p in proto.pieces if p.type == _USER_DEFINED]


def unreachable_pieces(path: Path) -> list[str]:
    """Normal pieces that SentencePiece's merges do not produce from the piece's own text: for a span equal
    to one of them, the whole-span lookup of `ignore_merges` would differ from SentencePiece."""
    proto = read_model_proto(path)
    tokenizer = build_tokenizer(path)
    plain = Tokenizer(BPE(vocab=tokenizer.get_vocab(), merges=_merges(
        [(p.piece, p.score, p.type) for p in proto.pieces], tokenizer.get_vocab()),
        unk_token=proto.pieces[proto.trainer_spec.unk_id].piece, fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback))
    normal = [p.piece for p in proto.pieces if p.type == _NORMAL and len(p.piece) > 1]
    encoded = plain.encode_batch(normal, add_special_tokens=False)
    return [piece for piece, encoding in zip(normal, encoded) if encoding.tokens != [piece]]


def _tag_splitter(tags: list[str]) -> pre_tokenizers.PreTokenizer | None:
    if not tags:
        return None
    # Longest first: SentencePiece's prefix matcher takes the longest user-defined piece.
    pattern = "|".join(re.escape(tag) for tag in sorted(tags, key=len, reverse=True))
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces of the vocabulary, best-scored merged piece first.

    SentencePiece's BPE merges the adjacent pair whose concatenation has the highest score; a BPE with
    merges ranked the same way merges in the same order."""
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for merged, score, kind in pieces:
        if kind != _NORMAL or len(merged) < 2:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[merged], vocab[left], (left, right)))
    ranked.sort()
    return [pair for *_, pair in ranked]


def _normalizer(spec: Any) -> normalizers.Normalizer:
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    return normalizers.Sequence(steps)


def _decoder(spec: Any) -> decoders.Decoder:
    steps: list[decoders.Decoder] = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)
