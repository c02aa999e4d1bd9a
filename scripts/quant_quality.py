"""Quality of `--quantize int8|int4` next to the unquantized weights: perplexity on a fixed text, and greedy
agreement over 256 tokens. Prints one JSON object.

* perplexity: exp of the mean next-token cross-entropy over FIXED_TEXT (its ids once, teacher-forced);
* greedy agreement: the unquantized model writes 256 greedy tokens after a fixed prompt (stops suppressed); the
  quantized model is then fed that same text, and `teacher_forced_agreement` is the share of those 256 positions
  where its greedy choice is the reference's token; `free_run_identical_prefix` is how many tokens its own
  greedy answer shares with the reference's before the first difference.

  PYTHONPATH=. python scripts/quant_quality.py --tiny                      # CPU, a tiny random checkpoint, int8
  PYTHONPATH=. python scripts/quant_quality.py --model vivo-ai/BlueLM-7B-Chat --device cuda --dtype bfloat16 \\
      --schemes int8 int4                                                    # the GPU check
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from bluelm_cli.core.prompt import PromptPlan, build_prompt_ids
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.local.quantize import quantize_weights
from bluelm_cli.modeling.modeling_bluelm import fuse_projections

FIXED_TEXT = (
    "The key-value cache keeps the attention states of every token a model has read, so that a conversation "
    "can go on without reading its beginning again. When the context window is full, the oldest turns have to "
    "leave it. A weight-only quantization stores each weight in eight or four bits with a scale per row or per "
    "group, and multiplies by the scale on the fly: decoding one token at a time reads every weight once, so "
    "fewer bytes per weight mean more tokens per second. 量化只改变权重的存储方式，模型的结构和提示格式保持不变。"
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"
)
PROMPT = "Explain in a few paragraphs why a key-value cache makes chatting with a language model faster."
GREEDY_TOKENS = 256


def _load(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, device=args.device, dtype=args.dtype)


def _perplexity(loaded: LoadedModel, ids: list[int]) -> float:
    tensor = torch.tensor([ids], device=loaded.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=tensor).logits[0, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits, tensor[0, 1:])
    return math.exp(loss.item())


def _greedy(loaded: LoadedModel, prompt: list[int]) -> list[int]:
    settings = SamplingSettings(max_new_tokens=GREEDY_TOKENS, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    return list(ChatEngine(loaded).stream(PromptPlan(prompt), settings, min_new_tokens=GREEDY_TOKENS).finish().answer_ids)


def _teacher_forced(loaded: LoadedModel, prompt: list[int], answer: list[int]) -> float:
    tensor = torch.tensor([prompt + answer], device=loaded.device)
    stops = [loaded.tokenizer.eos_token_id, loaded.tokenizer.sp_model.piece_to_id("[|Human|]:")]
    with torch.inference_mode():
        logits = loaded.model(input_ids=tensor).logits[0, len(prompt) - 1 : -1].float()
        logits[:, stops] = float("-inf")  # as when the reference wrote it (stops suppressed)
        choices = logits.argmax(-1).tolist()
    return sum(a == b for a, b in zip(choices, answer)) / len(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint id or folder")
    parser.add_argument("--tiny", action="store_true", help="build a tiny random checkpoint (CPU smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--schemes", nargs="+", default=["int8"], choices=["int8", "int4"])
    args = parser.parse_args()
    if args.tiny:
        from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

        args.model = str(build_checkpoint(Path(tempfile.mkdtemp(prefix="bluelm-quality-")), TinySpec(max_position_embeddings=1024)))
    if not args.model:
        parser.error("give --model or --tiny")

    reference = _load(args)
    encoder = ChatEngine(reference).encoder
    text_ids = [encoder.bos_id, *encoder.encode_plain(FIXED_TEXT)]
    prompt = build_prompt_ids(encoder, None, [], PROMPT).ids
    answer = _greedy(reference, prompt)
    rows = [{"weights": f"{args.dtype} (reference)", "perplexity": round(_perplexity(reference, text_ids), 4),
             "teacher_forced_agreement": round(_teacher_forced(reference, prompt, answer), 4),
             "free_run_identical_prefix": len(answer)}]
    del reference
    for scheme in args.schemes:
        quantized = _load(args)
        fuse_projections(quantized.model)
        label = quantize_weights(quantized.model, scheme)
        own = _greedy(quantized, prompt)
        prefix = next((i for i, (a, b) in enumerate(zip(own, answer)) if a != b), min(len(own), len(answer)))
        rows.append({"weights": label, "perplexity": round(_perplexity(quantized, text_ids), 4),
                     "teacher_forced_agreement": round(_teacher_forced(quantized, prompt, answer), 4),
                     "free_run_identical_prefix": prefix})
        del quantized
    print(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": "tiny random checkpoint" if args.tiny else args.model,
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(args.device)})",
        "text_tokens": len(text_ids),
        "greedy_tokens": len(answer),
        "rows": rows,
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
