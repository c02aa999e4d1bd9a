"""Peak host memory while loading a checkpoint, as a multiple of the checkpoint's size on disk.

Builds a random BlueLM checkpoint of about --size-mb in the published sharded .bin layout (or
safetensors), then loads it through bluelm_cli.local.loading.load_model in a fresh subprocess and reports
(peak RSS − RSS before loading) / checkpoint bytes. Target: ≤ 1.3 (no second copy of the weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, gc
import torch, transformers
import bluelm_cli.local.loading as loading
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
before = rss_mb()
loaded = loading.load_model(sys.argv[1], device="cpu", dtype="float32")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before_mb": before, "peak_mb": peak, "after_mb": rss_mb()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--format", default="bin-sharded", choices=["bin-sharded", "safetensors", "safetensors-sharded", "bin"])
    args = parser.parse_args()
    from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        spec = TinySpec(
            hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 128, weights_format=args.format,
        )
        build_checkpoint(folder, spec)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        size_mb = size / 2**20
        ratio = (figures["peak_mb"] - figures["before_mb"]) / size_mb
        print(f"checkpoint {size_mb:.0f} MB ({args.format}); RSS before load {figures['before_mb']:.0f} MB, "
              f"peak {figures['peak_mb']:.0f} MB, after {figures['after_mb']:.0f} MB; "
              f"(peak - before) / checkpoint = {ratio:.2f}")


if __name__ == "__main__":
    main()
