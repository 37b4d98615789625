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

@pytest.fixture
def skipping_fixture():
    pytest.skip("a fixture that would skip the test")

@pytest.mark.cuda
def test_needs_gpu():
    pytest.skip("a test body that would skip itself")

@pytest.mark.multigpu(2)
def test_needs_two_gpus():
    pass

@pytest.mark.cuda
@pytest.mark.xfail(reason="an xfail marker")
def test_marked_xfail():
    pass

@pytest.mark.cuda
def test_with_skipping_fixture(skipping_fixture):
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
    assert "skipped" not in out and "xfailed" not in out, out
    assert "3 failed, 1 passed, 1 error" in out, out  # the fixture's skip happens in setup: reported as an error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_tests_skip_without_requirement(tmp_path):
    proc = _run(tmp_path, require=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 4 skipped" in out, out
