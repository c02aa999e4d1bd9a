"""Kernels per decode forward (torch profiler) and the decode step's time, for each way of running the step:

  eager_unfused    the model as loaded, eager (q, k, v, gate and up: five matmuls a layer)
  graph_unfused    the same replayed from a CUDA graph (GraphRunner): the decode step before fusion (CUDA only)
  eager_fused      q/k/v and gate/up fused at load (two matmuls a layer), eager
  graph_fused      the same from a CUDA graph: the chat's default fast path (CUDA only)
  compiled_fused   torch.compile (inductor, no CUDA graph) of the fused step: RMSNorm with the residual add, RoPE
                   with the cache write, SiLU with the product, each one generated kernel
  compiled_fused_graph  the same with mode reduce-overhead (inductor's CUDA graphs; CUDA only, --reduce-overhead)
  pointwise_fused  the fused model with only its element-wise pieces compiled (modeling.compile_pointwise: RMSNorm,
                   RoPE, SiLU times up, one kernel each), stepped eagerly; `pointwise_fused_graph`: the same replayed
                   from the CUDA graph per window, the `fused` runner (CUDA only)

Prints one JSON object; `tok_s_equivalent` is 1000 / the step's median ms (the forward alone, no sampling).
On a GPU the count is of CUDA kernels (and copies). On a CPU (a dry run) it is of operators: aten operators at the
top level, and in a compiled step the C++ kernels inductor generated (named `cpp_fused_*`; the profiler sees them
through inductor's `cpp.enable_kernel_profile` setting, set here for the CPU only) plus the aten calls beside them.

  PYTHONPATH=. python scripts/gpu_kernels.py --shape 7b --device cuda --dtype bfloat16 --reduce-overhead
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
from bluelm_cli.local.fastpath import CompiledRunner, GraphRunner
from bluelm_cli.modeling.modeling_bluelm import compile_pointwise, fuse_projections

CONTEXT_TOKENS = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _operators(events: Any) -> int:
    """CPU operators in a profile: aten operators and inductor's generated kernels not inside another one."""

    def counted(event: Any) -> bool:
        return event.name.startswith("aten::") or "cpp_fused" in event.name

    total = 0
    for event in events:
        if not counted(event):
            continue
        parent = event.cpu_parent
        while parent is not None and not counted(parent):
            parent = parent.cpu_parent
        total += parent is None
    return total


def _measure(runner: GraphRunner | CompiledRunner, device: torch.device, repeats: int) -> dict[str, Any]:
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
            kernels = _operators(profiler.events())
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            runner.decode(cache, token, position)
            _sync(device)
            times.append(time.perf_counter() - started)
            cache.crop(-1)
    times.sort()
    median_ms = 1000 * times[len(times) // 2]
    return {"kernels_per_forward" if device.type == "cuda" else "top_level_aten_ops_per_forward": kernels,
            "step_ms_median": round(median_ms, 3), "tok_s_equivalent": round(1000 / median_ms, 1)}


def _compiled(model: torch.nn.Module, length: int, mode: str | None) -> tuple[CompiledRunner, float]:
    runner = CompiledRunner(model, length, mode=mode)
    started = time.perf_counter()
    runner.warm_up()
    return runner, round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu25m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled step (compiling takes a while)")
    parser.add_argument("--reduce-overhead", action="store_true",
                        help="also the compiled step with inductor's CUDA graphs (CUDA only; a second compile)")
    parser.add_argument("--out", help="also write the report to this file, after each measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = random_weights_model(SHAPES[args.shape], device, getattr(torch, args.dtype))
    cuda = device.type == "cuda"
    report: dict[str, Any] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": args.shape,
                              "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": args.dtype,
                              "context_tokens": CONTEXT_TOKENS}
    length = 2 * CONTEXT_TOKENS
    report["eager_unfused"] = _measure(GraphRunner(loaded.model, length, use_graphs=False), device, args.repeats)
    if cuda:
        runner = GraphRunner(loaded.model, length)
        runner.warm_up()
        report["graph_unfused"] = _measure(runner, device, args.repeats)
        del runner  # its graphs and cache
    fuse_projections(loaded.model)
    report["eager_fused"] = _measure(GraphRunner(loaded.model, length, use_graphs=False), device, args.repeats)
    if cuda:
        runner = GraphRunner(loaded.model, length)
        runner.warm_up()
        report["graph_fused"] = _measure(runner, device, args.repeats)
        del runner
    _save(report, args.out)
    if not args.no_compile:
        if not cuda:
            import torch._inductor.config as inductor_config

            # Inductor's generated CPU kernels are invisible to the profiler unless it wraps each in a record.
            inductor_config.cpp.enable_kernel_profile = True
        compiled, seconds = _compiled(loaded.model, length, None)
        report["compiled_fused"] = {**_measure(compiled, device, args.repeats), "compile_s": seconds}
        _save(report, args.out)
        del compiled
        if cuda and args.reduce_overhead:
            torch.compiler.reset()
            compiled, seconds = _compiled(loaded.model, length, "reduce-overhead")
            report["compiled_fused_graph"] = {**_measure(compiled, device, args.repeats), "compile_s": seconds}
            _save(report, args.out)
            del compiled
        torch.compiler.reset()
        compile_pointwise(loaded.model)
        stepped = GraphRunner(loaded.model, length, use_graphs=False)
        started = time.perf_counter()
        with torch.inference_mode():  # compiles the pieces (prefill and decode shapes) outside the timing
            stepped.prefill(stepped.new_cache(), torch.ones((1, 8), dtype=torch.long, device=device), 0)
            stepped.decode(stepped.new_cache(), torch.ones((1, 1), dtype=torch.long, device=device), 8)
        seconds = round(time.perf_counter() - started, 1)
        report["pointwise_fused"] = {**_measure(stepped, device, args.repeats), "compile_s": seconds}
        _save(report, args.out)
        if cuda:
            runner = GraphRunner(loaded.model, length)
            runner.warm_up()
            report["pointwise_fused_graph"] = _measure(runner, device, args.repeats)
    _save(report, args.out)
    print(json.dumps(report, indent=2))


def _save(report: dict[str, Any], path: str | None) -> None:
    """Rewrite the report file after each measurement: a run killed while compiling still leaves the others."""
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
