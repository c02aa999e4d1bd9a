"""Time to the prompt and to the first answer of `bluelm chat`, beside `python -c "import torch"`.

Alternating runs in a pseudo-terminal (pexpect): import torch; then `bluelm chat --model MODEL`, timed
from spawn until the prompt appears, and until the answer to a message typed at once (8 tokens, greedy)
has ended. `--sync` measures a version that loads before its prompt (no "Loaded" line after it).

    python scripts/bench_chat_start.py --model /path/to/checkpoint --rounds 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pexpect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose bluelm_cli and torch to time")
    parser.add_argument("--cwd", default=None, help="run from here (to time another checkout's bluelm_cli)")
    parser.add_argument("--sync", action="store_true", help="the model loads before the prompt")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    figures: dict[str, list[float]] = {"import torch": [], "to prompt": [], "to first answer": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        subprocess.run([args.python, "-c", "import torch"], check=True)
        figures["import torch"].append(time.perf_counter() - started)
        home = tempfile.mkdtemp(prefix="bluelm-bench-")
        started = time.perf_counter()
        child = pexpect.spawn(
            args.python, ["-m", "bluelm_cli", "chat", "--model", args.model, "--temperature", "0", "--max-new-tokens", "8"],
            env={**env, "BLUELM_HOME": home}, encoding="utf-8", timeout=300, dimensions=(40, 120), cwd=args.cwd,
        )
        child.expect_exact("> ")
        figures["to prompt"].append(time.perf_counter() - started)
        child.send("hello\r")
        if not args.sync:
            child.expect_exact("Loaded")
        child.expect_exact("[cut off")  # the 8-token answer has ended
        figures["to first answer"].append(time.perf_counter() - started)
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        shutil.rmtree(home, ignore_errors=True)
    torch_median = statistics.median(figures["import torch"])
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:16s} median {median:.2f} s (min {min(values):.2f}, max {max(values):.2f}) "
              f"= {median / torch_median:.2f} × import torch")


if __name__ == "__main__":
    main()
