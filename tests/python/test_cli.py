"""The `epmoe` command: usage mistakes exit 2 with one line `epmoe <cmd>: error: ...` and no traceback (--debug shows
it), --help shows defaults, --version, `epmoe plan` before/after + PNG, progress that is plain lines when piped
(no carriage returns) and silent with -q, and bench's per-script time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from epmoe.cli import main

PYTHONPATH = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "python"), os.environ.get("PYTHONPATH", "")])


def epmoe_cmd(*args, timeout=180):
    """Runs `python -m epmoe.cli ARGS` with piped output; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    return subprocess.run([sys.executable, "-m", "epmoe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def assert_one_line_error(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def load_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "load.npy"
    np.save(path, np.random.default_rng(0).lognormal(size=(3, 16)) * 100)
    return path


# ---- through a real process


def test_version():
    proc = epmoe_cmd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("epmoe 0.1.0 (torch "), proc.stdout + proc.stderr


def test_python_dash_m_epmoe_is_the_command():
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    proc = subprocess.run([sys.executable, "-m", "epmoe", "--version"], capture_output=True, text=True, env=env,
                          timeout=180, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("epmoe 0.1.0 (torch "), proc.stdout + proc.stderr


@pytest.mark.parametrize("args, prog, needle", [
    (["demo", "--ranks", "0"], "epmoe demo", "--ranks: must be an int >= 1, got 0"),
    (["plan", "LOAD.npy", "--slots", "16", "--ranks", "4", "--max-moves", "2", "-o", "x.json"], "epmoe plan",
     "--max-moves needs --previous"),
])
def test_usage_error_in_a_process(args, prog, needle):
    proc = epmoe_cmd(*args)
    assert proc.returncode == 2
    assert needle in assert_one_line_error(proc.stderr, prog)


def test_debug_shows_the_traceback(tmp_path):
    proc = epmoe_cmd("plan", str(tmp_path / "missing.npy"), "--slots", "16", "--ranks", "4", "-o", "x.json",
                     "--debug")
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "FileNotFoundError" in proc.stderr


def test_demo_q_silences_progress(tmp_path):
    # (piped progress as plain lines: tests/python/test_demo.py::test_demo_runs_and_matches_reference)
    args = ["demo", "--ranks", "2", "--tokens", "32", "--steps", "1", "--preset", "mixtral-mini", "-q"]
    quiet = epmoe_cmd(*args, "--out", str(tmp_path))
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "epmoe demo [" not in quiet.stderr and "\r" not in quiet.stderr, quiet.stderr
    assert "MATCH" in quiet.stdout and (tmp_path / "report.json").exists()  # the results are the output


def test_bench_stops_a_script_past_its_time_limit(tmp_path):
    # (bench's progress lines, budget and summary: tests/python/test_demo.py::test_bench_runner_prints_summary)
    slow = epmoe_cmd("bench", "--only", "bench_dispatch", "--timeout", "0.5", "--out", str(tmp_path), "-q")
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert "timed out after" in slow.stdout and "failed: bench_dispatch" in slow.stdout
    assert json.loads((tmp_path / "runs.json").read_text())["full"]["bench_dispatch"]["status"].startswith("timed")


# ---- in process (the same main() the console script runs)


def _plan_args(load_file, tmp_path, *extra):
    return ["plan", str(load_file), "--slots", "16", "--ranks", "4", "-o", str(tmp_path / "p.json"), *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--strategy", "hierarchical"], "--strategy hierarchical needs --nodes and --groups"),
    (["--strategy", "hierarchical", "--nodes", "2"], "--strategy hierarchical needs --nodes and --groups"),
    (["--nodes", "2"], "--nodes only applies to --strategy hierarchical"),
    (["--groups", "4"], "--groups only applies to --strategy hierarchical"),
    (["--nodes", "2", "--groups", "4"], "--nodes and --groups only apply to --strategy hierarchical"),
    (["--max-moves", "3"], "--max-moves needs --previous"),
    (["--max-moves", "-1"], "argument --max-moves: must be an int >= 0"),
    (["--slots", "x"], "argument --slots: must be an int >= 1, got 'x'"),
    (["--slots", "70", "--ranks", "8"], "num_slots (70) must be divisible by num_ranks (8)"),
    (["--slots", "8"], "num_slots (8) must be >= the number of experts (16)"),
    (["--strategy", "hierarchical", "--nodes", "3", "--groups", "4"], "num_groups (4) must be divisible by num_nodes"),
    (["--strategy", "magic"], "argument --strategy: invalid choice"),
])
def test_plan_usage_errors(load_file, tmp_path, capsys, extra, needle):
    assert run_main(_plan_args(load_file, tmp_path, *extra)) == 2
    assert needle in assert_one_line_error(capsys.readouterr().err, "epmoe plan")
    assert not (tmp_path / "p.json").exists()


def test_plan_into_a_missing_folder_fails_before_planning(load_file, tmp_path, capsys):
    args = ["plan", str(load_file), "--slots", "16", "--ranks", "4", "-o", str(tmp_path / "no" / "p.json")]
    assert run_main(args) == 2
    out, err = capsys.readouterr()
    assert "--output: the folder" in assert_one_line_error(err, "epmoe plan") and "does not exist" in err
    assert out == ""  # no summary of a plan that is not written


def run_main(args) -> int:
    """main()'s exit status, whether it returns it or argparse exits."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "missing.npy", "LOAD file not found"),
    (lambda d: _write(d / "load.txt", "1 2 3"), "LOAD must be a .pt, .npy or .json file"),
    (lambda d: _write(d / "load.json", "[[1, 2"), "not a readable .json file"),
    (lambda d: _write(d / "load.json", '{"loads": []}'), "'load' field"),
    (lambda d: _write(d / "load.json", "[[1, -2]]"), "must be finite and non-negative"),
    (lambda d: _write(d / "load.pt", "not a torch file"), "not a readable .pt file"),
])
def test_plan_bad_files(tmp_path, capsys, make, needle):
    path = make(tmp_path)
    assert main(["plan", str(path), "--slots", "2", "--ranks", "1", "-o", str(tmp_path / "p.json")]) == 2
    assert needle in assert_one_line_error(capsys.readouterr().err, "epmoe plan")


def test_plan_bad_previous(load_file, tmp_path, capsys):
    bad = _write(tmp_path / "prev.json", '{"physical_to_logical_map": [[0]]}')
    assert main(_plan_args(load_file, tmp_path, "--previous", str(bad))) == 2
    assert "--previous" in assert_one_line_error(capsys.readouterr().err, "epmoe plan")
    assert main(_plan_args(load_file, tmp_path, "--previous", str(tmp_path / "none.json"))) == 2
    assert "--previous file not found" in capsys.readouterr().err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_plan_prints_before_and_after_and_writes_png(load_file, tmp_path, capsys):
    assert main(_plan_args(load_file, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "balancedness before (identity): min" in out and "balancedness after:  min" in out
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.json").exists()
    # With redundancy the fresh plan is compared with the uniform placement a new layer starts with.
    assert main(["plan", str(load_file), "--slots", "20", "--ranks", "4", "-o", str(tmp_path / "r.json")]) == 0
    assert "balancedness before (uniform placement" in capsys.readouterr().out
    # With --previous, "before" is the previous placement, and the moves are printed.
    assert main(["plan", str(load_file), "--slots", "20", "--ranks", "4", "--previous", str(tmp_path / "r.json"),
                 "--max-moves", "2", "-o", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "balancedness before (previous placement)" in out and "moves:" in out
    assert (tmp_path / "s.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["demo", "--tokens", "0"], "argument --tokens: must be an int >= 1, got 0"),
    (["demo", "--steps", "0"], "argument --steps: must be an int >= 1, got 0"),
    (["demo", "--ranks", "-2"], "argument --ranks: must be an int >= 1, got -2"),
    (["demo", "--tokens", "many"], "argument --tokens: must be an int >= 1, got 'many'"),
    (["demo", "--preset", "gpt"], "argument --preset: invalid choice"),
    (["bench", "--only", "bench_nothing"], "argument --only: invalid choice"),
    (["bench", "--timeout", "0"], "argument --timeout: must be a number of seconds > 0"),
])
def test_argument_errors(capsys, args, needle):
    assert run_main(args) == 2
    assert needle in assert_one_line_error(capsys.readouterr().err, f"epmoe {args[0]}")


@pytest.mark.parametrize("extra, needle", [
    (["--nodes", "2"], "--nodes only applies to --strategy hierarchical"),
    (["--groups", "4"], "--groups only applies to --strategy hierarchical"),
    (["--nodes", "2", "--groups", "4"], "--nodes and --groups only apply to --strategy hierarchical"),
    (["--interval", "0", "--window", "5"], "--window needs rebalancing: --interval 0 never re-plans"),
    (["--interval", "0", "--incremental"], "--incremental needs rebalancing"),
    (["--interval", "0", "--max-moves", "2", "--window", "3"], "--window, --max-moves need rebalancing"),
    (["--strategy", "hierarchical", "--nodes", "3"], "must be divisible by num_nodes (3)"),
    (["--policies", "fastest"], "policies must be a non-empty subset"),
    (["--ranks", "0"], "argument --ranks: must be an int >= 1, got 0"),
    (["--top-k", "1000"], "top_k (1000) exceeds the 256 experts"),
])
def test_simulate_usage_errors(tmp_path, capsys, extra, needle):
    assert run_main(["simulate", "--steps", "2", "-q", "-o", str(tmp_path / "sim"), *extra]) == 2
    assert needle in assert_one_line_error(capsys.readouterr().err, "epmoe simulate")
    assert not (tmp_path / "sim").exists()


def test_top_level_errors(capsys):
    for args in (["bogus"], []):
        assert run_main(args) == 2
        assert_one_line_error(capsys.readouterr().err, "epmoe")


def test_demo_under_torchrun_rejects_another_rank_count(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--ranks", "4"]) == 2
    assert "WORLD_SIZE=2" in assert_one_line_error(capsys.readouterr().err, "epmoe demo")


@pytest.mark.parametrize("command, defaults", [
    ("demo", ["(default: 1024)", "(default: 4)", "(default: deepseek-v3-mini)", "(default: epmoe-demo)"]),
    ("plan", ["(default: global)"]),
    ("bench", ["(default: build/bench)"]),
    ("simulate", ["(default: global)", "(default: 64)", "(default: 50)", "(default: deepseek-v3)"]),
])
def test_help_shows_defaults(capsys, command, defaults):
    assert run_main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(d in text for d in defaults), text
    assert "--debug" in text and "--quiet" in text


def test_plan_module_main_is_the_same_command(load_file, tmp_path, capsys):
    from epmoe.eplb.cli import main as plan_main

    assert plan_main([str(load_file), "--slots", "16", "--ranks", "4", "--nodes", "2", "-o",
                      str(tmp_path / "x.json")]) == 2
    assert "--nodes only applies" in capsys.readouterr().err
