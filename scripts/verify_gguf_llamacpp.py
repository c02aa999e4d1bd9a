"""Check an exported GGUF against llama.cpp (through llama-cpp-python): logits and chat-prompt token ids.

Not part of the test suite: llama-cpp-python compiles llama.cpp from source (8.5 min here on 2 shared
cores, niced, 2026-11-25, with the CMAKE_ARGS below).

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
    python scripts/verify_gguf_llamacpp.py [--json OUT]     # tiny 2K and 32K (ntkmixed, GQA) checkpoints built here
    python scripts/verify_gguf_llamacpp.py --model FOLDER   # a real BlueLM checkpoint instead (slow)

For each checkpoint it exports a float32 GGUF and prints:
- logits: the largest |llama.cpp − bluelm| over every position of several prompts (bluelm in float32),
  with a float32 KV cache and with llama.cpp's defaults (float16 KV cache);
- chat prompts: how many of 200 conversations llama.cpp tokenizes to exactly the ids bluelm's engine
  builds (bluelm_cli/prompt.py build_prompt_ids), from the GGUF's own chat template rendered as
  llama-cpp-python renders it (jinja2) and tokenized as llama-server does (leading BOS text stripped, BOS
  added, special tokens parsed) and as llama-cpp-python's chat handler does (no BOS added); for the
  exported metadata and the alternatives (tokenizer.ggml.add_space_prefix, the tags' token type, the
  template without its spaces or its BOS text), so the choice in gguf_file.py is a measured one;
- plain text: how many strings llama.cpp tokenizes to SentencePiece's ids with no template;
- for the tiny checkpoints, the same for a tokenizer trained with Unicode normalization (nmt_nfkc).
The README ("llama.cpp and the chat format") has the figures of the last run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from bluelm_cli.local.engine import TokenizerEncoder
from bluelm_cli.export import export_checkpoint
from bluelm_cli.export.chat_template import GGUF_CHAT_TEMPLATE, HF_CHAT_TEMPLATE
from bluelm_cli.local.loading import load_model
from bluelm_cli.core.prompt import AI_TAG, HUMAN_TAG, HistoryTurn, build_prompt_ids
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint, tokenizer_model_bytes

NTK = {"type": "ntkmixed", "factor": 16.0, "power": 0.25}
# The same tiny checkpoints as tests/test_export.py.
TINY_SPECS = {
    "2k": TinySpec(weights_format="bin-sharded", seed=5),
    "32k": TinySpec(rope_scaling=NTK, num_attention_heads=8, num_key_value_heads=2, weights_format="safetensors", seed=6),
}
USER_DEFINED, CONTROL = 4, 3  # GGUF token types
TEXTS = [
    "你好", "Hello, who are you?", " leading space", "两个  空格", "trailing  ", "[|AI|]: inside",
    "a [|Human|]: tag", "emoji 😀", "code:\n    x = 1\n", "介绍一下杭州。", "\n\nnewlines", "数字 2024 年",
    "", "tab\there", "</s> typed", "<s>",
]
ALPHABET = list("abcxyzABC 019 你好中国的是 \t\n.,，。!?[]|:<>/😀龘é\u3000") + [
    HUMAN_TAG, AI_TAG, "  ", "Hello", "the", "▁", "[|AI|", "Human", "春眠不觉晓", "def f(x):\n    return x",
]


@dataclass(frozen=True)
class Variant:
    name: str
    add_space_prefix: bool
    tag_type: int
    template: str


_NO_BOS_TEXT = GGUF_CHAT_TEMPLATE.removeprefix("{{- bos_token -}}")
VARIANTS = [
    Variant("exported: add_space_prefix=false, tags USER_DEFINED, GGUF template", False, USER_DEFINED, GGUF_CHAT_TEMPLATE),
    Variant("add_space_prefix=false, tags USER_DEFINED, GGUF template without the BOS text", False, USER_DEFINED, _NO_BOS_TEXT),
    Variant("add_space_prefix=false, tags CONTROL, GGUF template", False, CONTROL, GGUF_CHAT_TEMPLATE),
    Variant("add_space_prefix=true, tags USER_DEFINED, HF template (no spaces)", True, USER_DEFINED, HF_CHAT_TEMPLATE),
    Variant("add_space_prefix=true, tags CONTROL, HF template (no spaces)", True, CONTROL, HF_CHAT_TEMPLATE),
    Variant("add_space_prefix=true, tags USER_DEFINED, GGUF template", True, USER_DEFINED, GGUF_CHAT_TEMPLATE),
    Variant("add_space_prefix=false, tags USER_DEFINED, HF template (no spaces)", False, USER_DEFINED, HF_CHAT_TEMPLATE),
]

Conversation = tuple[str | None, list[tuple[str, str]], str]


def conversations(count: int, seed: int) -> list[Conversation]:
    """Fixed cases (system or not, multi-turn, Chinese, tags and `</s>` in the text) plus random ones."""
    fixed: list[Conversation] = [
        (None, [], "你好"),
        ("你是一个简洁的助手。", [], "介绍一下杭州。"),
        (None, [("你好", "你好！有什么可以帮你？"), ("杭州在哪里？", "浙江省。")], "它有什么好玩的？"),
        ("Be brief.", [("Hello, who are you?", "I am BlueLM.")], "[|AI|]: inside"),
        (None, [("a [|Human|]: tag", "[|AI|]:")], " leading space"),
        (None, [], "</s> typed"),
    ]
    rng = random.Random(seed)
    for _ in range(count - len(fixed)):
        system = rng.choice([None, "你是一个简洁的助手。", "Be brief.", " spaced system "])
        history = [(rng.choice(TEXTS), rng.choice(TEXTS)) for _ in range(rng.randint(0, 3))]
        fixed.append((system, history, rng.choice(TEXTS)))
    return fixed


def random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def types_control_text(conversation: Conversation) -> bool:
    """A message holding "<s>" or "</s>" as text: our engine encodes it as characters, while llama.cpp
    tokenizes a rendered chat prompt with special tokens parsed, so there it becomes BOS/EOS."""
    return any(tag in json.dumps(conversation, ensure_ascii=False) for tag in ("<s>", "</s>"))


def engine_ids(sp: Any, conversation: Conversation) -> list[int]:
    system, history, message = conversation
    # An answer's ids as the model generates them after "[|AI|]:": the answer tokenized in place.
    turns = [HistoryTurn(user=u, answer_ids=sp.encode(AI_TAG + a)[2:]) for u, a in history]
    encoder = TokenizerEncoder(sp.encode, sp.bos_id(), sp.eos_id(), sp.decode, sp.get_piece_size())
    return build_prompt_ids(encoder, system, turns, message).ids


def rendered_prompt(template: str, conversation: Conversation) -> str:
    """The prompt text from the GGUF's template, rendered as llama-cpp-python's Jinja2ChatFormatter does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    system, history, message = conversation
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": message})
    formatter = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>", add_generation_prompt=True)
    return formatter(messages=messages).prompt


def server_chat_ids(llm: Any, template: str, conversation: Conversation) -> list[int]:
    """As llama.cpp's server: a leading BOS text is stripped (common/chat.cpp, the GGUF adds BOS), then the
    text is tokenized with the BOS added and special tokens parsed (tokenize_input_prompts(…, true, true))."""
    text = rendered_prompt(template, conversation)
    text = text.removeprefix("<s>")
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def python_chat_ids(llm: Any, template: str, conversation: Conversation) -> list[int]:
    """As llama-cpp-python's chat handler: Jinja2ChatFormatter marks its prompt `added_special`, so no BOS
    is added; special tokens are parsed."""
    text = rendered_prompt(template, conversation)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@contextlib.contextmanager
def metadata_variant(gguf: Any, variant: Variant, tag_ids: Sequence[int]) -> Iterator[None]:
    """Make export_gguf write `variant`'s tokenizer metadata instead of its own."""
    base = gguf.GGUFWriter

    class VariantWriter(base):  # type: ignore[misc, valid-type]
        def add_add_space_prefix(self, value: bool) -> None:
            super().add_add_space_prefix(variant.add_space_prefix)

        def add_token_types(self, types: Sequence[int]) -> None:
            types = list(types)
            for tag in tag_ids:
                types[tag] = variant.tag_type
            super().add_token_types(types)

        def add_chat_template(self, value: Any) -> None:
            super().add_chat_template(variant.template)

    with mock.patch.object(gguf, "GGUFWriter", VariantWriter):
        yield


def compare_logits(llm: Any, model: Any, pieces: int, prompts: dict[str, list[int]], setting: str) -> dict[str, float]:
    result = {}
    for name, ids in prompts.items():
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0, :, :pieces].float().numpy()
        result[name] = float(np.abs(theirs - ours).max())
        print(f"  logits  {setting:<28} {name:<30} {len(ids):>5} positions  max |Δ| = {result[name]:.3e}"
              f"  (|logit| ≤ {np.abs(ours).max():.2f})")
    return result


# llama.cpp's defaults keep the KV cache in float16 (and flash attention, where on, computes in float16);
# a float32 cache without flash attention shows what the export itself does.
LLAMA_SETTINGS = {
    "float32 KV cache, no flash attn": {"type_k": 0, "type_v": 0, "flash_attn": False},  # GGML_TYPE_F32
    "llama.cpp defaults (f16 KV)": {},
}


def verify(label: str, folder: Path, work: Path) -> dict[str, Any]:
    import gguf
    import sentencepiece
    from llama_cpp import Llama

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pieces = sp.get_piece_size()
    config = json.loads((folder / "config.json").read_text())
    long_context = "rope_scaling" in config
    gguf_path = export_checkpoint(str(folder), work / f"{label}.gguf", format="gguf", dtype="float32")
    print(f"{label}: {folder} → {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.1f} MB, float32)")

    model = load_model(str(folder), device="cpu", dtype="float32").model
    rng = torch.Generator().manual_seed(1)
    chat = engine_ids(sp, (None, [("你好", "你好！有什么可以帮你？")], "介绍一下杭州。"))
    text = [sp.bos_id()] + sp.encode("[|Human|]:你好，介绍一下杭州。[|AI|]:杭州是浙江省的省会。") * 12
    prompts = {
        "random ids": [sp.bos_id()] + torch.randint(4, pieces, (63,), generator=rng).tolist(),
        "chat prompt": chat,
        "repeated chat text": text,
    }
    if long_context:  # past the original 2,048 positions, where ntkmixed's factors matter most
        prompts["random ids, 2,600 positions"] = [sp.bos_id()] + torch.randint(4, pieces, (2599,), generator=rng).tolist()
    n_ctx = 4096 if long_context else 2048
    logits = {}
    for setting, options in LLAMA_SETTINGS.items():
        llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False, **options)
        logits[setting] = compare_logits(llm, model, pieces, prompts, setting)
        del llm

    cases = conversations(200, seed=len(label))
    expected = [engine_ids(sp, c) for c in cases]
    tag_ids = [sp.piece_to_id(HUMAN_TAG), sp.piece_to_id(AI_TAG)]
    chat_agreement: dict[str, Any] = {}
    for index, variant in enumerate(VARIANTS):
        path = work / f"{label}-variant{index}.gguf"
        with metadata_variant(gguf, variant, tag_ids):
            export_checkpoint(str(folder), path, format="gguf", dtype="float32")
        vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
        row: dict[str, Any] = {"of": len(cases)}
        for path_name, tokenize in (("llama-server", server_chat_ids), ("llama-cpp-python", python_chat_ids)):
            got = [tokenize(vocab, variant.template, c) for c in cases]
            misses = [(c, e, g) for c, e, g in zip(cases, expected, got) if g != e]
            typed = [m for m in misses if types_control_text(m[0])]
            row[path_name] = len(cases) - len(misses)
            row[f"{path_name} misses with '<s>'/'</s>' typed"] = len(typed)
            print(f"  chat    {variant.name:<82} {path_name:<16} {len(cases) - len(misses):>3}/{len(cases)} identical"
                  f" (misses: {len(typed)} with '<s>' or '</s>' typed in a message, {len(misses) - len(typed)} others)")
            shown = [m for m in misses if not types_control_text(m[0])][:3] + typed[:1]
            for case, exp, g in shown:
                print(f"      differs: {json.dumps(case, ensure_ascii=False)}")
                print(f"        bluelm:    {exp}")
                print(f"        llama.cpp: {g}")
        chat_agreement[variant.name] = row
        if index == 0:
            strings = [s for s in random_strings(3000, seed=len(label)) + TEXTS if s]  # SentencePiece: "" → []
            plain = sum(vocab.tokenize(s.encode("utf-8"), add_bos=True, special=False) == [1] + sp.encode(s) for s in strings)
            spaced = sum(vocab.tokenize((" " + s).encode("utf-8"), add_bos=True, special=False) == [1] + sp.encode(s) for s in strings)
            chat_agreement["plain text"] = {"as is": plain, "with a leading space": spaced, "of": len(strings)}
            print(f"  plain   {len(strings)} strings (special=False): {plain} identical as is, {spaced} with ' ' prepended")
        del vocab
    return {"logits_max_abs_diff": logits, "tokenization": chat_agreement}


def nfkc_tokenizer(path: Path) -> Path:
    """The tiny tokenizer trained with SentencePiece's default Unicode normalization (nmt_nfkc) instead of
    identity: llama.cpp applies no normalization, so this shows what a normalizing tokenizer.model costs."""
    import sentencepiece as spm

    from bluelm_cli.testing.tiny_checkpoint import _CORPUS

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_prefix=str(path.with_suffix("")), model_type="bpe", vocab_size=600,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=[HUMAN_TAG, AI_TAG], add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="nmt_nfkc",
        max_sentence_length=4096, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    return path


def verify_normalizing_tokenizer(work: Path) -> dict[str, Any]:
    import sentencepiece
    from llama_cpp import Llama

    folder = build_checkpoint(work / "tiny-nfkc", TinySpec(seed=7), tokenizer_model=nfkc_tokenizer(work / "nfkc.model"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    path = export_checkpoint(str(folder), work / "nfkc.gguf", format="gguf", dtype="float32")
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    strings = [s for s in random_strings(3000, seed=11) + TEXTS if s] + ["全角：标点，符号！", "ＡＢＣ１２３", "①②", "ﬁ"]
    identity = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model_bytes())
    changed = [s for s in strings if sp.normalize(s) != identity.normalize(s)]
    plain = sum(vocab.tokenize((" " + s).encode("utf-8"), add_bos=True, special=False) == [1] + sp.encode(s) for s in strings)
    plain_changed = sum(vocab.tokenize((" " + s).encode("utf-8"), add_bos=True, special=False) == [1] + sp.encode(s) for s in changed)
    cases = conversations(200, seed=11)
    chat = sum(server_chat_ids(vocab, GGUF_CHAT_TEMPLATE, c) == engine_ids(sp, c) for c in cases)
    print(f"nfkc tokenizer (normalization_rule_name=nmt_nfkc): plain (' ' prepended) {plain}/{len(strings)} identical"
          f" ({plain_changed}/{len(changed)} of the strings its normalizer changes); chat (llama-server) {chat}/{len(cases)}")
    return {"plain": plain, "of": len(strings), "plain_nfkc_changed": plain_changed, "of_nfkc_changed": len(changed),
            "chat": chat, "chat_of": len(cases)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a BlueLM checkpoint folder (default: tiny 2K and 32K ones)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}")
    work = Path(tempfile.mkdtemp(prefix="verify-gguf-"))
    folders = {"model": args.model} if args.model else {
        label: build_checkpoint(work / f"tiny-{label}", spec) for label, spec in TINY_SPECS.items()
    }
    results = {"llama_cpp_python": llama_cpp.__version__}
    for label, folder in folders.items():
        results[label] = verify(label, folder, work)
    if not args.model:
        results["nfkc tokenizer"] = verify_normalizing_tokenizer(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
