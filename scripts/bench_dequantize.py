"""Time the dequantisation of one 7B-sized linear (in 11008, out 4096) in each published 4-bit layout.

    PYTHONPATH=. python scripts/bench_dequantize.py [--device cpu|cuda] [--repeats 3]

Random packed words (every nibble pattern occurs); prints the best of `repeats` runs per layout.
"""

from __future__ import annotations

import argparse
import time

import torch

from bluelm_cli.modeling.quantized import dequantize_awq_gemm, dequantize_gptq, dequantize_gptq_for_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    in_features, out_features, group = 11008, 4096, 128

    def words(*shape: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator).to(device)

    scales = (torch.rand(in_features // group, out_features, generator=generator) * 0.01).to(device)
    qzeros = words(in_features // group, out_features // 8)
    cases = {
        "Chat-4bits (GPTQ-for-LLaMa v1, fp32 scales)": lambda q=words(in_features // 8, out_features): dequantize_gptq_for_llama(q, qzeros, scales),
        "Chat-32K-GPTQ (AutoGPTQ v1, fp16 scales)": lambda q=words(in_features // 8, out_features): dequantize_gptq(q, qzeros, scales.half(), None, group),
        "Chat-32K-AWQ (AutoAWQ GEMM, fp16 scales)": lambda q=words(in_features, out_features // 8): dequantize_awq_gemm(q, qzeros, scales.half(), group),
    }
    print(f"device {device}, torch threads {torch.get_num_threads()}, one {out_features}x{in_features} linear")
    for name, run in cases.items():
        best = float("inf")
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        print(f"{name}: {best:.3f} s")


if __name__ == "__main__":
    main()
