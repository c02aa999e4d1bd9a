"""`bluelm bench`: load, prefill, time to first token per turn and decode speed, of a local or a served model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bluelm_cli.cli.common import ApiKeyFileOpt, ApiKeyOpt, DebugOpt, _resolve, _stderr_console
from bluelm_cli.cli.options import setting_options
from bluelm_cli.cli.startup import load_local, local_engine, open_backend
from bluelm_cli.core.errors import ExitStatus, UsageError


@setting_options("model", "source", "device", "dtype", "compile", "kv_cache", "quantize", "context_shift", "prompt_lookup", "api")
def bench(
    *,
    flags: dict[str, Any],
    api_key: ApiKeyOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Random weights built on the device, shaped like --shape (or --model's config.json when it is a folder): no download.")] = False,
    shape: Annotated[Optional[str], typer.Option(help="Shapes for --random-weights: 7b (published BlueLM-7B), 7b-32k (the same with a 32K context), cpu25m (26M parameters) or cpu25m-32k; default: 7b on a GPU, cpu25m on the CPU.", metavar="SHAPE", show_default=False)] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Tokens in the first message.", metavar="N")] = 256,
    new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=2, help="Tokens decoded every turn (also --new-tokens).", metavar="N")] = 64,
    turns: Annotated[int, typer.Option(min=1, help="Turns in the conversation.", metavar="N")] = 16,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also measure plain model.generate() re-encoding the history each turn, and print ratios.")] = False,
    repeats: Annotated[int, typer.Option(min=1, metavar="N", help="Run the conversation N times; keep each turn's best figures.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with a `turns` list.")] = False,
    runner: Annotated[str, typer.Option(metavar="NAME", help="The CUDA fast path to measure: graphs (CUDA graphs per attention window, the chat's), compiled (torch.compile) or fused (graphs per window with RMSNorm, RoPE and SiLU compiled into one kernel each).")] = "graphs",
    prefill_graph: Annotated[Optional[bool], typer.Option("--prefill-graph/--no-prefill-graph", help="With the graphs or fused runner, also replay each prefill chunk from a CUDA graph (padded to a bucket length; flash attention from an empty cache). Default: what the chat does (off until a GPU has measured it).", show_default=False)] = None,
    debug: DebugOpt = False,
) -> int:
    """Measure load time, prefill, time to first token per turn and decode speed (see BENCHMARKS.md)."""
    if _resolve(flags)[0]["api"]:  # a served model, measured from the client (no torch imported)
        return _bench_served(flags, api_key, api_key_file, prompt_tokens=prompt_tokens, new_tokens=new_tokens, turns=turns,
                             repeats=repeats, as_json=as_json, other_options=baseline or random_weights)
    from bluelm_cli.bench.local import SHAPES, format_report, random_weights_model, run_bench
    from bluelm_cli.local.engine import StepRunner
    from bluelm_cli.local.fastpath import RUNNERS
    from bluelm_cli.local.loading import pick_device, pick_dtype

    if runner not in RUNNERS:
        raise UsageError(f"unknown runner '{runner}'; use one of {', '.join(RUNNERS)}")
    settings, _ = _resolve(flags)
    errors = _stderr_console()
    if random_weights:
        folder = Path(settings["model"]).expanduser()
        target = pick_device(settings["device"])
        if shape is None:  # a 7B on a CPU takes tens of GB and minutes a turn: CPU-sized shapes there
            shape = "cpu25m" if target.type == "cpu" else "7b"
        if settings.source_of("model") != "default" and folder.exists():
            shapes: Any = folder
        elif shape in SHAPES:
            shapes = SHAPES[shape]
            _check_bench_memory(shape, shapes, target, pick_dtype(settings["dtype"], target))
        else:
            raise UsageError(f"unknown shape '{shape}'; use one of {', '.join(SHAPES)}")
        with errors.status(f"Building a random-weights model ({shape if shapes is not folder else folder}) on {target}…"):
            loaded = random_weights_model(shapes, target, pick_dtype(settings["dtype"], target))
        label = f"random weights, {shape if shapes is not folder else folder} shapes"
    else:
        loaded = load_local(settings, None, errors, chatting=False)
        label = loaded.model_id
    runner_started = time.perf_counter()
    engine = local_engine(loaded, settings, errors, runner, prefill_graph=prefill_graph)
    runner_s = time.perf_counter() - runner_started
    with errors.status("Running the benchmark conversation…"):
        report = run_bench(engine, prompt_tokens=prompt_tokens, new_tokens=new_tokens, turns=turns,
                           baseline=baseline, model_label=label, repeats=repeats)
    if type(engine.runner) is not StepRunner:
        report.compile_s = runner_s
        report.runner = runner
        report.prefill_graph = bool(getattr(engine.runner, "prefill_graphs", False))
    typer.echo(report.to_json() if as_json else format_report(report))
    return ExitStatus.OK


def _check_bench_memory(shape: str, config: dict[str, Any], target: Any, dtype: Any) -> None:
    """Refuse shapes whose random weights don't fit the CPU's free memory, saying how much they need."""
    if target.type != "cpu":
        return  # a GPU that runs out says so itself (CUDA out of memory), before minutes are spent
    import torch

    from bluelm_cli.core.sizes import describe_parameters, parameter_count

    parameters = parameter_count(config)
    needed = parameters * torch.tensor([], dtype=dtype).element_size()
    free = _free_memory()
    if free is not None and needed > free:
        raise UsageError(
            f"--shape {shape} has {describe_parameters(parameters)} parameters: about {needed / 1e9:.1f} GB of"
            f" {str(dtype).removeprefix('torch.')} weights, and this machine has {free / 1e9:.1f} GB free; use"
            " --shape cpu25m on the CPU, or a GPU (--device cuda)"
        )


def _free_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _bench_served(flags: dict[str, Any], api_key: str | None, api_key_file: str | None, *, prompt_tokens: int, new_tokens: int, turns: int,
                  repeats: int, as_json: bool, other_options: bool) -> int:
    from bluelm_cli.bench.remote import format_served_report, run_served_bench

    if other_options:
        raise UsageError("--baseline and --random-weights measure a local model; leave them out with --api")
    settings, _ = _resolve(flags)
    errors = _stderr_console()
    backend, _ = open_backend(settings, None, api_key, errors, api_key_file)
    with errors.status("Running the benchmark conversation…"):
        report = run_served_bench(backend, prompt_tokens=prompt_tokens, new_tokens=new_tokens, turns=turns, repeats=repeats)
    typer.echo(report.to_json() if as_json else format_served_report(report))
    return ExitStatus.OK
