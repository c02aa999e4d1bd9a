"""The measurements behind `bluelm bench`: a multi-turn conversation through the ChatEngine, and optionally
the same conversation through plain transformers `generate()` re-encoding the whole history every turn.

A bench conversation
--------------------
* Turn 1 sends a user message of about `prompt_tokens` tokens; every later turn sends a message of about
  `FOLLOW_UP_TOKENS` (32) tokens, the size of a typical follow-up question. The texts are deterministic
  (fixed English sentences, numbered per turn), so two runs send the same ids.
* Every turn is greedy, repetition penalty 1.0, and decodes exactly `new_tokens` tokens: the engine
  suppresses </s> and [|Human|]: until then (`min_new_tokens`), generate() gets
  `min_new_tokens=max_new_tokens` with the same two ids as its eos ids. So both sides do the same work and,
  numerics permitting, produce the same answers (`BenchReport.answers_match`).
* History accumulates: answer ids enter the next prompt as generated, exactly as in the REPL.

What is measured per turn (`TurnRecord`)
-----------------------------------------
* `ttft_s`: time to the first answer token: building the prompt ids (``fit_prompt`) + cropping the
  cache + prefilling the new suffix + sampling. For generate(): from the call to the first token its
  streamer receives (full-history prefill included).
* `decode_tok_s`: (new_tokens - 1) / (time from the first to the last token), i.e. steady decoding speed
  including the engine's per-token work (detokenizing, streaming).
* The engine also reports `reused_tokens` (KV cache hits) and `prefill_tokens` (what actually ran).

Per-token overhead (`BenchReport.overhead`, `bluelm_cli.bench.overhead`): after the conversation, turn 1 is
generated again with every forward pass timed (device-synchronised), which splits the decode time into the
forward and everything outside it (sampling, repetition penalty, detokenizing, streaming, the worker
queue); and the decode loop is run with the forward replaced by a fixed logits row, at the model's
vocabulary and at the published 7B vocabulary (100,096), to show the engine's own cost per token.

`BenchReport.ratios`: `engine_ttft_last_over_first` (the point of reusing the cache: stays near 1 or
below), `generate_ttft_last_over_first` (re-encoding: grows with the history), `engine_decode_over_generate`
(mean decode tok/s, engine / generate(); ≥ 1 means no per-token overhead over transformers).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.loading import LoadedModel, dtype_name
from bluelm_cli.bench.overhead import measure_overhead
from bluelm_cli.core.prompt import HUMAN_TAG, HistoryTurn, PromptPlan, fit_prompt
from bluelm_cli.core.settings import SamplingSettings

# Shapes for random-weights runs: the published 7B, and a ~26M-parameter model for CPU ratios.
CPU_25M: dict[str, int] = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=8, max_position_embeddings=2048)
FOLLOW_UP_TOKENS = 32
WARMUP_PROMPT_TOKENS = 24
WARMUP_NEW_TOKENS = 4

_SENTENCES = (
    "The key-value cache keeps attention states across turns, so each new turn is fast.",
    "Large language models generate text one token at a time.",
    "The quick brown fox jumps over the lazy dog.",
    "Please explain how a transformer reads a long conversation and answers the last question.",
    "Once upon a time, there was a little robot who wanted to learn how to write poems.",
    "The model runs on CPU or GPU; bf16 weights need about 14 GB of memory.",
    "What is the capital of France, and why did it become the capital?",
    "Write a short function in Python that reverses a list without using slicing.",
)


@dataclass
class TurnRecord:
    turn: int
    context_tokens: int  # tokens the model attends over for this turn's first answer token (the prompt)
    reused_tokens: int  # prompt tokens served from the KV cache (always 0 for generate())
    prefill_tokens: int  # prompt tokens run through the model this turn
    new_tokens: int
    ttft_s: float
    decode_tok_s: float
    dropped_turns: int = 0
    forwards: int = 0  # model calls for this turn (prefill + decode steps; fewer than new_tokens with prompt lookup)
    shifted_tokens: int = 0  # of reused_tokens, those moved by a context shift


@dataclass
class BenchReport:
    model: str
    device: str
    dtype: str
    load_s: float
    prefill_tok_s: float  # turn 1: prefill tokens / ttft
    ttft_s: float  # turn 1
    decode_tok_s: float  # mean over turns
    peak_gpu_mem_gb: float | None
    peak_host_mem_gb: float
    turns: list[TurnRecord]
    baseline: list[TurnRecord] | None
    ratios: dict[str, float]
    parameters: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    answers_match: bool | None = None  # engine and generate() produced the same ids every turn
    repeats: int = 1  # conversations run; per-turn figures are the best of them
    overhead: dict[str, Any] | None = None  # overhead.OverheadReport as a dict
    compile_s: float | None = None  # the fast path's warm-up: capture or compile (set by the CLI, which builds the runner)
    runner: str | None = None  # which fast path ("graphs", "compiled"); None = eager
    prefill_graph: bool = False  # prefill chunks replayed from CUDA graphs per bucket length (--prefill-graph)
    forwards_per_token: float = 0.0  # model calls per generated token over the conversation (engine side)
    prompt_lookup: bool = False
    context_shift: bool = False
    quantization: str | None = None  # e.g. "torchao int8 weight-only" (--quantize)

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2)


# ------------------------------------------------------------------------------------------- messages
def bench_message(engine: ChatEngine, turn: int, tokens: int) -> str:
    """A deterministic user message of about `tokens` tokens (at least `tokens`, within one word)."""
    words: list[str] = [f"Question {turn}:"]
    pool = " ".join(_SENTENCES[(turn + i) % len(_SENTENCES)] for i in range(len(_SENTENCES))).split()
    text = words[0]
    index = 0
    # Grow by sentences' words; counting every few words keeps this cheap for long prompts.
    while engine.count_tokens(text) < tokens:
        step = max(1, (tokens - engine.count_tokens(text)) // 4)
        for _ in range(step):
            text += " " + pool[index % len(pool)]
            index += 1
    while index > 0 and engine.count_tokens(text) > tokens:  # trim the overshoot back to >= tokens
        shorter = text.rsplit(" ", 1)[0]
        if engine.count_tokens(shorter) < tokens:
            break
        text = shorter
        index -= 1
    return text


# ----------------------------------------------------------------------------------------------- runs
def _settings(new_tokens: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)


def _plan(engine: ChatEngine, history: list[HistoryTurn], message: str, new_tokens: int) -> PromptPlan:
    return fit_prompt(engine.encoder, None, history, message, context_limit=engine.context_limit, max_new_tokens=new_tokens)


def _engine_turn(
    engine: ChatEngine, history: list[HistoryTurn], message: str, new_tokens: int
) -> tuple[AnswerResult, float, int]:
    settings = _settings(new_tokens)
    started = time.perf_counter()
    plan = _plan(engine, history, message, new_tokens)
    plan_s = time.perf_counter() - started
    stream = engine.stream(plan, settings, min_new_tokens=new_tokens)
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result, plan_s, plan.dropped_turns


class _TimingStreamer:
    """A generate() streamer that only records when each token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_turn(engine: ChatEngine, ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    model = engine.model
    input_ids = torch.tensor([ids], dtype=torch.long, device=engine.device)
    streamer = _TimingStreamer()
    stop_ids = [engine.tokenizer.eos_token_id, engine.tokenizer.sp_model.piece_to_id(HUMAN_TAG)]
    _synchronize(engine.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            eos_token_id=stop_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
            use_cache=True,
            streamer=streamer,
        )
    _synchronize(engine.device)
    answer = output[0, len(ids) :].tolist()
    times = streamer.times
    ttft = times[0] - started
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    return answer, ttft, decode


class _Conversation:
    """One side of the bench: its own history (its own answers), advanced one turn at a time."""

    def __init__(self, engine: ChatEngine, new_tokens: int, use_generate: bool) -> None:
        self.engine = engine
        self.new_tokens = new_tokens
        self.use_generate = use_generate
        self.history: list[HistoryTurn] = []
        self.records: list[TurnRecord] = []
        self.answers: list[list[int]] = []

    def turn(self, message: str) -> None:
        engine, new_tokens = self.engine, self.new_tokens
        number = len(self.records) + 1
        if self.use_generate:
            plan = _plan(engine, self.history, message, new_tokens)
            answer, ttft, decode = _in_worker_thread(_generate_turn, engine, plan.ids, new_tokens)
            record = TurnRecord(number, len(plan.ids), 0, len(plan.ids), len(answer), ttft, decode, plan.dropped_turns)
            dropped = plan.dropped_turns
        else:
            result, plan_s, dropped = _engine_turn(engine, self.history, message, new_tokens)
            answer = list(result.answer_ids)
            record = TurnRecord(
                number,
                result.prompt_tokens,
                result.reused_tokens,
                result.prefill_tokens,
                result.new_tokens,
                plan_s + result.ttft_s,
                result.decode_tok_s,
                dropped,
                result.forwards,
                result.shifted_tokens,
            )
        self.records.append(record)
        self.answers.append(answer)
        if dropped:
            self.history = self.history[dropped:]
        self.history.append(HistoryTurn(message, answer))


def _in_worker_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run `function` in a fresh thread, as the engine runs its generation.

    Measured on glibc: a long generate() in the main thread decodes several times slower than the same
    call in a worker thread (the main malloc arena trims and re-faults the heap as the DynamicCache's
    torch.cat reallocates every step). Running both sides in worker threads compares the code, not the arena.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, name="bluelm-bench-generate", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(engine: ChatEngine, baseline: bool) -> None:
    message = bench_message(engine, 0, WARMUP_PROMPT_TOKENS)
    for _ in range(2):
        engine.reset()
        _engine_turn(engine, [], message, WARMUP_NEW_TOKENS)
    if baseline:
        ids = _plan(engine, [], message, WARMUP_NEW_TOKENS).ids
        for _ in range(2):
            _in_worker_thread(_generate_turn, engine, ids, WARMUP_NEW_TOKENS)
    engine.reset()


def run_bench(
    engine: ChatEngine,
    *,
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    turns: int = 16,
    baseline: bool = False,
    model_label: str | None = None,
    repeats: int = 1,
    overhead: bool = True,
) -> BenchReport:
    """Run a `turns`-turn conversation (see the module docstring) and measure it; the engine's cache is reset first."""
    if turns < 1 or new_tokens < 2 or prompt_tokens < 1:
        raise ValueError("bench needs turns >= 1, new_tokens >= 2 and prompt_tokens >= 1")
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _warm_up(engine, baseline)
    messages = [bench_message(engine, 1, prompt_tokens)]
    messages += [bench_message(engine, turn, FOLLOW_UP_TOKENS) for turn in range(2, turns + 1)]

    # The two conversations advance in lockstep (engine turn n, then generate() turn n), so that a change
    # in machine load affects both sides alike. With repeats > 1 the whole conversation is run again from an
    # empty cache and each turn keeps its best figures (noise on a shared machine only ever adds time).
    engine_runs: list[_Conversation] = []
    generate_runs: list[_Conversation] = []
    for _ in range(max(1, repeats)):
        engine.reset()
        engine_side = _Conversation(engine, new_tokens, use_generate=False)
        generate_side = _Conversation(engine, new_tokens, use_generate=True) if baseline else None
        for message in messages:
            engine_side.turn(message)
            if generate_side is not None:
                generate_side.turn(message)
        engine_runs.append(engine_side)
        if generate_side is not None:
            generate_runs.append(generate_side)
    records, answers = _best(engine_runs), engine_runs[0].answers
    baseline_records = _best(generate_runs) if baseline else None
    baseline_answers = generate_runs[0].answers if baseline else None
    overhead_report = None
    if overhead:
        first_ids = _plan(engine, [], messages[0], new_tokens).ids
        overhead_report = measure_overhead(engine, first_ids, _settings(new_tokens)).as_dict()

    ratios: dict[str, float] = {}
    if records[0].ttft_s > 0:
        ratios["engine_ttft_last_over_first"] = records[-1].ttft_s / records[0].ttft_s
    decode = _mean([r.decode_tok_s for r in records])
    if baseline_records:
        if baseline_records[0].ttft_s > 0:
            ratios["generate_ttft_last_over_first"] = baseline_records[-1].ttft_s / baseline_records[0].ttft_s
        generate_decode = _mean([r.decode_tok_s for r in baseline_records])
        if generate_decode > 0:
            ratios["engine_decode_over_generate"] = decode / generate_decode
        if records[-1].ttft_s > 0:
            ratios["generate_ttft_last_over_engine"] = baseline_records[-1].ttft_s / records[-1].ttft_s

    loaded = engine.loaded
    first = records[0]
    return BenchReport(
        model=model_label or loaded.model_id,
        device=_device_name(device),
        dtype=dtype_name(loaded.dtype),
        load_s=loaded.load_seconds,
        prefill_tok_s=first.prefill_tokens / first.ttft_s if first.ttft_s > 0 else 0.0,
        ttft_s=first.ttft_s,
        decode_tok_s=decode,
        peak_gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        peak_host_mem_gb=peak_host_memory_gb(),
        turns=records,
        baseline=baseline_records,
        ratios=ratios,
        parameters=sum(p.numel() for p in engine.model.parameters()),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        answers_match=(answers == baseline_answers) if baseline_answers is not None else None,
        repeats=max(1, repeats),
        overhead=overhead_report,
        forwards_per_token=sum(r.forwards for r in records) / max(1, sum(r.new_tokens for r in records)),
        prompt_lookup=engine.prompt_lookup,
        context_shift=engine.context_shift,
        quantization=loaded.quantization,
    )


def _best(runs: list[_Conversation]) -> list[TurnRecord]:
    """Per turn, the lowest TTFT and the highest decode speed over the runs (the counts are the same in every run)."""
    best: list[TurnRecord] = []
    for records in zip(*(run.records for run in runs)):
        first = records[0]
        best.append(
            replace(
                first,
                ttft_s=min(record.ttft_s for record in records),
                decode_tok_s=max(record.decode_tok_s for record in records),
            )
        )
    return best


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def peak_host_memory_gb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# -------------------------------------------------------------------------------------- random weights
def random_weights_model(
    config_dict_or_path: dict[str, Any] | str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    *,
    seed: int = 0,
) -> LoadedModel:
    """A BlueLMForCausalLM with random weights, built directly on `device`, and the tiny-checkpoint tokenizer.

    `config_dict_or_path`: a config dict (a full config.json's content, or only shape fields such as
    `tiny_checkpoint.PUBLISHED_7B`), a config.json path, or a checkpoint folder. The model is created on
    the meta device, materialized on `device` in `dtype` (no float32 copy, no host copy) and initialized
    there: linear weights N(0, 1/in_features), embeddings N(0, 1), norms at 1 / 0, lm_head like the tiny
    checkpoints', so that greedy decoding varies. The tokenizer has 600 pieces; logits of the other rows
    are masked, so no undecodable id is ever generated.
    """
    from bluelm_cli.local.loading import load_tokenizer
    from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM
    from bluelm_cli.modeling.modeling_bluelm import BlueLMRotaryEmbedding
    from bluelm_cli.testing.tiny_checkpoint import TinySpec, random_config, train_tokenizer

    started = time.perf_counter()
    if isinstance(config_dict_or_path, dict):
        overrides = dict(config_dict_or_path)
        label = "random weights"
    else:
        path = Path(config_dict_or_path)
        overrides = json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))
        label = f"random weights ({path})"
    fields = random_config(TinySpec())
    fields.update(overrides)
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype"):
        fields.pop(key, None)
    target = torch.device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))

    folder = Path(tempfile.mkdtemp(prefix="bluelm-random-"))
    train_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    config = BlueLMConfig(**fields)
    config.tokenizer_vocab_size = tokenizer.sp_model.get_piece_size()
    if config.vocab_size < config.tokenizer_vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {config.tokenizer_vocab_size} pieces")

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            model = BlueLMForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=target)
    generator = torch.Generator(device=target).manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                std = (2.0 if name == "lm_head" else 1.0) / module.in_features**0.5
                if name.endswith(("o_proj", "down_proj")):
                    std *= 0.5
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=generator)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, BlueLMRotaryEmbedding):
                module.reset_frequencies(target)
            elif hasattr(module, "variance_epsilon"):  # RMSNorm
                module.weight.fill_(1.0)
    model.eval()
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=label,
        folder=folder,
        device=target,
        dtype=torch_dtype,
        context_length=config.context_length,
        generation_defaults={},
        load_seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------------------ the table
def format_report(report: BenchReport) -> str:
    """A human-readable table of the report."""
    lines = [
        f"model        {report.model}" + (f"  ({report.parameters / 1e6:.1f}M parameters)" if report.parameters else ""),
        f"device       {report.device}   dtype {report.dtype}"
        + (f" ({report.quantization})" if report.quantization else "") + f"   load {report.load_s:.2f} s",
        f"workload     turn 1: {report.prompt_tokens}-token message; later turns: {FOLLOW_UP_TOKENS}-token messages; "
        f"{report.new_tokens} new tokens a turn, greedy"
        + (f"; best of {report.repeats} runs" if report.repeats > 1 else ""),
        f"prefill      {report.prefill_tok_s:,.0f} tok/s (turn 1)",
        f"TTFT         {report.ttft_s * 1000:.1f} ms (turn 1)",
        f"decode       {report.decode_tok_s:,.1f} tok/s (mean over {len(report.turns)} turns)",
        f"forwards     {report.forwards_per_token:.3f} per generated token"
        + f"   prompt lookup {'on' if report.prompt_lookup else 'off'}   context shift {'on' if report.context_shift else 'off'}",
        *([f"warm-up      {report.compile_s:.2f} s (the {report.runner} decode step"
           + (" and the prefill graphs" if report.prefill_graph else "") + ", at start)"] if report.compile_s is not None else []),
        "peak memory  "
        + (f"GPU {report.peak_gpu_mem_gb:.2f} GB, " if report.peak_gpu_mem_gb is not None else "")
        + f"host {report.peak_host_mem_gb:.2f} GB",
        "",
    ]
    header = (f"{'turn':>4} {'context':>7} {'reused':>6} {'prefill':>7} {'new':>4} {'fwd':>4} {'drop':>4}"
              f" {'TTFT ms':>8} {'decode tok/s':>12}")
    if report.baseline:
        header += f" | {'generate() TTFT ms':>18} {'decode tok/s':>12}"
    lines.append(header)
    for index, record in enumerate(report.turns):
        row = (
            f"{record.turn:>4} {record.context_tokens:>7} {record.reused_tokens:>6} {record.prefill_tokens:>7} "
            f"{record.new_tokens:>4} {record.forwards:>4} {record.dropped_turns or '':>4}"
            f" {record.ttft_s * 1000:>8.1f} {record.decode_tok_s:>12.1f}"
        )
        if report.baseline and index < len(report.baseline):
            base = report.baseline[index]
            row += f" | {base.ttft_s * 1000:>18.1f} {base.decode_tok_s:>12.1f}"
        lines.append(row)
    if any(record.dropped_turns for record in report.turns):
        how = ("the kept turns' cache was moved (context shift)" if report.context_shift
               else "the kept turns were prefilled again once")
        lines.append(f"(drop: the oldest turns left the full context window in one block; {how})")
    if report.ratios:
        lines.append("")
        names = {
            "engine_ttft_last_over_first": "engine TTFT, last turn / first turn",
            "generate_ttft_last_over_first": "generate() TTFT, last turn / first turn",
            "generate_ttft_last_over_engine": "last-turn TTFT, generate() / engine",
            "engine_decode_over_generate": "decode tok/s, engine / generate()",
        }
        for key, value in report.ratios.items():
            lines.append(f"{names.get(key, key):<42} {value:6.2f}")
    if report.answers_match is not None:
        lines.append(f"{'engine and generate() answers identical':<42} {'yes' if report.answers_match else 'no'}")
    if report.overhead:
        lines += _overhead_lines(report.overhead)
    return "\n".join(lines)


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"per token, turn 1 re-run with each forward timed (median of {overhead['runs']}):",
        f"  {'forward pass':<40} {overhead['forward_ms_per_token']:8.3f} ms",
        f"  {'outside the forward':<40} {overhead['outside_forward_ms_per_token']:8.3f} ms"
        f"  ({100 * overhead['outside_forward_fraction']:.1f}% of decode time)",
        "per token with the forward stubbed (a fixed logits row; engine work only):",
    ]
    for key, value in overhead["stub_ms_per_token"].items():
        vocab, _, how = key.partition(" ")
        lines.append(f"  {f'vocab {int(vocab):,}, {how}':<40} {value:8.3f} ms")
    return lines


def _shapes() -> dict[str, dict[str, Any]]:
    from bluelm_cli.testing.tiny_checkpoint import PUBLISHED_7B

    # A 32K context is ntkmixed factor × 2048 positions; the power only changes the rope frequencies'
    # values, not the work a token costs.
    long_context = dict(PUBLISHED_7B, rope_scaling={"type": "ntkmixed", "factor": 16.0, "power": 0.25})
    return {"7b": dict(PUBLISHED_7B), "7b-32k": long_context, "cpu25m": CPU_25M,
            "cpu25m-32k": dict(CPU_25M, rope_scaling=long_context["rope_scaling"])}


SHAPES: dict[str, dict[str, Any]] = _shapes()
