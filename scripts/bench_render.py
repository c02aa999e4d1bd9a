"""Benchmark streaming Markdown rendering: StreamRenderer against re-rendering the whole answer.

Streams a deterministic ~4000-token Markdown answer (headings, lists, code fences, a table,
Chinese) token by token into a 100x40 terminal console and reports tokens/s and the cost per
token for each successive 1000-token slice. The naive approach is what ``transformers chat``
does: a ``rich.live.Live`` whose renderable is replaced by ``Markdown(whole_text)`` on every token.

    python scripts/bench_render.py [--tokens 4000] [--json] [--naive-every-token]

"flat out" feeds tokens as fast as Python can, so the 15/s throttle redraws only a few times;
"model at 50 tok/s" fakes the throttle's clock so that it redraws as it would while a model
generates 50 tokens/s, which is the CPU cost per token the generation loop really pays.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

import bluelm_cli.ui.render as render_module
from bluelm_cli.ui.render import StreamRenderer

WIDTH, HEIGHT, RATE, SLICE = 100, 40, 15.0, 1000
MODEL_PACE = 50.0  # tokens/s of the simulated model, roughly BlueLM-7B in bf16 on one GPU


class _Clock:
    """Stands in for the ``time`` module: the throttle sees a model producing MODEL_PACE tokens/s."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class _Sink(io.TextIOBase):
    """A terminal stand-in that only counts what is written to it."""

    def __init__(self) -> None:
        self.chars = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.chars += len(s)
        return len(s)


def _section(i: int, rng: random.Random) -> str:
    words = ["model", "token", "cache", "stream", "answer", "layer", "prompt", "render", "terminal", "context"]
    para = " ".join(rng.choice(words) for _ in range(60))
    return f"""## {i}. Section about {rng.choice(words)}

{para.capitalize()}.

蓝心大模型在第 {i} 节中解释了流式输出：每个词元到达后，终端只重绘尚未完成的部分。

- **Point one**: {" ".join(rng.choice(words) for _ in range(12))}
- Point two with `inline code` and *emphasis*
  - nested detail {i}

1. First step
2. Second step

```python
def step_{i}(values: list[int]) -> int:
    total = 0
    for value in values:
        total += value * {i}  # accumulate
    return total
```

| Name | Value |
|------|------:|
| alpha | {i} |
| beta | {i * 2} |

"""


def build_deltas(tokens: int) -> list[str]:
    """A deterministic answer cut into 3-4 character deltas, like LLM tokens."""
    rng = random.Random(1234)
    text = "# Streaming rendering benchmark\n\n"
    i = 0
    while len(text) < tokens * 4:
        text += _section(i, rng)
        i += 1
    deltas: list[str] = []
    pos = 0
    while len(deltas) < tokens and pos < len(text):
        size = rng.choice((3, 4))
        deltas.append(text[pos : pos + size])
        pos += size
    return deltas


def _console(sink: _Sink) -> Console:
    return Console(file=sink, width=WIDTH, height=HEIGHT, force_terminal=True, color_system="truecolor")


Starter = Callable[[Console], tuple[Callable[[str], None], Callable[[], None]]]


def _measure(deltas: list[str], start: Starter, clock: _Clock | None = None) -> dict[str, Any]:
    """Feed every delta, timing each slice of SLICE tokens; ``clock`` paces the throttle."""
    sink = _Sink()
    render_module.time = clock or time  # type: ignore[assignment]
    feed, finish = start(_console(sink))
    slices: list[float] = []
    t_all = time.perf_counter()
    for first in range(0, len(deltas), SLICE):
        t0 = time.perf_counter()
        for delta in deltas[first : first + SLICE]:
            if clock is not None:
                clock.now += 1.0 / MODEL_PACE
            feed(delta)
        slices.append((time.perf_counter() - t0) / len(deltas[first : first + SLICE]) * 1e6)
    t_finish = time.perf_counter()
    finish()
    end = time.perf_counter()
    render_module.time = time
    return {
        "tokens_per_s": len(deltas) / (end - t_all),
        "us_per_token_by_slice": [round(v, 1) for v in slices],
        "finish_ms": round((end - t_finish) * 1e3, 2),
        "chars_written": sink.chars,
    }


def _stream_renderer(rate: float) -> Starter:
    def start(console: Console) -> tuple[Callable[[str], None], Callable[[], None]]:
        renderer = StreamRenderer(console, max_refresh_per_second=rate)
        renderer.start()
        return renderer.feed, renderer.finish

    return start


def _naive(rate: float) -> Starter:
    def start(console: Console) -> tuple[Callable[[str], None], Callable[[], None]]:
        live = Live(console=console, auto_refresh=False, vertical_overflow="ellipsis")
        live.start()
        parts: list[str] = []
        interval = 0.0 if rate == float("inf") else 1.0 / rate
        last = -float("inf")

        def feed(delta: str) -> None:
            nonlocal last
            parts.append(delta)
            now = render_module.time.monotonic()
            due = now - last >= interval
            if due:
                last = now
            live.update(Markdown("".join(parts)), refresh=due)

        return feed, live.stop

    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--naive-every-token", action="store_true", help="also the naive approach redrawing on every token (minutes)"
    )
    args = parser.parse_args()
    if os.environ.get("TERM", "").lower() in ("", "dumb", "unknown"):
        os.environ["TERM"] = "xterm-256color"  # rich draws no live region on a dumb terminal

    deltas = build_deltas(args.tokens)
    paced = f"{RATE:g}/s, model at {MODEL_PACE:g} tok/s"
    runs: dict[str, tuple[Starter, _Clock | None]] = {
        f"StreamRenderer ({RATE:g}/s, flat out)": (_stream_renderer(RATE), None),
        f"StreamRenderer ({paced})": (_stream_renderer(RATE), _Clock()),
        "StreamRenderer (redraw every token)": (_stream_renderer(float("inf")), None),
        f"naive Live+Markdown(whole) ({RATE:g}/s, flat out)": (_naive(RATE), None),
        f"naive Live+Markdown(whole) ({paced})": (_naive(RATE), _Clock()),
    }
    if args.naive_every_token:
        runs["naive Live+Markdown(whole) (every token)"] = (_naive(float("inf")), None)
    results = {name: _measure(deltas, start, clock) for name, (start, clock) in runs.items()}
    info = {
        "tokens": len(deltas),
        "chars": sum(map(len, deltas)),
        "console": f"{WIDTH}x{HEIGHT}",
        "python": sys.version.split()[0],
    }

    if args.json:
        print(json.dumps({"setup": info, "results": results}, indent=2, ensure_ascii=False))
        return
    print(f"{info['tokens']} tokens, {info['chars']} chars, console {info['console']}, Python {info['python']}")
    slices = max(len(r["us_per_token_by_slice"]) for r in results.values())
    header = f"{'approach':<52} {'tok/s':>9} " + " ".join(f"{f'µs/tok {i + 1}k':>11}" for i in range(slices))
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        cells = " ".join(f"{v:>11.1f}" for v in r["us_per_token_by_slice"])
        print(f"{name:<52} {r['tokens_per_s']:>9.0f} {cells}")


if __name__ == "__main__":
    main()
