"""`bluelm bench --api URL`: the bench conversation against a served model, timed at the client.

The same workload as the local bench (turn 1 a message of about `prompt_tokens` tokens, later turns
32-token follow-ups, greedy, repetition penalty 1.0, history accumulating), sent over HTTP. TTFT is
from sending the request to the first streamed text; decode speed is (tokens - 1) / (last text - first
text), tokens as the server's usage reports them (else one per streamed chunk). A server can't be told
to decode exactly `new_tokens`, so answers that end early are shown with their real counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from bluelm_cli.core.prompt import HistoryTurn, fit_prompt
from bluelm_cli.remote.backend import RemoteBackend
from bluelm_cli.core.settings import SamplingSettings

FOLLOW_UP_TOKENS = 32
_WORDS = (
    "The key-value cache keeps attention states across turns, so each new turn is fast. "
    "Large language models generate text one token at a time. The quick brown fox jumps over the lazy dog. "
    "Please explain how a transformer reads a long conversation and answers the last question. "
    "What is the capital of France, and why did it become the capital?"
).split()


@dataclass
class ServedTurn:
    turn: int
    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tok_s: float
    finish_reason: str


@dataclass
class ServedReport:
    model: str
    server: str
    counting: str
    context_limit: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    ttft_s: float  # turn 1
    decode_tok_s: float  # mean over turns
    turns: list[ServedTurn]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def served_message(backend: RemoteBackend, turn: int, tokens: int) -> str:
    """A deterministic message of at least `tokens` tokens as the backend counts them (within one word)."""
    text = f"Question {turn}:"
    index = turn
    while len(backend.encoder.encode_plain(text)) < tokens:
        text += " " + _WORDS[index % len(_WORDS)]
        index += 1
    return text


def run_served_bench(backend: RemoteBackend, *, prompt_tokens: int, new_tokens: int, turns: int, repeats: int = 1) -> ServedReport:
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
    messages = [served_message(backend, 1, prompt_tokens)]
    messages += [served_message(backend, number, FOLLOW_UP_TOKENS) for number in range(2, turns + 1)]
    runs: list[list[ServedTurn]] = []
    for _ in range(max(1, repeats)):
        history: list[HistoryTurn] = []
        records: list[ServedTurn] = []
        for number, message in enumerate(messages, start=1):
            plan = fit_prompt(backend.encoder, None, history, message, context_limit=backend.context_limit,
                              max_new_tokens=new_tokens)
            result = backend.stream(plan, settings).finish()
            records.append(ServedTurn(number, result.prompt_tokens, result.reused_tokens, result.new_tokens,
                                      result.ttft_s, result.decode_tok_s, str(result.finish_reason)))
            history = [*history[plan.dropped_turns:], HistoryTurn(message, [], result.text)]
        runs.append(records)
    # Per turn, the best figures over the runs (noise on a shared machine or network only adds time).
    best = [replace(same[0], ttft_s=min(r.ttft_s for r in same), decode_tok_s=max(r.decode_tok_s for r in same))
            for same in zip(*runs)]
    return ServedReport(
        model=backend.model.name, server=backend.client.url.api, counting=backend.counting,
        context_limit=backend.context_limit, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        repeats=max(1, repeats), ttft_s=best[0].ttft_s,
        decode_tok_s=sum(r.decode_tok_s for r in best) / len(best), turns=best,
    )


def format_served_report(report: ServedReport) -> str:
    lines = [
        f"model        {report.model}",
        f"server       {report.server}   context {report.context_limit}   tokens counted {report.counting}",
        f"workload     turn 1: {report.prompt_tokens}-token message; later turns: {FOLLOW_UP_TOKENS}-token messages; "
        f"up to {report.new_tokens} new tokens a turn, greedy" + (f"; best of {report.repeats} runs" if report.repeats > 1 else ""),
        f"TTFT         {report.ttft_s * 1000:.1f} ms (turn 1, measured at the client)",
        f"decode       {report.decode_tok_s:,.1f} tok/s (mean over {len(report.turns)} turns)",
        "",
        f"{'turn':>4} {'prompt':>7} {'cached':>6} {'new':>4} {'TTFT ms':>8} {'decode tok/s':>12}  finish",
    ]
    for r in report.turns:
        lines.append(f"{r.turn:>4} {r.prompt_tokens:>7} {r.reused_tokens:>6} {r.new_tokens:>4} {r.ttft_s * 1000:>8.1f} "
                     f"{r.decode_tok_s:>12.1f}  {r.finish_reason}")
    return "\n".join(lines)
