"""Prompt-lookup decoding against plain greedy decoding on one model, interleaved, best of N runs.

Four ways of decoding the same greedy answer (`--new-tokens`, stops suppressed so every run decodes as many):
* plain: one forward per token (prompt lookup off);
* lookup: prompt lookup as the chat runs it (drafts from the prompt and the answer so far);
* no-match: the lookup runs but never finds a draft (what a turn where nothing repeats costs);
* all-rejected: every step drafts `--draft` tokens that are never right (the worst case: a verify forward
  of 1 + draft tokens that settles one token).
Each mode's answer is checked against plain greedy decoding. With `--temperature T` (> 0) every mode samples
instead (the defaults' top-p, top-k and repetition penalty, seed 0), and lookup uses exact speculative sampling:
its answers have plain sampling's distribution but not its tokens, so `answers_equal_plain` is left out.
Prints one JSON object: decode tok/s per mode
(best of `--repeats`), forwards per token, and the ratios to plain.

On a shared CPU, wall time swings by several times between runs; the CPU seconds a decode uses swing much less.
So on the CPU each mode is also timed in process CPU time, with one torch thread (no worker threads spinning
while they wait): `decode_cpu_ms_per_token` is the best, over the runs, of (CPU time of the turn − CPU time of
the same turn cut to its first token) / (new tokens − 1), and `cpu_over_plain` compares those.

  PYTHONPATH=. python scripts/bench_prompt_lookup.py --shape cpu25m --repeats 5
  PYTHONPATH=. python scripts/bench_prompt_lookup.py --shape cpu25m --repeats 5 --temperature 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone

import torch

import bluelm_cli.local.engine as engine_module
from bluelm_cli.bench.local import SHAPES, bench_message, random_weights_model
from bluelm_cli.core.prompt import fit_prompt
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.prompt_lookup import NgramLookup


class _NeverFinds(NgramLookup):
    def draft(self, limit: int = 8) -> list[int]:
        return []


def _always_wrong(draft_tokens: int) -> type[NgramLookup]:
    class AlwaysWrong(NgramLookup):
        def draft(self, limit: int = 8) -> list[int]:
            # Token ids no greedy step picks here: the padding-free top of a small vocabulary, shifted.
            return [(self.tokens[-1] + 1 + i) % 500 + 3 for i in range(min(limit, draft_tokens))]

    return AlwaysWrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu25m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft", type=int, default=8, help="draft length of the all-rejected mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1, see above)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); above 0: sampled with the default top-p, top-k and repetition penalty")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="with --temperature: this penalty instead of the default (1.0 = none)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    loaded = random_weights_model(SHAPES[args.shape], args.device, getattr(torch, args.dtype))
    if args.temperature > 0:
        penalty = {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}
        settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=0, **penalty)
    else:
        settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                    repetition_penalty=1.0, seed=0)
    modes = {"plain": (False, NgramLookup), "lookup": (True, NgramLookup), "no-match": (True, _NeverFinds),
             "all-rejected": (True, _always_wrong(args.draft))}
    runner = None
    if loaded.device.type == "cuda":  # the chat's fast path: one static cache and graph runner for every mode
        from bluelm_cli.local.fastpath import make_runner
        from bluelm_cli.modeling.modeling_bluelm import fuse_projections

        fuse_projections(loaded.model)
        runner = make_runner(loaded)
    engines = {name: ChatEngine(loaded, runner=runner, prompt_lookup=on) for name, (on, _) in modes.items()}
    message = bench_message(engines["plain"], 1, args.prompt_tokens)
    plan = fit_prompt(engines["plain"].encoder, None, [], message, context_limit=engines["plain"].context_limit,
                      max_new_tokens=args.new_tokens)
    first_token = replace(settings, max_new_tokens=1)
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    forwards: dict[str, float] = {}
    answers: dict[str, list[int]] = {}
    original = engine_module.NgramLookup
    try:
        names = list(modes)
        for round_number in range(args.repeats + 1):  # the first round warms up and is not counted
            # The order rotates every round: on a shared machine, no mode always runs first or last.
            for name in names[round_number % len(names):] + names[: round_number % len(names)]:
                lookup_class = modes[name][1]
                engine_module.NgramLookup = lookup_class  # type: ignore[misc]
                engine = engines[name]
                engine.reset()
                started = time.process_time()
                engine.stream(plan, first_token, min_new_tokens=1).finish()
                prefill_cpu = time.process_time() - started
                engine.reset()
                started = time.process_time()
                result = engine.stream(plan, settings, min_new_tokens=args.new_tokens).finish()
                decode_cpu = (time.process_time() - started - prefill_cpu) / (args.new_tokens - 1)
                if name in answers:
                    best[name] = max(best[name], result.decode_tok_s)
                    best_cpu[name] = min(best_cpu[name], decode_cpu)
                else:
                    answers[name] = list(result.answer_ids)
                    best[name], best_cpu[name] = 0.0, float("inf")
                forwards[name] = result.forwards_per_token
    finally:
        engine_module.NgramLookup = original  # type: ignore[misc]
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{args.device} ({torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()},"
                  f" {os.cpu_count()} cores)",
        "shape": args.shape,
        "prompt_tokens": len(plan.ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decode_tok_s": {name: round(value, 2) for name, value in best.items()},
        "forwards_per_token": {name: round(value, 4) for name, value in forwards.items()},
        "over_plain": {name: round(value / best["plain"], 3) for name, value in best.items() if best["plain"]},
        "decode_cpu_ms_per_token": {name: round(1000 * value, 3) for name, value in best_cpu.items()},
        # Speed relative to plain from CPU time: plain's CPU time per token over the mode's (above 1 = faster).
        "cpu_over_plain": {name: round(best_cpu["plain"] / value, 3) for name, value in best_cpu.items() if value > 0},
        "sampling": {key: value for key, value in settings.as_dict().items() if key != "max_new_tokens"},
    }
    if settings.greedy:
        report["answers_equal_plain"] = {name: answers[name] == answers["plain"] for name in answers}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
