"""The benchmarks' multi-rank runner (benchmarks/bench_common.run_gloo_ranks): results in rank order; a rank's
exception fails the run naming the rank, and a rank that dies without reporting fails it at once instead of after
the collective timeout (the other ranks are stopped)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _rank_value(rank, world):
    return rank * 10 + world


def _rank_raises(rank, world):
    if rank == 1:
        raise ValueError("boom")
    return rank


def _rank_dies(rank, world):
    if rank == 1:
        os._exit(3)
    time.sleep(600)  # the run must not wait for this rank


@pytest.fixture
def bench_common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # the spawned ranks import it by name too
    import bench_common

    return bench_common


def test_results_come_in_rank_order(bench_common):
    assert bench_common.run_gloo_ranks(_rank_value, 2, timeout_s=60) == [2, 12]


def test_a_rank_error_names_the_rank(bench_common):
    with pytest.raises(RuntimeError, match="rank 1: ValueError"):
        bench_common.run_gloo_ranks(_rank_raises, 2, timeout_s=60)


def test_a_dead_rank_fails_the_run_at_once(bench_common):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3 before reporting"):
        bench_common.run_gloo_ranks(_rank_dies, 2, timeout_s=600)
    assert time.monotonic() - start < 60
