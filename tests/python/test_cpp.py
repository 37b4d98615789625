"""Runs the C++ GoogleTest binary built by the same CMake, one pytest item per gtest case.

Without GoogleTest the binary is not built and these items skip with a message, unless
EPMOE_REQUIRE_CPP_TESTS=1 (CI), which turns that into a failure.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("EPMOE_BUILD_DIR", ROOT / "build" / "cmake")) / "epmoe_cpp_tests"
REQUIRED = os.environ.get("EPMOE_REQUIRE_CPP_TESTS") == "1"


def _list_cases() -> list[str]:
    if not BINARY.exists():
        return []
    out = subprocess.run([str(BINARY), "--gtest_list_tests"], capture_output=True, text=True, timeout=60, check=True)
    cases, suite = [], ""
    for line in out.stdout.splitlines():
        name = line.split("#")[0].strip()
        if not name:
            continue
        if line.startswith(" "):
            cases.append(suite + name)
        else:
            suite = name  # "Suite." lines precede their "  Case" lines
    return cases


CASES = _list_cases()


def test_cpp_binary_built():
    if not BINARY.exists():
        message = f"C++ tests not built ({BINARY} missing): install GoogleTest (libgtest-dev) and rebuild"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    assert CASES, f"{BINARY} lists no test cases"


@pytest.mark.parametrize("case", CASES)
def test_cpp(case):
    proc = subprocess.run(
        [str(BINARY), f"--gtest_filter={case}"], capture_output=True, text=True, timeout=300, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    if "[  SKIPPED ]" in output:
        pytest.skip(output.split("[  SKIPPED ]")[0].strip().splitlines()[-1])


@pytest.mark.skipif(not BINARY.exists(), reason="C++ tests not built")
def test_cuda_gtests_fail_without_gpu_when_required():
    """EPMOE_REQUIRE_CUDA=1 (the GPU check's C++ and sanitizer steps) turns a CUDA gtest without a device into a
    failure naming the reason; without it, the same gtests skip."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the behaviour without a GPU")
    filt = "--gtest_filter=*Cuda*"
    env = {k: v for k, v in os.environ.items() if k != "EPMOE_REQUIRE_CUDA"}
    listed = subprocess.run([str(BINARY), filt, "--gtest_list_tests"], capture_output=True, text=True, timeout=60)
    if not any(line.startswith("  ") for line in listed.stdout.splitlines()):
        pytest.skip("built without CUDA gtests")
    plain = subprocess.run([str(BINARY), filt], env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "[  SKIPPED ]" in plain.stdout and "[  FAILED  ]" not in plain.stdout, (
        plain.stdout + plain.stderr)
    required = subprocess.run([str(BINARY), filt], env={**env, "EPMOE_REQUIRE_CUDA": "1"}, capture_output=True,
                              text=True, timeout=120)
    out = required.stdout + required.stderr
    assert required.returncode != 0 and "EPMOE_REQUIRE_CUDA=1 but no CUDA device" in out, out
    assert "[  SKIPPED ]" not in out and "[  PASSED  ] 0 tests" in out, out
