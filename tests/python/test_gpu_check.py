"""scripts/gpu_check.sh on this machine: the benchmark probes of its dry run (each GPU benchmark run with its GPU
step's arguments, PYTHONPATH unset), its budget and output-file limits, and --prepare's refusal of a non-GoogleTest
folder. CI runs the whole dry run (.ci/run); these catch the same rot inside the test suite."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
