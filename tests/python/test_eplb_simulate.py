"""`epmoe simulate` / epmoe.eplb.simulate: traces with a known answer, the CLI and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from epmoe.eplb import ModelPreset, Placement, simulate
from epmoe.eplb.simulator import main as simulate_main
from epmoe.eplb.simulator import synthetic_trace

TINY = ModelPreset(num_layers=3, num_experts=16, top_k=2, num_groups=1, expert_bytes=1000)


def test_stationary_load_realises_the_prediction():
    rng = np.random.default_rng(0)
    counts = np.rint(1e6 * np.exp(0.7 * rng.standard_normal((3, 16)))).astype(np.float64)
    trace = np.broadcast_to(counts, (12, 3, 16))
    report = simulate(trace, preset=TINY, num_ranks=4, num_redundant=8, interval=4)
    assert report["rebalance_steps"] == [4, 8]
    for name, values in report["policies"].items():
        realised, predicted = np.array(values["balancedness"]), np.array(values["predicted"])
        # ~10^6 pairs per expert: the hash's multinomial split is within 0.3%; balanced is the exact optimum.
        np.testing.assert_allclose(realised, predicted, rtol=3e-3 if name != "balanced" else 1e-6, err_msg=name)
        # Re-planning on the same load finds the same loads.
        np.testing.assert_allclose(predicted, predicted[0], rtol=1e-9, err_msg=name)
    assert all(r["copies"] == 0 for r in report["rebalances"])  # same load, same plan: nothing moves


def test_sudden_hot_expert_balanced_recovers_at_once_hash_at_the_next_rebalance():
    # Uniform load, 2 copies of every expert (expert 0 on ranks 0 and 1, the others' second copies on ranks 2 and 3);
    # expert 0 becomes 3x hotter at step 5; rebalances every 10 steps on the last 5.
    initial = Placement(np.array([[0, 1, 2, 3, 0, 4, 5, 6, 7, 1, 4, 2, 3, 5, 6, 7]]), 8, 4)
    trace = np.full((20, 1, 8), 1000.0)
    trace[5:, 0, 0] = 3000.0
    preset = ModelPreset(1, 8, 2, 1, 1000)
    report = simulate(trace, preset=preset, num_ranks=4, num_redundant=8, interval=10, window=5, initial=initial,
                      seed=1)
    hashed = np.array(report["policies"]["hash"]["balancedness"])
    balanced = np.array(report["policies"]["balanced"]["balancedness"])
    assert hashed[:5].min() > 0.95 and balanced[:5].min() > 0.99
    assert hashed[5:10].max() < 0.88  # hash: ranks 0 and 1 carry 1500 + 3 * 500 of the mean 2500
    assert balanced[5:10].min() > 0.97  # balanced moves the other experts' pairs off those ranks at once
    assert report["rebalance_steps"] == [10]
    assert report["rebalances"][0]["copies"] > 0
    assert hashed[10:].min() > 0.93  # the plan gave the hot expert more copies


def test_generated_trace_drifts_and_reports_every_field(tmp_path):
    trace = synthetic_trace(TINY, 30, seed=2)
    assert trace.shape == (30, 3, 16)
    np.testing.assert_allclose(trace.sum(axis=2), 1.0)
    assert np.abs(np.log(trace[-1]) - np.log(trace[0])).mean() > 0  # drifts
    report = simulate(preset=TINY, num_steps=30, num_ranks=8, interval=10, max_moves=2, seed=2)
    cfg = report["config"]
    assert cfg["num_slots"] == 24 and cfg["tokens_per_step"] == 128 * 8 and cfg["max_moves"] == 2
    assert set(report["policies"]) == {"hash", "weighted", "balanced"}
    for values in report["policies"].values():
        assert len(values["balancedness"]) == len(values["predicted"]) == 30
        assert 0 < values["min"] <= values["mean"] <= 1
    for rebalance in report["rebalances"]:
        assert rebalance["changed_slots"] <= 2 * 3
        assert rebalance["bytes"] == 1000 * rebalance["copies"]
        assert rebalance["plan_ms"] > 0
    # Balanced is never worse than hash on the same pairs (it is the per-step optimum).
    h, b = (np.array(report["policies"][p]["balancedness_min"]) for p in ("hash", "balanced"))
    assert np.all(b >= h - 1e-12)


def test_cli_writes_json_and_png(tmp_path, capsys):
    trace = synthetic_trace(TINY, 10, seed=3) * 1e4
    np.save(tmp_path / "trace.npy", trace)
    torch.save(torch.from_numpy(trace), tmp_path / "trace.pt")
    for name in ("trace.npy", "trace.pt"):
        out = tmp_path / f"out-{name}"
        rc = simulate_main([str(tmp_path / name), "--ranks", "4", "--redundant", "4", "--interval", "5", "--top-k",
                            "2", "--out", str(out), "-q", "--policies", "hash,balanced"])
        assert rc == 0
        report = json.loads((out / "simulate.json").read_text())
        assert set(report["policies"]) == {"hash", "balanced"} and report["steps"] == 10
        assert report["config"]["tokens_per_step"] is None  # the file's values are the pair counts
        assert (out / "simulate.png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "realised mean" in printed.out and "epmoe simulate [" not in printed.err  # -q: no progress
    # A .json path instead of a folder; --incremental repairs with 16 moves per layer.
    assert simulate_main([str(tmp_path / "trace.npy"), "--ranks", "4", "--redundant", "4", "--interval", "5",
                          "--incremental", "-o", str(tmp_path / "run.json")]) == 0
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["config"]["max_moves"] == 16 and (tmp_path / "run.png").exists()
    assert "epmoe simulate [10/10]" in capsys.readouterr().err  # progress as plain lines when not a terminal


def test_trace_of_rates_draws_tokens_and_incremental_defaults_to_16_moves():
    # Rates (every layer sums to 1, like synthetic_trace's): rounding them to counts would leave every step empty
    # (balancedness 1 whatever the placement); they draw 128 tokens per rank instead, as a generated trace.
    rates = synthetic_trace(TINY, 8, seed=4)
    report = simulate(rates, preset=TINY, num_ranks=4, interval=4, incremental=True)
    cfg = report["config"]
    assert cfg["trace_values"] == "rates" and cfg["tokens_per_step"] == 128 * 4
    assert cfg["max_moves"] == 16 and cfg["rebalance"] == "incremental"
    for values in report["policies"].values():
        assert 0.3 < values["mean"] < 0.999  # drawn pairs: neither empty nor perfectly even
        np.testing.assert_allclose(values["balancedness"], values["predicted"], atol=0.2)
    counts = simulate(np.rint(rates * 1e4), preset=TINY, num_ranks=4, interval=4)["config"]
    assert counts["trace_values"] == "counts" and counts["tokens_per_step"] is None and counts["rebalance"] == "fresh"


def test_unreadable_trace_and_initial_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.npy").write_text("not an array")
    (tmp_path / "plan.json").write_bytes(b"\x93NUMPY not json")
    np.save(tmp_path / "ok.npy", np.full((2, 1, 16), 10.0))
    for args, match in ((["bad.npy"], "TRACE "), (["ok.npy", "--initial", "plan.json"], "--initial ")):
        proc = subprocess.run([sys.executable, "-m", "epmoe.cli", "simulate", "--out", str(tmp_path / "out"), "-q",
                               "--ranks", "4", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and match in lines[0], proc.stderr
        assert str(tmp_path / args[-1]) in lines[0] or args[-1] in lines[0], lines[0]


@pytest.mark.parametrize("args, match", [
    (["missing.npy"], "No such file"),
    (["--ranks", "0"], "--ranks"),
    (["--ranks", "3", "--redundant", "0", "--preset", "mixtral-8x7b"], "divisible"),
    (["--policies", "hash,random"], "policies"),
    (["--ranks", "many"], "--ranks"),
    (["--strategy", "nearest"], "invalid choice"),
])
def test_cli_errors_are_one_line(tmp_path, args, match):
    proc = subprocess.run([sys.executable, "-m", "epmoe.cli", "simulate", "--out", str(tmp_path), "-q", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epmoe simulate: error: ") and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bad_trace_shape():
    with pytest.raises(ValueError, match="steps, layers, experts"):
        simulate(np.ones((4, 16)), num_ranks=4)
    with pytest.raises(ValueError, match="non-negative"):
        simulate(-np.ones((2, 1, 16)), num_ranks=4)
    with pytest.raises(ValueError, match="num_steps"):
        simulate(np.ones((2, 1, 16)), num_ranks=4, num_steps=3)


@pytest.mark.slow
def test_deepseek_v3_at_ep320_is_fast():
    start = time.perf_counter()
    report = simulate(preset="deepseek-v3", num_steps=200, num_ranks=320, interval=50)
    assert time.perf_counter() - start < 60
    assert report["config"]["num_slots"] == 320 and len(report["rebalances"]) == 3
