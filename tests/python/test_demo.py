"""`epmoe demo` (the main job) end to end on 2 gloo ranks: the table, the JSON report and the plot."""

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("preset", ["deepseek-v3-mini", "qwen3-mini"])
def test_demo_runs_and_matches_reference(tmp_path, preset):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "epmoe.cli", "demo", "--ranks", "2", "--steps", "2", "--tokens", "128",
           "--preset", preset, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MATCH" in proc.stdout and "per-rank load max/mean" in proc.stdout
    # Piped: progress is one plain line per step on stderr, never a carriage return.
    assert "\r" not in proc.stdout + proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("epmoe demo [")]
    # Three phases of 2 steps (before EPLB, after EPLB with hash, after EPLB with balanced), rebalance, report, done.
    assert len(progress) == 3 * 2 + 3 and progress[-1] == "epmoe demo [9/9] done", proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["match"] is True and report["max_abs_err"] <= report["tolerance"]
    assert report["ranks"] == 2 and len(report["before"]["rank_load"]) == 2
    assert len(report["before"]["bytes_sent_per_rank"]) == 2 and min(report["before"]["bytes_sent_per_rank"]) > 0
    # EPLB never makes the recorded window less balanced than the placement it replaced.
    assert report["rebalance"]["balancedness_after"] >= report["rebalance"]["balancedness_before"]
    # The per-batch "balanced" replica choice on the same placement and tokens never loads a rank more than hash.
    after, balanced = report["after"], report["after_balanced"]
    assert balanced["max_over_mean_load"] <= after["max_over_mean_load"] + 1e-9
    assert balanced["max_abs_err"] <= report["tolerance"]
    assert (out / "load.png").stat().st_size > 0


def test_demo_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "epmoe.cli", "demo", "--steps", "0"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("epmoe demo: error: argument --steps")
    assert "Traceback" not in proc.stderr


def test_bench_runner_prints_summary(tmp_path):
    cmd = [sys.executable, "-m", "epmoe.cli", "bench", "--only", "bench_eplb", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "bench_eplb.json").read_text())["summary"]
    assert summary and all(row["metric"] in proc.stdout for row in summary)
    # Progress: plain lines with the ETA when piped (no carriage returns), the script's own log, the durations.
    assert "\r" not in proc.stdout + proc.stderr
    assert "epmoe bench --quick [0/1] bench_eplb (ETA " in proc.stderr
    assert "epmoe bench --quick [1/1] bench_eplb ok in " in proc.stderr
    run = json.loads((tmp_path / "runs.json").read_text())["quick"]["bench_eplb"]
    assert run["status"] == "ok" and 0 < run["seconds"] and run["budget_s"] > 0
    assert (tmp_path / "bench_eplb.log").read_text().strip()
    # The Markdown table (README.md's benchmark section): a header, a rule, one line per summary row.
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0].startswith("| script | metric |") and len(table) == 2 + len(summary)
    assert all(f"| `bench_eplb` | {row['metric']} |" in line for row, line in zip(summary, table[2:], strict=True))
