#!/usr/bin/env bash
# The GPU check in one command (see scripts/gpu_check.py for what each step does).
#
#   scripts/gpu_check.sh prepare            # on a machine that reaches PyPI: wheels into .gpu_wheels/
#   scripts/gpu_check.sh run [OUT_DIR]      # on the bare GPU machine: install, speed steps, GPU tests, 7B benches, start-up
#   scripts/gpu_check.sh run --steps speed  # only issue 22's speed steps: bf16 decode/TTFT/overhead, kernels, int8/int4,
#                                           # context, prompt lookup
#                                           # (QUALITY_MODEL=folder adds int8/int4 quality against a real checkpoint)
#   scripts/gpu_check.sh dry-run [OUT_DIR]  # prepare, then the same steps on the CPU with small shapes
#
# OUT_DIR defaults to $OUT, else ./gpu_check_out. PYTHON picks the interpreter (default python3).
# On the device machine, carry .gpu_wheels and run:  scripts/gpu_check.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
