"""Greedy agreement of the int8 KV cache (`--kv-cache int8`) with the model-dtype cache, on tiny checkpoints.

For each checkpoint and dtype it answers a few prompts greedily for N tokens (no stop tokens, no repetition
penalty) with both caches and reports:
- free-running: the share of answers identical over all N tokens, and the mean length of the common prefix;
- teacher-forced: the model-dtype cache's answer fed through the int8 cache step by step; the share of
  positions where the int8 cache's argmax is the same token, and the largest |logit difference|.

Usage: PYTHONPATH=$PWD python scripts/kv_cache_agreement.py [--tokens 256] [--folder CHECKPOINT ...]
Without --folder it builds the tiny 2K and 32K/ntkmixed checkpoints of the test suite (random weights).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bluelm_cli.core.prompt import fit_prompt
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine, StepRunner
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

PROMPTS = [
    "你好，请介绍一下你自己。",
    "What is the capital of France? Answer in one sentence.",
    "写一首关于春天的诗。",
    "def add(a, b):\n    return a + b\n# explain this code",
    "The quick brown fox jumps over the lazy dog. " * 20,
]


def answer(loaded: LoadedModel, kv_cache: str, prompt: str, tokens: int) -> tuple[list[int], list[int]]:
    engine = ChatEngine(loaded, runner=StepRunner(loaded.model, kv_cache=kv_cache))
    settings = SamplingSettings(max_new_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    plan = fit_prompt(engine.encoder, None, [], prompt, context_limit=engine.context_limit, max_new_tokens=tokens)
    stream = engine.stream(plan, settings, min_new_tokens=tokens)
    for _ in stream:
        pass
    assert stream.result is not None
    return list(plan.ids), stream.result.answer_ids


@torch.inference_mode()
def teacher_forced(loaded: LoadedModel, prompt_ids: list[int], reference: list[int]) -> tuple[int, float]:
    """(positions whose int8-cache argmax equals the reference token, largest |logit difference| vs the reference cache)."""
    device = loaded.model.get_output_embeddings().weight.device
    runners = {kind: StepRunner(loaded.model, kv_cache=kind) for kind in ("model", "int8")}
    caches = {kind: runner.new_cache() for kind, runner in runners.items()}
    ids = torch.tensor([prompt_ids], device=device)
    logits = {kind: runners[kind].prefill(caches[kind], ids, 0) for kind in runners}
    same, worst = 0, 0.0
    for step, token in enumerate(reference):
        same += int(int(logits["int8"].argmax()) == token)
        worst = max(worst, float((logits["int8"].float() - logits["model"].float()).abs().max()))
        position = len(prompt_ids) + step
        step_ids = torch.tensor([[token]], device=device)
        logits = {kind: runners[kind].decode(caches[kind], step_ids, position) for kind in runners}
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--folder", action="append", default=[])
    parser.add_argument("--dtype", action="append", default=[])
    args = parser.parse_args()
    dtypes = args.dtype or ["float32", "bfloat16"]
    folders = [Path(f) for f in args.folder]
    if not folders:
        root = Path(tempfile.mkdtemp(prefix="bluelm-kv-"))
        folders = [
            build_checkpoint(root / "tiny-2k", TinySpec(seed=0)),
            build_checkpoint(root / "tiny-32k-ntkmixed", TinySpec(rope_scaling={"type": "ntkmixed", "factor": 16.0, "power": 0.25}, seed=3)),
        ]
    print(f"| checkpoint | dtype | answers identical over {args.tokens} tokens | mean common prefix | teacher-forced top-1 agreement | max abs logit diff |")
    print("|---|---|---|---|---|---|")
    for folder in folders:
        for dtype in dtypes:
            loaded = load_model(str(folder), device="cpu", dtype=dtype)
            identical, prefix_total, same_total, positions, worst = 0, 0, 0, 0, 0.0
            for prompt in PROMPTS:
                prompt_ids, reference = answer(loaded, "model", prompt, args.tokens)
                _, quantized = answer(loaded, "int8", prompt, args.tokens)
                identical += int(reference == quantized)
                prefix = next((i for i, (a, b) in enumerate(zip(reference, quantized)) if a != b), min(len(reference), len(quantized)))
                prefix_total += prefix
                same, diff = teacher_forced(loaded, prompt_ids, reference)
                same_total += same
                positions += len(reference)
                worst = max(worst, diff)
            print(f"| {folder.name} | {dtype} | {identical}/{len(PROMPTS)} | {prefix_total / len(PROMPTS):.1f} | "
                  f"{same_total}/{positions} ({100 * same_total / positions:.2f}%) | {worst:.3g} |")


if __name__ == "__main__":
    main()
