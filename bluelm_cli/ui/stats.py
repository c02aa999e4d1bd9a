"""How one answer's figures are reported, the same for `bluelm chat` (/stats) and `bluelm ask` (-v, --json)."""

from __future__ import annotations

from typing import Any

from bluelm_cli.core.backend import AnswerResult
from bluelm_cli.core.finish import FinishReason


def stats_line(result: AnswerResult) -> str:
    """``12 prompt tokens (0 reused) · 20 new · first token 32 ms · 72.0 tokens/s · context 33/2048``,
    and `` · finish: length`` when the answer did not end by itself."""
    line = (
        f"{result.prompt_tokens} prompt tokens ({result.reused_tokens} reused) · {result.new_tokens} new"
        f" · first token {result.ttft_s * 1000:.0f} ms · {result.decode_tok_s:.1f} tokens/s"
        f" · context {result.context_tokens}/{result.context_limit}"
    )
    if result.finish_reason is not FinishReason.STOP:
        line += f" · finish: {result.finish_reason}"
    return line


def result_json(result: AnswerResult) -> dict[str, Any]:
    """`bluelm ask --json`: the answer and its figures."""
    return {
        "answer": result.text,
        "finish_reason": str(result.finish_reason),
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "ttft_s": round(result.ttft_s, 4),
        "decode_tok_s": round(result.decode_tok_s, 2),
        # Model calls for the answer, and per generated token (below 1 when prompt-lookup drafts were accepted);
        # null from a served model, which does not say.
        "forwards": result.forwards or None,
        "forwards_per_token": round(result.forwards_per_token, 4) if result.forwards_per_token else None,
    }
