"""Shared pytest setup: the `cuda` and `multigpu(n)` markers skip without devices, and fail instead when
EPMOE_REQUIRE_CUDA=1 (so a GPU run cannot pass by skipping)."""

import os

import pytest
import torch

REQUIRE_CUDA = os.environ.get("EPMOE_REQUIRE_CUDA") == "1"


def pytest_collection_modifyitems(config, items):
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        needed = 0
        if item.get_closest_marker("cuda") is not None:
            needed = 1
        multigpu = item.get_closest_marker("multigpu")
        if multigpu is not None:
            needed = max(needed, int(multigpu.args[0]) if multigpu.args else 2)
        if needed == 0 or num_gpus >= needed:
            continue
        reason = f"needs {needed} CUDA device(s), found {num_gpus}"
        if REQUIRE_CUDA:
            item.add_marker(pytest.mark.xfail(reason=f"EPMOE_REQUIRE_CUDA=1 but {reason}", run=False, strict=True))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))
