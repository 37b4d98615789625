"""scripts/gpu_check.sh on this machine: the benchmark probes of its dry run (each GPU benchmark run with its GPU
step's arguments, PYTHONPATH unset), its budget and output-file limits, and --prepare's refusal of a non-GoogleTest
folder. CI runs the whole dry run (.ci/run); these catch the same rot inside the test suite."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    return env


def test_dry_run_probes_the_benchmarks_with_their_gpu_arguments(tmp_path):
    # --only: just the step that imports the benchmarks and parses their GPU-step arguments (+ the NCCL and capture
    # steps in dry-run mode); every other step is reported "skipped".
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "scripts_args", str(tmp_path)], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    log = (tmp_path / "steps.log").read_text()
    assert proc.returncode == 0 and steps["scripts_args"]["status"] == "passed", proc.stdout + log
    for script in ("bench_route.py --gpu-only --quick", "bench_experts_gpu.py --quick"):
        assert f"benchmarks/{script} --out " in log and "arguments and imports ok" in log, log
    assert {s["status"] for name, s in steps.items() if name != "scripts_args"} == {"skipped"}
    assert len(list(tmp_path.iterdir())) <= 8


def test_gpu_budgets_and_output_files_fit_the_lent_machine():
    text = SCRIPT.read_text()
    # Steps at the start of a line run on the GPU machine (the dry-run-only ones are indented in their `if`).
    budgets = {name: int(budget) for name, budget in re.findall(r"^step (\w+)\s+(\d+)\s", text, re.M)}
    assert {"preflight", "build", "pytest_cuda", "cpp_tests", "memcheck_cpp", "racecheck_cpp", "memcheck_py",
            "racecheck_py", "nccl", "capture", "bench_route", "bench_experts"} <= set(budgets), budgets
    assert sum(budgets.values()) <= 9 * 60, budgets
    outputs = set(re.findall(r"\$OUT/([\w.-]+)", text)) | {"summary.txt", "summary.json", "steps.log"}
    assert len(outputs) <= 8, outputs


def test_prepare_refuses_a_folder_without_googletest(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--prepare", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "is not a GoogleTest source tree" in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_run_without_a_gpu_fails_and_reports_every_dependent_step_not_run(tmp_path):
    # The GPU run (no --dry-run) on a machine without a usable GPU: the preflight fails, naming the GPU, and every
    # step after it is reported "not run" (never passed, never silently dropped); the exit status is 1.
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    report = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert proc.returncode == 1 and report["mode"] == "gpu" and not report["ok"], proc.stdout
    missing = steps["preflight"]["figures"]["missing"].split(", ")
    assert steps["preflight"]["status"] == "failed" and "GPU" in missing, steps
    dependent = {name: s for name, s in steps.items() if name != "preflight"}
    assert {"build", "pytest_cuda", "memcheck_py", "nccl", "capture", "bench_experts"} <= set(dependent), steps
    assert {s["status"] for s in dependent.values()} == {"not run"}, steps
    assert set(report["failed"]) == set(steps), report["failed"]
    assert re.search(r"^GPU +not usable|^GPU +none", (tmp_path / "env.txt").read_text(), re.M)
    assert len(list(tmp_path.iterdir())) <= 8


def test_sanitized_pytest_selects_no_cuda_graph_test():
    # The sanitizer steps run with PYTORCH_NO_CUDA_MEMORY_CACHING=1, under which a CUDA-graph capture cannot work
    # (every free is a cudaFree): the selection must leave out every test that captures, and keep the others.
    text = SCRIPT.read_text()
    hit = re.search(r'SANITIZED_PYTEST=\(-m pytest (.*?)\)', text, re.S)
    args = shlex.split(hit.group(1).replace("\n", " "))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    selected = {line.split("::")[1].split("[")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert selected, proc.stdout + proc.stderr
    source = (ROOT / "tests" / "python" / "test_experts_cuda.py").read_text()
    tree = ast.parse(source)
    capturing = {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
                 and re.search(r"CUDAGraph|cuda\.graph\(", ast.get_source_segment(source, f))}
    assert capturing and not capturing & selected, (capturing, selected)


def test_preflight_requires_the_setuptools_that_reads_pyproject(tmp_path):
    # setup.py's setuptools parses pyproject.toml; its SPDX license string needs setuptools >= 77 (older ones raise
    # a configuration error at the build step): the preflight says so first.
    (tmp_path / "setuptools").mkdir()
    (tmp_path / "setuptools" / "__init__.py").write_text('__version__ = "65.5.0"\n')
    steps = ROOT / "scripts" / "gpu_check_steps.py"
    env = {**_env(), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(steps), "preflight", str(tmp_path / "env.txt"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "(the build needs >= 77)" in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"^MISSING: .*setuptools", proc.stdout, re.M), proc.stdout
    proc = subprocess.run([sys.executable, str(steps), "preflight", str(tmp_path / "env.txt"), "--dry-run"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert re.search(r"^setuptools +\d+", proc.stdout, re.M), proc.stdout
    assert not re.search(r"^MISSING: .*setuptools", proc.stdout, re.M), proc.stdout


def test_toolkit_tools_are_found_off_path(tmp_path):
    # A machine whose PATH lacks the toolkit's bin/ (compute-sanitizer lives there): the script finds it through
    # CUDA_HOME, and the preflight reports the one the sanitizer steps will run.
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    for tool, text in (("nvcc", "Cuda compilation tools, release 13.0"), ("compute-sanitizer", "Version 2025.3")):
        (toolkit / "bin" / tool).write_text(f"#!/bin/sh\necho '{text}'\n")
        (toolkit / "bin" / tool).chmod(0o755)
    env = {**_env(), "CUDA_HOME": str(toolkit), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "preflight", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    report = (out / "env.txt").read_text()
    assert proc.returncode == 0, proc.stdout + report
    assert re.search(rf"^compute-sanitizer +{toolkit}/bin/compute-sanitizer: Version 2025.3$", report, re.M), report
    assert re.search(rf"^nvcc +{toolkit}/bin/nvcc: ", report, re.M), report
