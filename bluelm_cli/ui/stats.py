"""How one answer's figures are reported, the same for `bluelm chat` (/stats) and `bluelm ask` (-v, --json)."""

from __future__ import annotations

from typing import Any

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.core.finish import FinishReason


def stats_line(result: AnswerResult) -> str:
    """``12 prompt tokens (0 reused) · 20 new · first token 32 ms · prefill 375 tokens/s · decode 72.0 tokens/s
    · context 33/2048``, and `` · finish: length`` when the answer did not end by itself. Figures that mean
    nothing for this answer (no token yet, a single token after an early Ctrl-C) are left out."""
    parts = [f"{result.prompt_tokens:,} prompt tokens ({result.reused_tokens:,} reused)", f"{result.new_tokens:,} new"]
    if result.new_tokens >= 1 and result.ttft_s > 0:
        parts.append(f"first token {result.ttft_s * 1000:.0f} ms")
    if result.prefill_tok_s is not None:
        parts.append(f"prefill {result.prefill_tok_s:.0f} tokens/s")
    if result.decode_speed is not None:
        parts.append(f"decode {result.decode_speed:.1f} tokens/s")
    parts.append(f"context {result.context_tokens:,}/{result.context_limit:,}")
    if result.finish_reason is not FinishReason.STOP:
        parts.append(f"finish: {result.finish_reason}")
    return " · ".join(parts)


def result_json(result: AnswerResult) -> dict[str, Any]:
    """`bluelm ask --json`: the answer and its figures (a speed that means nothing for this answer is null)."""
    prefill, decode = result.prefill_tok_s, result.decode_speed
    return {
        "answer": result.text,
        "finish_reason": str(result.finish_reason),
        "prompt_tokens": result.prompt_tokens,
        "reused_tokens": result.reused_tokens,
        "new_tokens": result.new_tokens,
        "ttft_s": round(result.ttft_s, 4),
        "prefill_tok_s": None if prefill is None else round(prefill, 2),
        "decode_tok_s": None if decode is None else round(decode, 2),
        "context_tokens": result.context_tokens,
        "context_limit": result.context_limit,
        # Model calls for the answer, and per generated token (below 1 when prompt-lookup drafts were accepted);
        # null from a served model, which does not say.
        "forwards": result.forwards or None,
        "forwards_per_token": round(result.forwards_per_token, 4) if result.forwards_per_token else None,
    }
