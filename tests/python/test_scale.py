"""Construction at real size (benchmarks/bench_scale.py's cases): rank 0 of EP64 building a full DeepSeek-V3 layer
(E=256 +64 redundant, H=7168, I=2048, bf16) and rank 0 of EP8 building a Qwen3-235B-A22B layer hold only their
slots, and peak memory while building stays within their own bytes + 1.5 GB. Each build runs in a fresh process
on a torch.distributed "fake" process group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import epmoe
import torch

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_size_layers_build_within_own_bytes():
    bench = _bench()
    for r in bench.measure(list(bench.CASES), parallel=True):
        fields = bench.CASES[r["case"]]
        num_slots = fields["num_experts"] + fields["num_redundant_experts"]
        assert r["num_local_slots"] == num_slots // fields["num_ranks"], r
        expert_bytes = 3 * fields["hidden_size"] * fields["moe_intermediate_size"] * 2
        assert r["own_bytes"] >= r["num_local_slots"] * expert_bytes, r
        assert r["own_bytes"] < r["all_experts_bytes"] / 4, r
        assert r["peak_rss_over_baseline_bytes"] <= r["own_bytes"] + bench.PEAK_TARGET_GB * 1e9, r
        assert r["build_s"] < bench.TIME_TARGET_S, r


def test_meta_build_of_a_real_size_layer_allocates_nothing():
    fields = dict(_bench().CASES["DeepSeek-V3"])
    fields.pop("num_ranks")
    moe = epmoe.MoE(epmoe.MoEConfig(dtype=torch.bfloat16, **fields), device="meta")
    assert all(t.is_meta for t in [*moe.parameters(), *moe.buffers()])
    assert moe.w13.shape == (320, 2 * 2048, 7168)  # one process holds every slot, on meta

