"""Shared pytest setup: the `cuda` and `multigpu(n)` markers skip without devices, and FAIL instead when
EPMOE_REQUIRE_CUDA=1 (so a GPU run can never pass by skipping): the test body is not run and the test fails with a
message saying which devices were needed and why none was usable; a skip or xfail from anywhere else (a fixture,
a marker) is turned into that failure too."""

import os

import pytest
import torch

REQUIRE_CUDA = os.environ.get("EPMOE_REQUIRE_CUDA") == "1"
_MISSING = pytest.StashKey[str]()  # why a required CUDA test cannot run


def _cuda_state() -> tuple[int, str]:
    """(number of usable CUDA devices, why there are none when 0)."""
    if torch.version.cuda is None:
        return 0, f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()  # raises with the driver's or the runtime's own reason
        count = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001 - any failure to initialise CUDA is the reason
        return 0, f"CUDA could not be initialised ({type(exc).__name__}: {exc})"
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return 0, "torch.cuda.device_count() is 0" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible else "")
    return count, ""


def _needed_devices(item) -> int:
    needed = 1 if item.get_closest_marker("cuda") is not None else 0
    multigpu = item.get_closest_marker("multigpu")
    if multigpu is not None:
        needed = max(needed, int(multigpu.args[0]) if multigpu.args else 2)
    return needed


def pytest_collection_modifyitems(config, items):
    if not any(_needed_devices(item) for item in items):
        return
    num_gpus, why = _cuda_state()
    for item in items:
        needed = _needed_devices(item)
        if needed == 0 or num_gpus >= needed:
            continue
        reason = f"needs {needed} CUDA device(s), found {num_gpus}" + (f": {why}" if why else "")
        if REQUIRE_CUDA:
            item.stash[_MISSING] = f"EPMOE_REQUIRE_CUDA=1 but this test {reason}"
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    message = pyfuncitem.stash.get(_MISSING, None)
    if message is not None:
        pytest.fail(message, pytrace=False)  # instead of running the test body


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Outermost: whatever else turned a required CUDA test into a skip or an xfail (a fixture, the body, a marker)
    # becomes a failure with the reason.
    outcome = yield
    report = outcome.get_result()
    message = item.stash.get(_MISSING, None)
    if message is not None and report.skipped:
        report.outcome = "failed"
        report.longrepr = message
        if hasattr(report, "wasxfail"):
            del report.wasxfail
