#!/usr/bin/env python3
"""Where a turn's time goes on the GPU, for the GPU check's `profile` step (7B shapes, random weights, bf16).

    python3 scripts/gpu_profile.py OUT_DIR [--shape 7b] [--device cuda]

Writes OUT_DIR/profile.json and OUT_DIR/profile.txt:
  capture      GraphRunner warm-up (one CUDA graph per attention window)
  ttft         time to first token for a 1,000-token first turn and for short follow-ups that reuse the cache
  prefill      torch.profiler over one short follow-up prefill: the ops that take the host's and the GPU's time
  decode       ms per decode step: graph replay per window, and the eager step, timed with CUDA events
  agreement    ‖graph − eager‖ / ‖eager‖ of one decode step's logits, and whether the argmax agrees
  syncs        device-to-host syncs in one 16-token turn, by the line of ours or transformers' that asked
On a CPU (`--device cpu --shape cpu25m`) the same steps run without graphs, to check the script itself.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bluelm_cli.bench.local import SHAPES, random_weights_model  # noqa: E402
from bluelm_cli.local.engine import ChatEngine, StepRunner  # noqa: E402
from bluelm_cli.local.fastpath import GraphRunner  # noqa: E402
from bluelm_cli.core.prompt import PromptPlan  # noqa: E402
from bluelm_cli.core.settings import SamplingSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(count: int, pieces: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(10, pieces, (count - 1,), generator=generator).tolist()]


def _set_length(cache: Any, length: int) -> None:
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def _time_steps(step: Any, device: torch.device, repeats: int) -> float:
    """Median ms of `step()` over `repeats`, with CUDA events on a GPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict[str, Any] = {"shape": args.shape, "device": str(device)}
    text: list[str] = []

    def section(name: str, function: Any) -> None:
        started = time.perf_counter()
        try:
            report[name] = function()
        except Exception as error:  # noqa: BLE001 - one failing section must not hide the others
            report[name] = {"error": f"{type(error).__name__}: {error}"[:500], "trace": traceback.format_exc()[-1500:]}
        print(f"[profile] {name}: {time.perf_counter() - started:.1f} s", flush=True)
        (args.out / "profile.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")

    loaded = random_weights_model(SHAPES[args.shape], device, dtype)
    pieces = loaded.tokenizer.sp_model.get_piece_size()
    context = min(loaded.context_length, 2048)
    runner = GraphRunner(loaded.model, context, use_graphs=device.type == "cuda")

    def capture() -> dict[str, Any]:
        started = time.perf_counter()
        runner.warm_up()
        return {"seconds": round(time.perf_counter() - started, 3), "windows": runner.windows}

    section("capture", capture)
    engine = ChatEngine(loaded, runner=runner)
    greedy = SamplingSettings(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0, seed=0)
    conversation = _ids(1000, pieces, 1)

    def ttft() -> dict[str, Any]:
        figures = []
        ids = list(conversation)
        for turn in range(4):
            result = engine.stream(PromptPlan(ids), greedy, min_new_tokens=greedy.max_new_tokens).finish()
            figures.append({"prompt": len(ids), "reused": result.reused_tokens, "prefill": result.prefill_tokens,
                            "ttft_ms": round(1000 * result.ttft_s, 2), "decode_tok_s": round(result.decode_tok_s, 1)})
            ids = [*ids, *result.answer_ids, 2, *_ids(36, pieces, 10 + turn)[1:]]
        conversation[:] = ids
        return {"turns": figures}

    section("ttft", ttft)

    def prefill_profile() -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        settings = SamplingSettings(max_new_tokens=2, temperature=0.0, repetition_penalty=1.0)
        engine.stream(PromptPlan(conversation), settings).finish()  # the cache holds the conversation
        # The prefill itself, in this thread (the profiler sees the thread it runs in, not the engine's worker).
        cache, start = engine._cache, len(engine._cached_ids)
        suffix = torch.tensor([_ids(36, pieces, 99)[1:]], device=device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode(), profile(activities=activities) as prof:
            runner.prefill(cache, suffix, start)
            _sync(device)
        wall = time.perf_counter() - started
        averages = prof.key_averages()
        by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=25)
        text.extend(["== short follow-up prefill, by self CPU time ==", by_cpu])
        if device.type == "cuda":
            text.extend(["== by self CUDA time ==", averages.table(sort_by="self_cuda_time_total", row_limit=15)])
        rows = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:12]
        engine.reset()  # the cache now holds tokens the engine does not know of
        return {"wall_ms": round(1000 * wall, 2), "prefill_tokens": suffix.shape[1],
                "top_self_cpu_ms": {event.key: round(event.self_cpu_time_total / 1000, 3) for event in rows}}

    section("prefill", prefill_profile)

    def decode() -> dict[str, Any]:
        engine.reset()
        cache = runner.new_cache()  # the runner's one static cache; its stale slots are fine for timing
        token = torch.ones((1, 1), dtype=torch.long, device=device)
        figures: dict[str, Any] = {}
        with torch.inference_mode():
            for window in runner.windows:
                position = min(window, context) - 8
                _set_length(cache, position)  # slots past the conversation hold stale keys: fine for timing

                def step(position: int = position) -> None:
                    runner.decode(cache, token, position)
                    cache.crop(-1)

                figures[f"graph window {window} ms"] = round(_time_steps(step, device, 30), 3)
            graphs, runner._graphs = runner._graphs, {}
            _set_length(cache, context - 8)
            try:
                figures["eager step, window 2048 ms"] = round(_time_steps(lambda: (runner.decode(cache, token, context - 8), cache.crop(-1)), device, 10), 3)
            finally:
                runner._graphs = graphs
        engine.reset()
        return figures

    section("decode", decode)

    def agreement() -> dict[str, Any]:
        eager_engine = ChatEngine(loaded, runner=StepRunner(loaded.model))
        ids = conversation[:1200]
        settings = SamplingSettings(max_new_tokens=2, temperature=0.0, repetition_penalty=1.0)
        captured: dict[str, torch.Tensor] = {}
        for label, chat in (("graph", engine), ("eager", eager_engine)):
            chat.reset()
            result = chat.stream(PromptPlan(ids), settings).finish()
            with torch.inference_mode():
                captured[label] = chat.runner.decode(chat._cache, torch.tensor([[result.answer_ids[0]]], device=device), len(ids)).float()
        graph, eager = captured["graph"], captured["eager"]
        engine.reset()
        return {"relative_error": float((graph - eager).norm() / eager.norm()),
                "argmax_agrees": bool(graph.argmax() == eager.argmax()),
                "top2_gap_eager": float(eager.topk(2).values.diff().abs())}

    section("agreement", agreement)

    def syncs() -> dict[str, Any]:
        if device.type != "cuda":
            return {"note": "CUDA only"}
        sites: collections.Counter[str] = collections.Counter()
        original = warnings.showwarning

        def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if "synchroniz" not in str(message):
                return original(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "bluelm_cli" in f.filename or "transformers" in f.filename]
            where = frames[-1] if frames else None
            sites[f"{Path(where.filename).name}:{where.lineno} {where.line}" if where else "?"] += 1

        settings = SamplingSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
        engine.stream(PromptPlan(conversation[:500]), settings).finish()
        warnings.showwarning = record
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                result = engine.stream(PromptPlan(conversation[:520]), settings, min_new_tokens=16).finish()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = original
        return {"tokens": result.new_tokens, "total": sum(sites.values()), "sites": dict(sites.most_common(12))}

    section("syncs", syncs)
    (args.out / "profile.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    summary = {key: value for key, value in report.items() if key not in ("prefill",)}
    print(json.dumps(summary, indent=1, default=str)[:6000])
    if isinstance(report.get("prefill"), dict):
        print(json.dumps(report["prefill"], indent=1)[:2500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
