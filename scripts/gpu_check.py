#!/usr/bin/env python3
"""The GPU check in one call: prepare wheels where PyPI is reachable, then run everything on a bare GPU machine.

    python3 scripts/gpu_check.py prepare           # here: wheels the GPU machine lacks -> .gpu_wheels/
    python3 scripts/gpu_check.py run [OUT_DIR]     # there: install, GPU tests, 7B benches, start-up figures
    python3 scripts/gpu_check.py dry-run [OUT_DIR] # prepare, then the same steps on the CPU with small shapes

`run` steps, each in a subprocess with its own timeout inside one overall budget (--budget, default 500 s on
a GPU, so the whole call ends well inside the device tool's 10 minutes); the report is rewritten after every
step, so a hang or a kill still leaves what was measured:
  env          python, torch, transformers, the GPU
  install      what our package needs and the machine lacks, from the carried wheels (pip --no-index)
  imports      `import torch`, `bluelm --help`, `import bluelm_cli.local.engine`: wall time of fresh processes
  gpu_tests    pytest -m gpu
  profile      scripts/gpu_profile.py: capture time, TTFT per turn, a profiled short prefill, decode ms per
               attention window, graph-vs-eager logits, device syncs by source line (profile.json, profile.txt)
  bench_2k     bluelm bench --random-weights, published 7B shapes, bf16, --baseline, cold compile cache
  bench_32k    bluelm bench --random-weights, 7B shapes with a 32K context, bf16 (no baseline: generate() at
               16K tokens costs more device time than it tells)
  warm_start   the same model started again: load and the fast path's warm-up a second time
  first_prompt `bluelm chat` with a tiny checkpoint to its first prompt, cold and warm compile cache
The speed steps (issue 22; `--steps speed` runs only these after env and install, `--steps core` only the above):
  bench_bf16   bluelm bench, 7B shapes in bf16 (fused projections, CUDA graphs), a 1,000-token first prompt: decode
               tok/s, TTFT of the 1,000-token prompt, the engine's work per token outside the forward (timed, and
               with the forward stubbed at the 7B vocabulary)
  kernels      scripts/gpu_kernels.py: CUDA kernels per decode forward (torch profiler) and the step's time, unfused
               and fused, eager, from the CUDA graph, compiled by inductor (RMSNorm and RoPE fused in), and with only
               the element-wise pieces compiled under the CUDA graphs (the `fused` runner)
  bench_fused  bench_bf16 with `--runner fused`: decode tok/s and TTFT with RMSNorm, RoPE and SiLU one kernel each
  bench_prefill  bench_bf16 twice (16 new tokens, `--repeats 2`): `--no-prefill-graph`, then `--prefill-graph` (each
               prefill chunk replayed from a CUDA graph per bucket length): TTFT of the 1,000-token first prompt and of
               turn 2, warm-up time and peak GPU memory (the prefill graphs' pool), with and without
  bench_int8   bluelm bench --quantize int8 (torchao weight-only), 7B shapes, with the fast path
  bench_int4   the same with --quantize int4 (CUDA only)
  context      bluelm bench --turns 40 past the 2K window: prefill per turn after the window fills, with and
               without --context-shift
  lookup       scripts/bench_prompt_lookup.py: plain / prompt lookup / no-match / all-rejected decode, fast path
  quality      scripts/quant_quality.py: perplexity and greedy agreement of int8 and int4 next to bf16, only with a
               real checkpoint on the machine (QUALITY_MODEL=path; random weights say nothing about quality)
Outputs in OUT_DIR (argument, else $OUT, else ./gpu_check_out): gpu_check.json, gpu_check.md,
gpu_check.log (every step's output), gpu_tests.xml. The headline table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu_wheels"
GPU_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# What the lent GPU machines were seen to have (KINDS.md): transformers is carried only if this misses our range.
GPU_TRANSFORMERS = os.environ.get("GPU_TRANSFORMERS", "5.17.0")
# Ours to carry, with their dependencies; the GPU image has torch and the Hugging Face stack.
CARRIED = ("prompt_toolkit", "rich", "typer", "platformdirs", "sentencepiece", "pytest", "hypothesis", "pexpect")
# Carried without their dependencies, which the GPU image has (numpy, pyyaml, tqdm).
CARRIED_NO_DEPS = ("gguf", "torchao")  # torchao: --quantize int8|int4 (pure Python wheel plus its kernels)
# bitsandbytes ships a library per CUDA version (43 MB in all); torch 2.11 there is built for CUDA 13.0.
BNB_LIBRARIES = ("cpu", "cuda130", "cuda132")
WHEEL_BUDGET_MB = 40  # the device tool carries 64 MiB in all, the repository included

GPU_SHAPES = {"2k": ("7b", 1000, 128, 6), "32k": ("7b-32k", 16000, 64, 2)}  # shape, prompt, new, turns
CPU_SHAPES = {"2k": ("cpu25m", 64, 16, 3), "32k": ("cpu25m-32k", 256, 16, 2)}
# Worst cases on one H100, in the order they run; the overall budget trims the last ones first.
STEP_LIMITS_S = {"env": 45, "install": 60, "imports": 60, "gpu_tests": 150, "profile": 120, "bench_2k": 220,
                 "bench_32k": 150, "warm_start": 90, "first_prompt": 90,
                 "bench_bf16": 120, "kernels": 150, "bench_fused": 120, "bench_prefill": 150, "bench_int8": 100, "bench_int4": 100, "context": 150, "lookup": 90, "quality": 120}
SPEED_STEPS = ("bench_bf16", "kernels", "bench_fused", "bench_prefill", "bench_int8", "bench_int4", "context", "lookup", "quality")
CORE_STEPS = ("imports", "gpu_tests", "profile", "bench_2k", "bench_32k", "warm_start", "first_prompt")
# The context step's workload: `bluelm bench`'s turns (32-token messages, 64 new tokens) for 40 turns, which
# fills the 2K window at about turn 19 and again at about 29 and 39.
CONTEXT_WORKLOAD = {"gpu": ("7b", 256, 64, 40), "cpu": ("cpu25m", 256, 64, 40)}
GPU_BUDGET_S = 500  # the device tool allows 600 s a command; leave room for start-up and copying back


# ----------------------------------------------------------------------------------------------- prepare
def _project() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _pip_download(arguments: list[str]) -> None:
    platforms = [flag for name in PLATFORMS for flag in ("--platform", name)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", GPU_PYTHON,
               "--implementation", "cp", *platforms, "-d", str(WHEELS), *arguments]
    subprocess.run(command, check=True)


def _slim_bitsandbytes(wheel: Path) -> None:
    """Drop the libraries for other CUDA/ROCm/XPU versions, and their RECORD lines (a valid, smaller wheel)."""
    kept = {f"bitsandbytes/libbitsandbytes_{name}.so" for name in BNB_LIBRARIES}
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            name = item.filename
            if name.startswith("bitsandbytes/libbitsandbytes_") and name not in kept:
                continue
            data = source.read(item)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                keep = [line for line in lines if not line.startswith("bitsandbytes/libbitsandbytes_")
                        or line.split(",", 1)[0] in kept]
                data = ("\n".join(keep) + "\n").encode()
            target.writestr(item, data)
    slim.replace(wheel)


def _tree_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "bluelm_cli").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def prepare(with_bnb: bool = True) -> int:
    from packaging.requirements import Requirement

    project = _project()
    declared = {_name(r): r for r in [*project["dependencies"], *project["optional-dependencies"]["test"],
                                      *project["optional-dependencies"]["quant"],
                                      *project["optional-dependencies"]["torchao"]]}
    if WHEELS.exists():
        shutil.rmtree(WHEELS)
    WHEELS.mkdir()
    print(f"prepare: our wheel, then wheels for Python {GPU_PYTHON} manylinux x86_64 into {WHEELS.relative_to(ROOT)}/")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), str(ROOT)], check=True)
    _pip_download([declared[_name(name)] for name in CARRIED])
    _pip_download(["--no-deps", *[declared[_name(name)] for name in CARRIED_NO_DEPS]])
    transformers = Requirement(declared["transformers"])
    if GPU_TRANSFORMERS not in transformers.specifier:
        print(f"prepare: the GPU's transformers {GPU_TRANSFORMERS} misses {transformers}: carrying a wheel")
        _pip_download(["--no-deps", str(transformers)])
    if with_bnb:
        _pip_download(["--no-deps", declared["bitsandbytes"]])
        for wheel in WHEELS.glob("bitsandbytes-*.whl"):
            _slim_bitsandbytes(wheel)
    wheels = sorted(WHEELS.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    manifest = {"created": _now(), "tree": _tree_hash(), "python": GPU_PYTHON,
                "wheels": {w.name: w.stat().st_size for w in wheels}}
    (WHEELS / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # The carried set must resolve by itself for the GPU's Python (everything it needs, nothing from an index).
    platforms = [flag for name in PLATFORMS for flag in ("--platform", name)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-index",
                    "--find-links", str(WHEELS), "--only-binary=:all:", "--python-version", GPU_PYTHON, *platforms,
                    "--target", tempfile.mkdtemp(prefix="gpu-check-resolve-"),
                    *[declared[_name(name)] for name in CARRIED]], check=True)
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"prepare: {len(wheels)} wheels, {total / 2**20:.1f} MiB (budget {WHEEL_BUDGET_MB} MiB); they resolve alone")
    if total > WHEEL_BUDGET_MB * 2**20:
        print(f"Error: the wheels exceed {WHEEL_BUDGET_MB} MiB; drop bitsandbytes with --no-bnb", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------- run
class Check:
    """Runs the steps within one deadline and rewrites the report after each."""

    def __init__(self, out: Path, cpu: bool, budget_s: float) -> None:
        self.out, self.cpu = out, cpu
        self.deadline = time.monotonic() + budget_s
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.steps: list[dict[str, Any]] = []
        self.log = (out / "gpu_check.log").open("w", encoding="utf-8")
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "BLUELM_HOME": str(self.work / "home"), "HF_HOME": str(self.work / "hf"), "TERM": "dumb",
                    "TORCHINDUCTOR_CACHE_DIR": str(self.work / "compile-cache" / "inductor"),
                    "TRITON_CACHE_DIR": str(self.work / "compile-cache" / "triton")}
        self.env.pop("BLUELM_MODEL", None)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, function: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        limit = min(STEP_LIMITS_S[name], self.remaining() - 5)
        record: dict[str, Any] = {"step": name, "status": "skipped", "seconds": 0.0, "data": {}}
        self.steps.append(record)
        if limit < 15:
            record["note"] = "not started: the overall budget is spent"
            self.write()
            return record
        self._log(f"\n===== {name} (limit {limit:.0f} s) =====\n")
        started = time.monotonic()
        try:
            record["data"] = function(limit)
            record["status"] = record["data"].pop("_status", "ok")
        except subprocess.TimeoutExpired:
            record["status"] = "timeout"
        except Exception as error:  # noqa: BLE001 - one failing step must not stop the others
            record["status"] = "failed"
            record["note"] = f"{type(error).__name__}: {error}"[:400]
        record["seconds"] = round(time.monotonic() - started, 1)
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s", flush=True)
        self.write()
        return record

    def run(self, command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a command in its own process group; on timeout kill the group and raise TimeoutExpired."""
        self._log(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            self._log(output + "\n[killed at the step's time limit]\n")
            raise
        self._log(output)
        return process.returncode, output

    def _log(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()

    def write(self) -> None:
        report = {"created": _now(), "mode": "cpu dry-run" if self.cpu else "gpu", "steps": self.steps,
                  "headline": headline_rows(self.steps, self.cpu)}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (self.out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")


def _python(*arguments: str) -> list[str]:
    return [sys.executable, *arguments]


def step_env(check: Check, limit: float) -> dict[str, Any]:
    code = ("import json, sys, torch, transformers; c = torch.cuda.is_available(); print(json.dumps({"
            "'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'transformers': transformers.__version__, 'gpu': torch.cuda.get_device_name() if c else None, "
            "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None, "
            "'cpu_threads': torch.get_num_threads()}))")
    rc, output = check.run(_python("-c", code), limit)
    data = json.loads(output.strip().splitlines()[-1]) if rc == 0 else {"_status": "failed"}
    data["platform"] = platform.platform()
    if shutil.which("nvidia-smi"):
        _, smi = check.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30)
        data["nvidia_smi"] = smi.strip()
    return data


def step_install(check: Check, limit: float) -> dict[str, Any]:
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    ours = sorted(WHEELS.glob("bluelm_cli-*.whl"))
    if not ours:
        return {"_status": "failed", "note": "no .gpu_wheels/bluelm_cli-*.whl: run `scripts/gpu_check.sh prepare` first"}
    manifest = json.loads((WHEELS / "manifest.json").read_text(encoding="utf-8"))
    with zipfile.ZipFile(ours[-1]) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    wanted = [r for r in requirements if r.name.lower() != "torch"
              and (r.marker is None or any(r.marker.evaluate({"extra": extra}) for extra in ("", "test", "quant", "torchao")))]

    def unsatisfied() -> list[str]:
        missing = []
        for requirement in wanted:
            try:
                if metadata.version(requirement.name) in requirement.specifier:
                    continue
            except metadata.PackageNotFoundError:
                pass
            missing.append(str(requirement).split(";")[0].strip())
        return missing

    before = unsatisfied()
    carried = {path.name.split("-")[0].lower().replace("_", "-") for path in WHEELS.glob("*.whl")}
    installable = [r for r in before if _name(r) in carried]
    pip = _python("-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS), "--no-cache-dir")
    failed: list[str] = []
    if installable:
        rc, _ = check.run([*pip, *installable], limit / 2)
        if rc != 0:  # one bad wheel must not keep the others out
            failed = [r for r in installable if check.run([*pip, r], limit / 4)[0] != 0]
    installed_ours = None
    try:
        installed_ours = metadata.version("bluelm-cli")
    except metadata.PackageNotFoundError:
        rc, _ = check.run([*pip, "--no-deps", str(ours[-1])], limit / 4)
        if rc != 0:
            failed.append(ours[-1].name)
    after = unsatisfied()
    return {
        "_status": "ok" if not [r for r in after if _name(r) != "bitsandbytes"] and not failed else "failed",
        "missing_before": before, "installed_from_wheels": [r for r in installable if r not in failed],
        "still_missing": after, "failed": failed,
        "bluelm_cli": f"already installed ({installed_ours}); the tree is used through PYTHONPATH" if installed_ours
        else f"installed {ours[-1].name}; the tree is used through PYTHONPATH",
        "wheels_match_tree": manifest.get("tree") == _tree_hash(),
    }


def step_imports(check: Check, limit: float) -> dict[str, Any]:
    commands = {"import torch": _python("-c", "import torch"),
                "bluelm --help": _python("-m", "bluelm_cli", "--help"),
                "import bluelm_cli.local.engine": _python("-c", "import bluelm_cli.local.engine")}
    data: dict[str, Any] = {}
    step_ends = time.monotonic() + limit
    for label, command in commands.items():
        runs = []
        for _ in range(3 if check.cpu else 2):
            started = time.perf_counter()
            # The first import on a fresh machine reads torch and transformers from a cold disk: give it the step.
            rc, _ = check.run(command, max(5.0, step_ends - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"{label} failed")
            runs.append(round(time.perf_counter() - started, 3))
        data[label] = {"runs_s": runs, "best_s": min(runs)}
    # Where the engine's import time goes (15 s on an H100 machine on 2026-11-25, 3.4 s on the CPU box).
    rc, output = check.run(_python("-X", "importtime", "-c", "import bluelm_cli.local.engine"), max(5.0, step_ends - time.monotonic()))
    if rc == 0:
        rows = [line.split("|") for line in output.splitlines() if line.startswith("import time:") and "|" in line]
        timed = [(int(row[1]), row[2].rstrip()) for row in rows if row[1].strip().isdigit()]
        data["slowest_imports_us"] = {name: cumulative for cumulative, name in sorted(timed, reverse=True)[:15]}
    return data


def step_gpu_tests(check: Check, limit: float) -> dict[str, Any]:
    import xml.etree.ElementTree as ElementTree

    xml = check.out / "gpu_tests.xml"
    rc, output = check.run(_python("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                                   f"--junitxml={xml}", "tests"), limit)
    data: dict[str, Any] = {"exit_code": rc, "summary": output.strip().splitlines()[-1] if output.strip() else ""}
    if xml.exists():
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        data.update(counts)
        data["not_passed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    data["_status"] = "ok" if rc in (0, 5) else "failed"  # 5: nothing selected
    return data


def step_profile(check: Check, limit: float) -> dict[str, Any]:
    shape = CPU_SHAPES["2k"][0] if check.cpu else GPU_SHAPES["2k"][0]
    device = "cpu" if check.cpu else "cuda"
    rc, output = check.run(_python("scripts/gpu_profile.py", str(check.out), "--shape", shape, "--device", device), limit)
    report = check.out / "profile.json"
    data = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
    data["_status"] = "ok" if rc == 0 else "failed"
    return data


def _bench(check: Check, limit: float, config: str, *, short: bool = False, baseline: bool = True) -> dict[str, Any]:
    shape, prompt, new, turns = (CPU_SHAPES if check.cpu else GPU_SHAPES)[config]
    device = ["--device", "cpu", "--dtype", "float32"] if check.cpu else ["--device", "cuda", "--dtype", "bfloat16"]
    workload = ["--prompt-tokens", "32", "--new-tokens", "8", "--turns", "1"] if short else \
        ["--prompt-tokens", str(prompt), "--new-tokens", str(new), "--turns", str(turns), *(["--baseline"] if baseline else [])]
    command = _python("-m", "bluelm_cli", "bench", "--random-weights", "--shape", shape, *device, *workload, "--json")
    rc, output = check.run(command, limit)
    if rc != 0:
        return {"_status": "failed", "command": _shown(command), "tail": output.strip().splitlines()[-5:]}
    report = json.loads(output[output.index("{"):])
    report["command"] = _shown(command)
    return report


def _shown(command: list[str]) -> str:
    return " ".join(["bluelm", *command[3:]] if command[1:3] == ["-m", "bluelm_cli"] else command)


def _json_tail(output: str) -> dict[str, Any]:
    return json.loads(output[output.index("{"):])


def _device_flags(check: Check) -> list[str]:
    return ["--device", "cpu", "--dtype", "float32"] if check.cpu else ["--device", "cuda", "--dtype", "bfloat16"]


def step_kernels(check: Check, limit: float) -> dict[str, Any]:
    """Kernels per decode forward and the step's time: unfused and fused, eager, CUDA graph and compiled. The script
    saves after each measurement, so a compile that outlasts the step still leaves the other figures."""
    shape = CPU_SHAPES["2k"][0] if check.cpu else GPU_SHAPES["2k"][0]
    saved = check.out / "kernels.json"
    command = _python("scripts/gpu_kernels.py", "--shape", shape, *_device_flags(check), "--out", str(saved),
                      *([] if check.cpu else ["--reduce-overhead"]))
    try:
        rc, output = check.run(command, limit)
    except subprocess.TimeoutExpired:
        rc, output = -1, "killed at the step's time limit"
    data: dict[str, Any] = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else {}
    if rc != 0:
        data.update({"_status": "partial" if data else "failed", "tail": output.strip().splitlines()[-5:]})
    data["command"] = _shown(command)
    return data


def step_bench_bf16(check: Check, limit: float, runner: str = "graphs") -> dict[str, Any]:
    """Issue 22's bf16 figures from one bench: decode tok/s, TTFT of a 1,000-token prompt, work outside the forward.
    `runner`: the fast path (graphs, the chat's; fused, graphs over compiled RMSNorm/RoPE/SiLU)."""
    if runner != "graphs" and check.cpu:
        return {"_status": "skipped", "note": f"the {runner} runner is a CUDA fast path (its CPU test: tests/test_fusion.py)"}
    shape, prompt, new, _ = (CPU_SHAPES if check.cpu else GPU_SHAPES)["2k"]
    command = _python("-m", "bluelm_cli", "bench", "--random-weights", "--shape", shape, *_device_flags(check),
                      "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--turns", "2", "--runner", runner, "--json")
    rc, output = check.run(command, limit)
    if rc != 0:
        return {"_status": "failed", "command": _shown(command), "tail": output.strip().splitlines()[-5:]}
    report = _json_tail(output)
    report["command"] = _shown(command)
    return report


def step_bench_prefill(check: Check, limit: float) -> dict[str, Any]:
    """TTFT of the 1,000-token first prompt (and of turn 2) with the eager prefill and with `--prefill-graph`, both on the
    graphs runner, each the best of two conversations (turn 2's prefill graph is captured on first use)."""
    if check.cpu:
        return {"_status": "skipped", "note": "the graph prefill is a CUDA fast path (its CPU tests: tests/test_prefill_graph.py)"}
    shape, prompt, _, _ = GPU_SHAPES["2k"]
    new = 16  # TTFT is the figure: few decoded tokens keep the two benches' device time down
    started = time.monotonic()
    data: dict[str, Any] = {}
    for label, extra in (("eager_prefill", ["--no-prefill-graph"]), ("graph_prefill", ["--prefill-graph"])):
        command = _python("-m", "bluelm_cli", "bench", "--random-weights", "--shape", shape, *_device_flags(check),
                          "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--turns", "2", "--repeats", "2",
                          "--runner", "graphs", *extra, "--json")
        try:
            rc, output = check.run(command, max(1.0, limit - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            rc, output = -1, "killed at the step's time limit"
        if rc != 0:
            data[label] = {"_status": "failed", "command": _shown(command), "tail": output.strip().splitlines()[-5:]}
            continue
        report = _json_tail(output)
        data[label] = {"command": _shown(command), "compile_s": report.get("compile_s"), "prefill_graph": report.get("prefill_graph"),
                       "peak_gpu_mem_gb": report.get("peak_gpu_mem_gb"),
                       "turns": [{key: turn.get(key) for key in ("turn", "context_tokens", "reused_tokens", "prefill_tokens", "ttft_s")}
                                 for turn in report["turns"]]}
    if all(part.get("_status") == "failed" for part in data.values()):
        data["_status"] = "failed"
    return data


def step_bench_quantized(check: Check, limit: float, scheme: str) -> dict[str, Any]:
    if scheme == "int4" and check.cpu:
        return {"_status": "skipped", "note": "int4 needs CUDA (torchao's kernels)"}
    shape, prompt, new, _ = (CPU_SHAPES if check.cpu else GPU_SHAPES)["2k"]
    command = _python("-m", "bluelm_cli", "bench", "--random-weights", "--shape", shape, *_device_flags(check),
                      "--quantize", scheme, "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--turns", "2", "--json")
    rc, output = check.run(command, limit)
    if rc != 0:
        return {"_status": "failed", "command": _shown(command), "tail": output.strip().splitlines()[-5:]}
    report = _json_tail(output)
    report["command"] = _shown(command)
    return report


def _prefill_after_the_window_fills(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean prefill tokens per turn once the window is full, over the median turn's before it (the issue's ≤ 5×).

    Taken over whole cycles, from the first drop to the turn before the last one: a run that ends a few turns
    after a drop would charge that drop's re-prefill to those few turns only. With a single drop, over every turn
    from it (marked `whole_cycles: false`)."""
    drops = [index for index, turn in enumerate(turns) if turn.get("dropped_turns")]
    if not drops or drops[0] < 2:
        return {"note": "the window never filled"}
    before = sorted(turn["prefill_tokens"] for turn in turns[1:drops[0]])
    normal = before[len(before) // 2]
    whole = len(drops) >= 2
    after = [turn["prefill_tokens"] for turn in turns[drops[0] : drops[-1] if whole else None]]
    return {"first_drop_turn": drops[0] + 1, "drop_turns": [index + 1 for index in drops], "whole_cycles": whole,
            "normal_prefill_tokens": normal, "mean_prefill_after_fill": round(sum(after) / len(after), 1),
            "ratio": round(sum(after) / len(after) / normal, 2),
            "ttft_ms_after_fill": [round(1000 * turn["ttft_s"], 1) for turn in turns[drops[0]:]]}


def step_context(check: Check, limit: float) -> dict[str, Any]:
    shape, prompt, new, turns = CONTEXT_WORKLOAD["cpu" if check.cpu else "gpu"]
    data: dict[str, Any] = {}
    for label, flag in (("block_drop", "--no-context-shift"), ("context_shift", "--context-shift")):
        command = _python("-m", "bluelm_cli", "bench", "--random-weights", "--shape", shape, *_device_flags(check), flag,
                          "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--turns", str(turns), "--json")
        rc, output = check.run(command, limit / 2)
        if rc != 0:
            data[label] = {"command": _shown(command), "tail": output.strip().splitlines()[-5:]}
            data["_status"] = "failed"
            continue
        report = _json_tail(output)
        data[label] = {"command": _shown(command), **_prefill_after_the_window_fills(report["turns"]),
                       "turns": [{key: turn[key] for key in ("turn", "context_tokens", "reused_tokens", "prefill_tokens",
                                                             "dropped_turns", "forwards", "shifted_tokens", "ttft_s")}
                                 for turn in report["turns"]]}
    return data


def step_lookup(check: Check, limit: float) -> dict[str, Any]:
    shape = CPU_SHAPES["2k"][0] if check.cpu else GPU_SHAPES["2k"][0]
    command = _python("scripts/bench_prompt_lookup.py", "--shape", shape, *_device_flags(check),
                      "--repeats", "2" if check.cpu else "3", "--new-tokens", "32" if check.cpu else "96")
    rc, output = check.run(command, limit)
    data = _json_tail(output) if rc == 0 else {"_status": "failed", "tail": output.strip().splitlines()[-5:]}
    data["command"] = _shown(command)
    return data


def step_quality(check: Check, limit: float) -> dict[str, Any]:
    model = os.environ.get("QUALITY_MODEL")
    if not model:
        return {"_status": "skipped", "note": "no real checkpoint on the machine (set QUALITY_MODEL=folder)"}
    schemes = ["int8"] if check.cpu else ["int8", "int4"]
    command = _python("scripts/quant_quality.py", "--model", model, *_device_flags(check), "--schemes", *schemes)
    rc, output = check.run(command, limit)
    data = _json_tail(output) if rc == 0 else {"_status": "failed", "tail": output.strip().splitlines()[-5:]}
    data["command"] = _shown(command)
    return data


SPEED_FUNCTIONS: dict[str, Callable[[Check, float], dict[str, Any]]] = {
    "bench_bf16": lambda check, limit: step_bench_bf16(check, limit),
    "bench_fused": lambda check, limit: step_bench_bf16(check, limit, "fused"),
    "bench_prefill": step_bench_prefill,
    "kernels": step_kernels,
    "bench_int8": lambda check, limit: step_bench_quantized(check, limit, "int8"),
    "bench_int4": lambda check, limit: step_bench_quantized(check, limit, "int4"),
    "context": step_context,
    "lookup": step_lookup,
    "quality": step_quality,
}


def step_first_prompt(check: Check, limit: float) -> dict[str, Any]:
    import pexpect

    folder = check.work / "tiny"
    rc, _ = check.run(_python("-c", "import sys; from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint; "
                                    f"build_checkpoint(sys.argv[1], TinySpec())", str(folder)), limit / 4)
    if rc != 0:
        raise RuntimeError("could not build the tiny checkpoint")
    data: dict[str, Any] = {"model": "tiny checkpoint (TinySpec defaults), through the real loader"}
    for label in ("cold_cache_s", "warm_cache_s"):
        started = time.perf_counter()
        child = pexpect.spawn(sys.executable, ["-m", "bluelm_cli", "chat", "--model", str(folder)], cwd=str(ROOT),
                              env={**check.env, "TERM": "xterm-256color"}, encoding="utf-8", codec_errors="replace",
                              dimensions=(40, 120), timeout=limit / 3)
        try:
            child.expect("BlueLM chat")
            child.expect_exact("> ")
            data[label] = round(time.perf_counter() - started, 3)
            child.sendline("/exit")
            child.expect(pexpect.EOF, timeout=30)
        finally:
            check._log(f"[chat to first prompt, {label}]\n{child.before or ''}\n")
            child.close(force=True)
    return data


def run(out: Path, cpu: bool, budget_s: float, steps: str = "all") -> int:
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, cpu, budget_s)
    print(f"[gpu_check] {'CPU dry-run' if cpu else 'GPU run'} ({steps} steps): budget {budget_s:.0f} s, report in {out}",
          flush=True)
    env = check.step("env", lambda limit: step_env(check, limit))
    if not cpu and not env["data"].get("gpu"):
        print("Error: no CUDA GPU visible; use `dry-run` for the CPU", file=sys.stderr)
        return 1
    check.step("install", lambda limit: step_install(check, limit))
    # The speed steps first: with the whole set, the budget trims the core steps' tail.
    if steps in ("all", "speed"):
        for name in SPEED_STEPS:
            check.step(name, lambda limit, name=name: SPEED_FUNCTIONS[name](check, limit))
    if steps in ("all", "core"):
        check.step("imports", lambda limit: step_imports(check, limit))
        check.step("gpu_tests", lambda limit: step_gpu_tests(check, limit))
        check.step("profile", lambda limit: step_profile(check, limit))
        check.step("bench_2k", lambda limit: _bench(check, limit, "2k"))
        check.step("bench_32k", lambda limit: _bench(check, limit, "32k", baseline=False))
        check.step("warm_start", lambda limit: _bench(check, limit, "2k", short=True))
        check.step("first_prompt", lambda limit: step_first_prompt(check, limit))
    check.write()
    print(f"\nReport: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}; logs: {out / 'gpu_check.log'}\n")
    print(headline_text(check.steps, cpu))
    return 0 if all(step["status"] in ("ok", "skipped") for step in check.steps) else 1


# --------------------------------------------------------------------------------------------- the report
def _data(steps: list[dict[str, Any]], name: str) -> dict[str, Any]:
    # "partial": a step that saved some of its figures before it ran out of time (the kernels step).
    return next((s["data"] for s in steps if s["step"] == name and s["status"] in ("ok", "partial")), {})


def headline_rows(steps: list[dict[str, Any]], cpu: bool) -> list[list[str]]:
    """[figure, value, target, verdict]; targets are the issue's, for one H100 at the published 7B shapes."""
    rows: list[list[str]] = []

    def add(figure: str, value: float | None, unit: str, target: str = "", ok: bool | None = None) -> None:
        shown = "—" if value is None else f"{value:,.3f} {unit}".strip() if abs(value) < 10 else f"{value:,.1f} {unit}".strip()
        judged = target.startswith("CPU:") == cpu  # the CPU dry-run judges CPU targets only, a GPU run GPU ones
        verdict = "" if ok is None or not judged else ("meets" if ok else "MISSES")
        rows.append([figure, shown, f"GPU: {target}" if cpu and target and not judged else target, verdict])

    env = _data(steps, "env")
    rows.append(["device", str(env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"),
                 f"torch {env.get('torch')}, transformers {env.get('transformers')}", ""])
    tests = _data(steps, "gpu_tests")
    if tests:
        rows.append(["gpu tests", f"{tests.get('passed', 0)} passed, {tests.get('failures', 0) + tests.get('errors', 0)} "
                     f"failed, {tests.get('skipped', 0)} skipped", "all pass", ""])
    for config in ("2k", "32k"):
        bench = _data(steps, f"bench_{config}")
        if not bench:
            continue
        decode = bench.get("decode_tok_s")
        base = bench.get("baseline") or []
        ratio = bench.get("ratios", {}).get("engine_decode_over_generate")
        first = bench["turns"][0]
        add(f"{config}: decode tok/s", decode, "", "≥ 170" if config == "2k" else "", None if decode is None or config != "2k" else decode >= 170)
        add(f"{config}: decode vs generate()", ratio, "×", "≥ 4×", None if ratio is None else ratio >= 4)
        add(f"{config}: TTFT turn 1 ({first['context_tokens']} tokens)", 1000 * first["ttft_s"], "ms",
            "≤ 80 ms (1000 tokens)" if config == "2k" else "", 1000 * first["ttft_s"] <= 80 if config == "2k" else None)
        later = [t for t in bench["turns"][1:] if t["context_tokens"] - t["prefill_tokens"] >= 1500] or bench["turns"][1:]
        if later:
            turn = later[0]
            delta = 1000 * (turn["ttft_s"] - first["ttft_s"])
            add(f"{config}: TTFT turn {turn['turn']} ({turn['reused_tokens']} reused) − turn 1", delta, "ms",
                "≤ 10 ms (1500 history)" if config == "2k" else "", delta <= 10 if config == "2k" else None)
        if bench.get("compile_s") is not None:
            add(f"{config}: fast-path warm-up ({bench.get('runner')}), first start", bench["compile_s"], "s", "≤ 30 s" if config == "2k" else "",
                bench["compile_s"] <= 30 if config == "2k" else None)
        overhead = bench.get("overhead") or {}
        if overhead:
            add(f"{config}: outside the forward, per token", overhead["outside_forward_ms_per_token"], "ms")
            share = 100 * overhead["outside_forward_fraction"]
            add(f"{config}: outside the forward, share of decode", share, "%", "CPU: ≤ 5% (25M)" if cpu else "",
                share <= 5 if cpu else None)
            stub = overhead["stub_ms_per_token"].get("100096 default sampling")
            add(f"{config}: engine work at vocab 100,096 (stub)", stub, "ms", "≤ 0.5 ms", None if stub is None else stub <= 0.5)
        if bench.get("peak_gpu_mem_gb") is not None:
            add(f"{config}: peak GPU memory", bench["peak_gpu_mem_gb"], "GB", "≈ weights + KV + workspace")
        if base:
            rows.append([f"{config}: answers identical to generate()", str(bench.get("answers_match")), "", ""])
        add(f"{config}: load (random init on the device)", bench.get("load_s"), "s")
    warm = _data(steps, "warm_start")
    if warm.get("compile_s") is not None:
        add(f"fast-path warm-up ({warm.get('runner')}), second start", warm["compile_s"], "s", "≤ 10 s", warm["compile_s"] <= 10)
    profile = _data(steps, "profile")
    if isinstance(profile.get("decode"), dict):
        for label, value in profile["decode"].items():
            if isinstance(value, (int, float)):
                add(f"profile: decode step, {label.removesuffix(' ms')}", value, "ms")
    if isinstance(profile.get("prefill"), dict) and "wall_ms" in profile["prefill"]:
        add(f"profile: prefill of {profile['prefill']['prefill_tokens']} tokens after ~1,300", profile["prefill"]["wall_ms"], "ms")
    if isinstance(profile.get("syncs"), dict) and "total" in profile["syncs"]:
        add(f"profile: device syncs in a {profile['syncs']['tokens']}-token turn", profile["syncs"]["total"], "")
    if isinstance(profile.get("agreement"), dict) and "relative_error" in profile["agreement"]:
        add("profile: graph vs eager logits, relative error", profile["agreement"]["relative_error"], "")
    imports = _data(steps, "imports")
    for label, figures in imports.items():
        if isinstance(figures, dict) and "best_s" in figures:
            add(f"{label} (fresh process)", figures["best_s"], "s")
    first_prompt = _data(steps, "first_prompt")
    for label in ("cold_cache_s", "warm_cache_s"):
        if label in first_prompt:
            add(f"chat to first prompt, tiny model, {label[:4]} cache", first_prompt[label], "s")
    rows += speed_rows(steps, cpu, add)
    failed = [f"{s['step']} ({s['status']})" for s in steps if s["status"] != "ok"]
    rows.append(["steps not ok", ", ".join(failed) or "none", "", ""])
    return rows


def speed_rows(steps: list[dict[str, Any]], cpu: bool, add: Callable[..., None]) -> list[list[str]]:
    """The speed steps' figures (issue 22's targets are for one H100, 7B, batch 1); `add` appends to the table."""
    bf16 = _data(steps, "bench_bf16")
    if bf16.get("turns"):
        precision, engine = ("float32 (CPU)", ", eager") if cpu else ("bf16", ", CUDA graphs")
        first = bf16["turns"][0]
        decode = bf16.get("decode_tok_s")
        add(f"{precision}: decode tok/s (fused{engine})", decode, "", "≥ 160", None if decode is None else decode >= 160)
        ttft = 1000 * first["ttft_s"]
        add(f"{precision}: TTFT, {first['context_tokens']}-token prompt", ttft, "ms", "≤ 40 ms", ttft <= 40)
        overhead = bf16.get("overhead") or {}
        if overhead:
            outside = overhead["outside_forward_ms_per_token"]
            add(f"{precision}: engine work per token outside the forward (timed)", outside, "ms", "≤ 0.3 ms", outside <= 0.3)
            stub = overhead["stub_ms_per_token"].get("100096 default sampling")
            add(f"{precision}: engine work per token, forward stubbed, vocab 100,096, default sampling", stub, "ms", "≤ 0.3 ms",
                None if stub is None else stub <= 0.3)
            greedy = next((v for k, v in overhead["stub_ms_per_token"].items() if k.endswith(" greedy")), None)
            add(f"{precision}: engine work per token, forward stubbed, greedy", greedy, "ms")
    fused = _data(steps, "bench_fused")
    if fused.get("turns"):
        decode = fused.get("decode_tok_s")
        add("bf16: decode tok/s (fused runner: compiled RMSNorm/RoPE/SiLU, CUDA graphs)", decode, "", "≥ 160",
            None if decode is None else decode >= 160)
        add(f"bf16: TTFT, {fused['turns'][0]['context_tokens']}-token prompt (fused runner)", 1000 * fused["turns"][0]["ttft_s"], "ms")
        if fused.get("compile_s") is not None:
            add("bf16: fused runner warm-up (compile and capture)", fused["compile_s"], "s")
    prefill = _data(steps, "bench_prefill")
    for label, what in (("eager_prefill", "eager prefill"), ("graph_prefill", "graph prefill")):
        turns = (prefill.get(label) or {}).get("turns") or []
        if turns:
            ttft = 1000 * turns[0]["ttft_s"]
            graph = label == "graph_prefill"
            add(f"bf16: TTFT, {turns[0]['context_tokens']}-token prompt, {what} (graphs runner, best of 2)", ttft, "ms",
                "≤ 40 ms" if graph else "", ttft <= 40 if graph else None)
            if len(turns) > 1:
                add(f"bf16: TTFT turn 2 ({turns[1]['prefill_tokens']} new tokens at {turns[1]['reused_tokens']}), {what}",
                    1000 * turns[1]["ttft_s"], "ms")
        part = prefill.get(label) or {}
        if part.get("compile_s") is not None:
            add(f"bf16: graphs runner warm-up, {what}", part["compile_s"], "s")
        if part.get("peak_gpu_mem_gb") is not None:  # the prefill graphs' memory pool shows as the difference
            add(f"bf16: peak GPU memory, {what}", part["peak_gpu_mem_gb"], "GB")
    kernels = _data(steps, "kernels")
    for label in ("eager_unfused", "graph_unfused", "eager_fused", "graph_fused", "compiled_fused", "compiled_fused_graph",
                  "pointwise_fused", "pointwise_fused_graph"):
        figures = kernels.get(label) or {}
        count = figures.get("kernels_per_forward", figures.get("top_level_aten_ops_per_forward"))
        if count is not None:
            what = "CUDA kernels" if "kernels_per_forward" in figures else "CPU operators"
            add(f"kernels: {what} per decode forward, {label.replace('_', ' ')}", count, "")
            add(f"kernels: decode step, {label.replace('_', ' ')}", figures.get("step_ms_median"), "ms")
            if (label.endswith("graph") or label.startswith("graph")) and not cpu:
                add(f"kernels: forward-only tok/s, {label.replace('_', ' ')}", figures.get("tok_s_equivalent"), "")
    for scheme, target in (("int8", 220), ("int4", 280)):
        bench = _data(steps, f"bench_{scheme}")
        if bench.get("decode_tok_s") is not None:
            decode = bench["decode_tok_s"]
            add(f"{scheme}: decode tok/s", decode, "", f"≥ {target}", decode >= target)
            first = bench["turns"][0]
            add(f"{scheme}: TTFT turn 1 ({first['context_tokens']} tokens)", 1000 * first["ttft_s"], "ms")
    context = _data(steps, "context")
    for label in ("block_drop", "context_shift"):
        figures = context.get(label) or {}
        if "ratio" in figures:
            add(f"context {label.replace('_', ' ')}: prefill/turn after fill ÷ normal", figures["ratio"], "×",
                "≤ 5×" if label == "block_drop" else "", figures["ratio"] <= 5 if label == "block_drop" else None)
    lookup = _data(steps, "lookup")
    # On a shared CPU, wall time is noise; the script's CPU-time ratios are what the dry run shows.
    over = (lookup.get("cpu_over_plain") if cpu else None) or lookup.get("over_plain") or {}
    if over:
        add("prompt lookup: no-match decode ÷ plain", over.get("no-match"), "×", "≥ 0.95", (over.get("no-match") or 0) >= 0.95)
        add("prompt lookup: all-rejected decode ÷ plain", over.get("all-rejected"), "×")
        add("prompt lookup: decode ÷ plain (random-weight answers)", over.get("lookup"), "×")
        add("prompt lookup: forwards per token", (lookup.get("forwards_per_token") or {}).get("lookup"), "")
    quality = _data(steps, "quality")
    for row in quality.get("rows", []):
        add(f"quality {row['weights']}: perplexity", row["perplexity"], "")
        add(f"quality {row['weights']}: greedy agreement over {quality.get('greedy_tokens')}", row["teacher_forced_agreement"], "")
    return []


def headline_text(steps: list[dict[str, Any]], cpu: bool) -> str:
    rows = headline_rows(steps, cpu)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["HEADLINE" + ("  (CPU dry-run: small shapes, GPU targets not judged)" if cpu else "")]
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check ({report['mode']}), {report['created']}", "", "| figure | value | target | verdict |",
             "|---|---:|---|---|"]
    lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in report["headline"]]
    lines += ["", "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note', '')} |" for s in report["steps"]]
    for step in report["steps"]:
        if step["status"] == "ok" and step["data"].get("command"):
            lines += ["", f"`{step['data'].get('command')}`"]
        for part in ("block_drop", "context_shift"):
            if step["status"] == "ok" and isinstance(step["data"].get(part), dict):
                lines += ["", f"`{step['data'][part].get('command')}`"]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("prepare", "run", "dry-run"))
    parser.add_argument("out", nargs="?", help="report folder (default $OUT, else ./gpu_check_out)")
    parser.add_argument("--budget", type=float, help=f"seconds for all steps (default {GPU_BUDGET_S} on a GPU, 1800 dry-run)")
    parser.add_argument("--no-bnb", action="store_true", help="prepare: leave bitsandbytes out")
    parser.add_argument("--steps", choices=("all", "core", "speed"), default="all",
                        help="run: every step (speed steps first), the core steps only, or the speed steps only")
    args = parser.parse_args(argv)
    if args.mode in ("prepare", "dry-run"):
        status = prepare(with_bnb=not args.no_bnb)
        if status or args.mode == "prepare":
            return status
    out = Path(args.out or os.environ.get("OUT") or ROOT / "gpu_check_out").resolve()
    cpu = args.mode == "dry-run"
    return run(out, cpu, args.budget or (1800 if cpu else GPU_BUDGET_S), args.steps)


if __name__ == "__main__":
    sys.exit(main())
