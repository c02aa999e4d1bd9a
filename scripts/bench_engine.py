#!/usr/bin/env python
"""Thin wrapper around bluelm_cli.bench until `bluelm bench` exists.

    python scripts/bench_engine.py --random-weights cpu25m --turns 16 --baseline
    python scripts/bench_engine.py --random-weights 7b --device cuda --dtype bfloat16 --baseline
    python scripts/bench_engine.py --model /path/to/BlueLM-7B-Chat --baseline
"""

from __future__ import annotations

import argparse
import sys

import torch

from bluelm_cli.bench import format_report, random_weights_model, run_bench
from bluelm_cli.engine import ChatEngine

# ~25M parameters: hidden 512, 8 layers, 8 heads, intermediate 1376, tiny tokenizer's vocab (640 rows).
from bluelm_cli.bench import CPU_25M  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or hub id")
    source.add_argument("--random-weights", metavar="SHAPE",
                        help="cpu25m, 7b (PUBLISHED_7B shapes), or a config.json / checkpoint folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline", action="store_true", help="also run model.generate() re-encoding each turn")
    parser.add_argument("--repeats", type=int, default=1, help="run the conversation N times, keep each turn's best")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", action="store_true", help="print the report as JSON after the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from bluelm_cli.loading import load_model, pick_device, pick_dtype

    if args.model:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        label = args.model
    else:
        from bluelm_cli.tiny_checkpoint import PUBLISHED_7B

        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        shapes = {"cpu25m": CPU_25M, "7b": PUBLISHED_7B}.get(args.random_weights.lower(), args.random_weights)
        loaded = random_weights_model(shapes, device, dtype)
        label = f"random weights, {args.random_weights} shapes"
    report = run_bench(ChatEngine(loaded), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       turns=args.turns, baseline=args.baseline, model_label=label,
                       repeats=args.repeats)
    print(format_report(report))
    if args.json:
        print(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
