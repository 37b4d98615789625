"""EPMOE_REQUIRE_CUDA=1 turns a missing GPU into failures (never skips or xfails), with the reason in the message;
without it, CUDA tests skip. Runs pytest in a subprocess on a tiny CUDA-marked file that uses the real conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

TINY = '''
import pytest

@pytest.mark.cuda
def test_needs_gpu():
    pytest.skip("a test body that would skip itself")

@pytest.mark.multigpu(2)
def test_needs_two_gpus():
    pass

def test_plain():
    pass
'''


def _run(tmp_path: Path, require: bool) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_tiny.py").write_text(TINY)
    env = dict(os.environ)
    env.pop("EPMOE_REQUIRE_CUDA", None)
    if require:
        env["EPMOE_REQUIRE_CUDA"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "--rootdir", str(tmp_path),
           "-o", "markers=cuda\n multigpu", str(tmp_path / "test_tiny.py")]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_require_cuda_fails_without_gpu(tmp_path):
    proc = _run(tmp_path, require=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "EPMOE_REQUIRE_CUDA=1 but this test needs 1 CUDA device(s), found 0" in out, out
    assert "needs 2 CUDA device(s), found 0" in out, out
    assert "CPU-only build" in out or "could not be initialised" in out or "device_count() is 0" in out, out
    assert "skipped" not in out and "xfail" not in out, out
    assert "1 passed" in out and "2 error" in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_tests_skip_without_requirement(tmp_path):
    proc = _run(tmp_path, require=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 2 skipped" in out, out
