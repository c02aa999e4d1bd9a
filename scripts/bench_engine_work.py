"""The engine's own work per token: the real decode loop (sampling, repetition penalty, stop checks, detokenizing)
with the forward replaced by a fixed logits row (`bench.overhead.CachedLogitsRunner`). Prints one JSON object:

  cpu_ms_per_token   CPU time per token, best of --repeats runs, run in this thread with one torch thread (CPU
                     time, not wall time: steadier on a shared machine)
  ops_per_token      top-level torch operators per token (torch profiler), what launches kernels on a GPU

  PYTHONPATH=. python scripts/bench_engine_work.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bluelm_cli.bench.local import random_weights_model
from bluelm_cli.bench.overhead import CachedLogitsRunner, stub_logits
from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine

SHAPES = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=4096)
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
CASES = {  # label: (settings, vocabulary, tokens a run)
    "640 greedy": (GREEDY, 640, 1000),
    "640 greedy + penalty 1.1": ({**GREEDY, "repetition_penalty": 1.1}, 640, 1000),
    "640 default sampling": ({}, 640, 1000),
    "100096 greedy": (GREEDY, 100_096, 200),
    "100096 default sampling": ({}, 100_096, 100),
}


def _engine(loaded: object, vocab: int) -> ChatEngine:
    logits = stub_logits(vocab, 600, torch.device("cpu"), torch.float32)
    return ChatEngine(loaded, runner=CachedLogitsRunner(loaded.model, logits))  # type: ignore[arg-type, attr-defined]


def _turn(engine: ChatEngine, settings: SamplingSettings, tokens: int) -> None:
    engine.reset()
    result = engine._generate(PromptPlan(list(range(5, 400))), settings, tokens, threading.Event(), lambda text: None)
    assert result.new_tokens == tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = random_weights_model(SHAPES, "cpu", torch.float32)
    report: dict[str, dict[str, float]] = {"cpu_ms_per_token": {}, "ops_per_token": {}}
    for label, (values, vocab, tokens) in CASES.items():
        engine = _engine(loaded, vocab)
        settings = SamplingSettings(max_new_tokens=tokens, seed=0, **values)
        best = float("inf")
        for _ in range(args.repeats):
            started = time.process_time()
            _turn(engine, settings, tokens)
            best = min(best, (time.process_time() - started) / tokens)
        report["cpu_ms_per_token"][label] = round(1000 * best, 4)
        counts = []
        for short in (10, 30):  # the difference between two turns: per-turn work cancels out
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                _turn(engine, SamplingSettings(max_new_tokens=short, seed=0, **values), short)
            counts.append(sum(1 for e in profiler.events() if e.name.startswith("aten::") and e.cpu_parent is None))
        report["ops_per_token"][label] = (counts[1] - counts[0]) / 20
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
