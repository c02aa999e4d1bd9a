"""Kernels per decode forward, before and after fusing q/k/v and gate/up (torch profiler), and the decode step's
time eager and replayed from the CUDA graph. Prints one JSON object.

On a GPU the count is of CUDA kernels; on a CPU (a dry run) it is of aten operators, the same structure.

  PYTHONPATH=. python scripts/gpu_kernels.py --shape 7b --device cuda --dtype bfloat16
  PYTHONPATH=. python scripts/gpu_kernels.py --shape cpu25m               # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bluelm_cli.bench.local import SHAPES, random_weights_model
from bluelm_cli.local.fastpath import GraphRunner
from bluelm_cli.modeling.modeling_bluelm import fuse_projections

CONTEXT_TOKENS = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(runner: GraphRunner, device: torch.device, repeats: int) -> dict[str, Any]:
    """Kernels (or operators) in one decode step after CONTEXT_TOKENS of prompt, and its median time."""
    cache = runner.new_cache()
    token = torch.ones((1, 1), dtype=torch.long, device=device)
    with torch.inference_mode():
        runner.prefill(cache, torch.ones((1, CONTEXT_TOKENS), dtype=torch.long, device=device), 0)
        position = CONTEXT_TOKENS
        for _ in range(3):  # warm
            runner.decode(cache, token, position)
            cache.crop(-1)
        _sync(device)
        activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as profiler:
            runner.decode(cache, token, position)
            _sync(device)
        cache.crop(-1)
        if device.type == "cuda":
            kernels = sum(1 for event in profiler.events() if event.device_type == DeviceType.CUDA)
        else:
            kernels = sum(1 for event in profiler.events() if event.name.startswith("aten::") and event.cpu_parent is None)
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            runner.decode(cache, token, position)
            _sync(device)
            times.append(time.perf_counter() - started)
            cache.crop(-1)
    times.sort()
    return {"kernels_per_forward" if device.type == "cuda" else "top_level_aten_ops_per_forward": kernels,
            "step_ms_median": round(1000 * times[len(times) // 2], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu25m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = random_weights_model(SHAPES[args.shape], device, getattr(torch, args.dtype))
    cuda = device.type == "cuda"
    report: dict[str, Any] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": args.shape,
                              "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": args.dtype,
                              "context_tokens": CONTEXT_TOKENS}
    length = 2 * CONTEXT_TOKENS
    report["eager_unfused"] = _measure(GraphRunner(loaded.model, length, use_graphs=False), device, args.repeats)
    fuse_projections(loaded.model)
    report["eager_fused"] = _measure(GraphRunner(loaded.model, length, use_graphs=False), device, args.repeats)
    if cuda:
        runner = GraphRunner(loaded.model, length)
        runner.warm_up()
        report["graph_fused"] = _measure(runner, device, args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
