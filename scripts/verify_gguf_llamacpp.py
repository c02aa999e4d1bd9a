"""Compare llama.cpp's logits and prompt tokens on an exported GGUF with bluelm-cli's own model (not CI).

    pip install llama-cpp-python        # compiles llama.cpp from source: ~13+ min on 2 cores
    python scripts/verify_gguf_llamacpp.py [--model FOLDER]   # default: a tiny 32K checkpoint built here

Prints the largest float32 logit difference over a prompt (the README's figure) and whether llama.cpp
tokenizes a rendered chat prompt (GGUF chat template, add_space_prefix off) to SentencePiece's ids.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bluelm_cli.export import export_checkpoint
from bluelm_cli.export.chat_template import GGUF_CHAT_TEMPLATE
from bluelm_cli.loading import load_model
from bluelm_cli.prompt import HistoryTurn, build_prompt_ids
from bluelm_cli.tiny_checkpoint import TinySpec, build_checkpoint
from bluelm_cli.tokenizer import AI_TAG


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="a BlueLM checkpoint folder (default: a tiny 32K one)")
    args = parser.parse_args()
    from llama_cpp import Llama
    import jinja2
    import sentencepiece

    work = Path(tempfile.mkdtemp())
    folder = args.model or build_checkpoint(
        work / "tiny-32k", TinySpec(rope_scaling={"type": "ntkmixed", "factor": 16.0, "power": 0.25}, seed=3)
    )
    gguf_path = export_checkpoint(str(folder), work / "model.gguf", format="gguf", dtype="float32")
    ours = load_model(str(folder), device="cpu", dtype="float32").model
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    llm = Llama(model_path=str(gguf_path), n_ctx=4096, logits_all=True, verbose=False)

    ids = [1] + sp.encode("[|Human|]:你好，介绍一下杭州。[|AI|]:杭州是浙江省的省会。") * 4
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0, :, : sp.get_piece_size()].numpy()
    print(f"logits: {len(ids)} positions, max |llama.cpp - bluelm| = {np.abs(theirs - expected).max():.3e}")

    history = [("你好", "你好！"), (" two  spaces", "ok")]
    message = "[|AI|]: inside"
    for system in (None, "你是一个简洁的助手。"):
        turns = [HistoryTurn(user=u, answer_ids=sp.encode(AI_TAG + a)[2:]) for u, a in history]
        engine = build_prompt_ids(sp.encode, bos_id=1, eos_id=2, system=system, history=turns, message=message).ids
        messages = ([{"role": "system", "content": system}] if system else []) + [
            m for u, a in history for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
        ] + [{"role": "user", "content": message}]
        text = jinja2.Environment().from_string(GGUF_CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        same = got == engine
        print(f"chat prompt (system={system is not None}): {'identical' if same else 'DIFFERENT'} ids")
        if not same:
            print("  sentencepiece:", engine)
            print("  llama.cpp:    ", got)
    return 0


if __name__ == "__main__":
    sys.exit(main())
